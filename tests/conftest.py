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

from vllm_utils.testing.images import make_demo_image
from vllm_utils.testing.tiny_llava import build_tiny_llava
from vllm_utils.hf_reference import HFReference

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
def photo(tmp_path_factory) -> str:
    """An image file: a real photo when ../shared is there, a generated picture otherwise."""
    if SHARED_IMAGES.is_dir():
        return str(SHARED_IMAGES / "chelsea.png")
    return make_demo_image(str(tmp_path_factory.mktemp("img") / "photo.png"))


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Image.Image]:
    """Two different pictures: real photos when ../shared is there, generated ones otherwise."""
    if SHARED_IMAGES.is_dir():
        paths = [SHARED_IMAGES / "coffee.png", SHARED_IMAGES / "rocket.jpg"]
    else:
        folder = tmp_path_factory.mktemp("images")
        paths = [make_demo_image(str(folder / f"{i}.png"), seed=i) for i in range(2)]
    return [Image.open(p).convert("RGB") for p in paths]


# A bf16 run is held to the fp32 reference within a bound derived in the same run, on the same machine: a multiple
# of how far HF's own bf16 model (same weights, same tokens) lands from its fp32 model, plus a floor. The CPU's bf16
# arithmetic (AVX-512 BF16, AMX, or neither) and the fixture's pictures move both figures together; a model that
# computes another function moves ours alone.
BF16_TIMES_HF, BF16_FLOOR = 2.0, 0.01


def chosen_logprobs(completion) -> list[float]:
    """The log-prob of each token a completion chose (asked with logprobs=0)."""
    return [entries[token].logprob for entries, token in zip(completion.logprobs, completion.token_ids)]


def assert_bf16_close(ours: list[float], folder: str, request: dict, tokens: list[int],
                      fp32: "HFReference | None" = None) -> None:
    """Our bf16 log-probs of `tokens` against HF's fp32 ones (teacher-forced), within the derived bound."""
    fp32 = fp32 or HFReference(folder)
    exact = fp32.token_logprobs(request, tokens)
    theirs = HFReference(folder, dtype="bfloat16").token_logprobs(request, tokens)
    assert len(ours) == len(exact) == len(tokens)
    ours_off = max(abs(a - b) for a, b in zip(ours, exact))
    hf_off = max(abs(a - b) for a, b in zip(theirs, exact))
    bound = BF16_TIMES_HF * hf_off + BF16_FLOOR
    if os.environ.get("VLLM_UTILS_BF16_LOG"):  # the figures behind the bound, for a record across machines
        with open(os.environ["VLLM_UTILS_BF16_LOG"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{ours_off:.5f}\t{hf_off:.5f}\n")
    assert ours_off <= bound, (f"our bf16 log-probs are {ours_off:.4f} from HF's fp32, beyond {bound:.4f} "
                               f"({BF16_TIMES_HF:g} x HF's own bf16 deviation {hf_off:.4f} + {BF16_FLOOR})")


@pytest.fixture(scope="session", params=["qwen2_vl", "qwen2_5_vl"])
def tiny_qwen(request, tmp_path_factory) -> str:
    """Qwen2-VL in the hub's key layout, Qwen2.5-VL in transformers 4.52's (model.visual.*, model.language_model.*)."""
    from vllm_utils.testing.tiny_qwen import build_tiny_qwen2_vl

    layout = "hub" if request.param == "qwen2_vl" else "prefixed"
    return build_tiny_qwen2_vl(str(tmp_path_factory.mktemp(request.param)), family=request.param, layout=layout)


@pytest.fixture(scope="session")
def hf_reference(tiny_llava) -> HFReference:
    return HFReference(tiny_llava)


def uncaptured_graph_mode(llm) -> None:
    """Gives a CPU engine graph mode's padded steps on static buffers, run eagerly: what CUDA graphs
    capture and replay, minus the capture."""
    llm.engine.runner.build_graphs(capture=False)
