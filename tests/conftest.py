"""Fixtures: tiny random LLaVA checkpoints built here, and HF transformers (its auto classes) as the reference."""
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

if not torch.cuda.is_available():
    # Triton kernels (the CUDA paths) then run on CPU tensors through Triton's interpreter, so their tests
    # run everywhere; this must be set before any module defines a kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_utils.bench.tiny_model import build_tiny_llava, make_demo_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
REAL_LLAVA = SHARED / "llava-1.5-7b-hf"
SHARED_IMAGES = SHARED / "images"
needs_shared = pytest.mark.skipif(not REAL_LLAVA.is_dir(), reason="../shared/assets is absent")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def real_tokenizer_dir() -> str | None:
    return str(REAL_LLAVA) if REAL_LLAVA.is_dir() else None


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> str:
    """Hub key layout; the real Llama tokenizer when ../shared is there."""
    return build_tiny_llava(str(tmp_path_factory.mktemp("tiny_hub")), real_tokenizer_dir(), layout="hub")


@pytest.fixture(scope="session", params=["hub", "prefixed", "saved"])
def tiny_llava_any_layout(request, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    return build_tiny_llava(str(folder), real_tokenizer_dir(), layout=request.param, seed=1)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Image.Image]:
    """Two different pictures: real photos when ../shared is there, generated ones otherwise."""
    if SHARED_IMAGES.is_dir():
        paths = [SHARED_IMAGES / "coffee.png", SHARED_IMAGES / "rocket.jpg"]
    else:
        folder = tmp_path_factory.mktemp("images")
        paths = [make_demo_image(str(folder / f"{i}.png"), seed=i) for i in range(2)]
    return [Image.open(p).convert("RGB") for p in paths]


class HFReference:
    def __init__(self, folder: str) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        self.adapter = None
        try:
            self.processor = AutoProcessor.from_pretrained(folder)
        except (AttributeError, ImportError, ValueError):
            # transformers builds this processor only with torchvision (LLaVA-OneVision's video processor): our
            # adapter expands the prompt's placeholders, a count HF's model checks against its own features, around
            # HF's tokenizer and image processor
            from vllm_utils.config import load_hf_config
            from vllm_utils.engine.resolve import resolve
            from vllm_utils.config import EngineConfig
            from vllm_utils.models.registry import family

            config = resolve(EngineConfig(folder))
            self.adapter = family(config.model_type).processor(folder, load_hf_config(folder))
            self.processor = self.adapter  # .tokenizer, .chat_prompt

    def chat_prompt(self, text: str, num_images: int = 1) -> str:
        if self.adapter is not None:
            return self.adapter.chat_prompt(text, num_images)
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def inputs(self, prompt: str, images: list[Image.Image]) -> dict:
        if self.adapter is None:
            return self.processor(text=prompt, images=images or None, return_tensors="pt")
        ids, mm_inputs = self.adapter.process(prompt, images)
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if mm_inputs:
            inputs.update(self.adapter.hf_model_inputs(mm_inputs))
        inputs.update(self.adapter.hf_token_inputs(inputs["input_ids"]))
        return inputs

    @torch.inference_mode()
    def greedy(self, prompt: str, images: list[Image.Image], max_new_tokens: int) -> list[int]:
        inputs = self.inputs(prompt, images)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    @torch.inference_mode()
    def token_logprobs(self, prompt: str, images: list[Image.Image], tokens: list[int]) -> list[float]:
        """Log-probabilities HF gives each of `tokens` when they follow the prompt (teacher forcing)."""
        inputs = self.inputs(prompt, images)
        n = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        logits = self.model(**inputs).logits[0, n - 1 : -1].float()
        return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1).tolist()


@pytest.fixture(scope="session", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_qwen(request, tmp_path_factory) -> str:
    """Qwen2-VL in the hub's key layout, Qwen2.5-VL in transformers 4.52's (model.visual.*, model.language_model.*)."""
    from vllm_utils.bench.tiny_qwen import build_tiny_qwen2_vl

    layout = "hub" if request.param == "qwen2_vl" else "prefixed"
    return build_tiny_qwen2_vl(str(tmp_path_factory.mktemp(request.param)), family=request.param, layout=layout)


@pytest.fixture(scope="session")
def hf_reference(tiny_llava) -> HFReference:
    return HFReference(tiny_llava)


def uncaptured_graph_mode(llm) -> None:
    """Gives a CPU engine graph mode's padded steps on static buffers, run eagerly: what CUDA graphs
    capture and replay, minus the capture."""
    llm.engine.runner.build_graphs(capture=False)
