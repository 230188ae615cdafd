"""`--backend hf`: the same workload through HF transformers' `generate`, with the same outputs and timings
as far as HF can give them (static batches of `--batch-size`; no paged cache, so no KV-block figures)."""
import time
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, StoppingCriteria

from vllm_utils.config import EngineConfig, load_hf_config, resolve_dtype
from vllm_utils.devices import resolve_device, synchronize
from vllm_utils.engine.llm_engine import EngineStats
from vllm_utils.engine.sequence import SequenceTimes
from vllm_utils.errors import UserError
from vllm_utils.llm import CompletionOutput, RequestOutput
from vllm_utils.models.bundled_configs import bundled_config_dir
from vllm_utils.models.registry import model_class
from vllm_utils.multimodal.processor import MultiModalProcessor
from vllm_utils.sampling_params import SamplingParams


class _StepClock(StoppingCriteria):
    """Called by `generate` after each new token: records when it came."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class _BlockCounts:
    num_blocks: int = 0


class HFEngineView:
    """What the perf and demo code read from our engine, filled in for HF."""

    def __init__(self, config: EngineConfig, model_type: str | None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.hf_config = load_hf_config(config.model)
        cls = model_class(self.hf_config, model_type, config.model)  # the same model-type check as our engine
        if config.tensor_parallel_size != 1:
            raise UserError("--backend hf runs on one device: use --tensor-parallel-size 1")
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        folder = bundled_config_dir(config.model) or config.model
        self.max_model_len = config.max_model_len or self.hf_config.text_config.max_position_embeddings
        self.processor = MultiModalProcessor(folder, self.hf_config, cls.image_features(self.hf_config),
                                             allow_missing=config.load_format == "dummy")
        self.block_manager = _BlockCounts()
        self.stats = EngineStats()
        if config.load_format == "dummy":
            with torch.device(self.device):
                self.model = LlavaForConditionalGeneration._from_config(self.hf_config, dtype=self.dtype)
        else:
            self.model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=self.dtype).to(self.device)
        self.model.eval()

    def reset_stats(self) -> None:
        self.stats = EngineStats()


class HFGenerate:
    """`LLM`'s interface over HF transformers."""

    def __init__(self, model: str, model_type: str | None = None, **engine_args) -> None:
        engine_args = {k: v for k, v in engine_args.items() if k in EngineConfig.__dataclass_fields__}
        self.engine = HFEngineView(EngineConfig(model=model, **engine_args), model_type)

    def generate(self, prompts: list[dict], sampling_params: SamplingParams, use_tqdm: bool = True) -> list[RequestOutput]:
        engine, params = self.engine, sampling_params
        requests = [self._tokenize(p) for p in prompts]
        arrival = time.perf_counter()
        outputs = []
        batch_size = engine.config.max_num_seqs
        with tqdm(total=len(requests), desc="Processed prompts (HF)", unit="prompt", disable=not use_tqdm) as bar:
            for start in range(0, len(requests), batch_size):
                chunk = requests[start : start + batch_size]
                outputs.extend(self._generate_batch(chunk, params, arrival))
                bar.update(len(chunk))
        return outputs

    def _tokenize(self, prompt: dict) -> tuple[str | None, list[int], torch.Tensor | None]:
        if "prompt_token_ids" in prompt:
            return None, prompt["prompt_token_ids"], prompt.get("pixel_values")
        images = (prompt.get("multi_modal_data") or {}).get("image", [])
        images = images if isinstance(images, list) else [images]
        if not all(isinstance(i, Image.Image) for i in images):
            raise UserError("multi_modal_data['image'] must be a PIL image or a list of them")
        ids, pixels = self.engine.processor.process(prompt["prompt"], images)
        return prompt["prompt"], ids, pixels

    @torch.inference_mode()
    def _generate_batch(self, chunk: list, params: SamplingParams, arrival: float) -> list[RequestOutput]:
        engine = self.engine
        pad = getattr(engine.hf_config, "pad_token_id", None)
        pad = pad if pad is not None else (getattr(engine.hf_config.text_config, "pad_token_id", None) or 0)
        width = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids, _ in chunk], device=engine.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids, _ in chunk], device=engine.device)
        pixels = [p for _, _, p in chunk if p is not None]
        kwargs = {"pixel_values": torch.cat(pixels).to(engine.device, engine.dtype)} if pixels else {}
        if params.ignore_eos:
            kwargs["min_new_tokens"] = params.max_tokens
        if not params.greedy:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k if params.top_k > 0 else None)
        clock = _StepClock(engine.device)
        scheduled = time.perf_counter()
        out = engine.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=params.max_tokens,
                                    do_sample=not params.greedy, stopping_criteria=[clock], pad_token_id=pad, **kwargs)
        engine.stats.prefill_steps += 1
        engine.stats.prefill_tokens += int(mask.sum())
        engine.stats.prefill_seconds += clock.times[0] - scheduled
        engine.stats.decode_steps += len(clock.times) - 1
        engine.stats.decode_tokens += (len(clock.times) - 1) * len(chunk)
        engine.stats.decode_seconds += clock.times[-1] - clock.times[0]
        results = []
        eos = engine.processor.eos_token_id
        for row, (prompt, ids, _) in enumerate(chunk):
            tokens = out[row, width:].tolist()
            if not params.ignore_eos and eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            reason = "stop" if tokens and tokens[-1] == eos and not params.ignore_eos else "length"
            times = SequenceTimes(arrival=arrival, first_scheduled=scheduled, token_times=clock.times[: len(tokens)])
            completion = CompletionOutput(engine.processor.decode(tokens), tokens, None, reason)
            results.append(RequestOutput(prompt, ids, [completion], times, 0))
        return results
