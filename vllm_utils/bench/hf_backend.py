"""`--backend hf`: the same workload through HF transformers' `generate`, with the same outputs and timings
as far as HF can give them (static batches of `--batch-size`; no paged cache, so no KV-block figures)."""
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForImageTextToText, StoppingCriteria

from vllm_utils.config import EngineConfig, ResolvedConfig
from vllm_utils.engine.llm_engine import EngineStats
from vllm_utils.engine.resolve import resolve
from vllm_utils.engine.sequence import SequenceTimes
from vllm_utils.errors import UserError
from vllm_utils.llm import CompletionOutput, RequestOutput, multi_modal_items
from vllm_utils.models.registry import family
from vllm_utils.multimodal.inputs import concat_mm_inputs
from vllm_utils.platforms import Platform, platform_for
from vllm_utils.progress import progress_bar
from vllm_utils.sampling_params import SamplingParams


class _StepClock(StoppingCriteria):
    """Called by `generate` after each new token: records when it came, and counts the batch's tokens on `bar`."""

    def __init__(self, platform: Platform, device: torch.device, bar) -> None:
        self.platform, self.device, self.bar, self.times = platform, device, bar, []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.platform.synchronize(self.device)
        self.times.append(time.perf_counter())
        self.bar.update(input_ids.shape[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class _BlockCounts:
    num_blocks: int = 0


class HFEngineView:
    """What the perf and demo code read from our engine, filled in for HF (the same resolved configuration)."""

    def __init__(self, config: EngineConfig | ResolvedConfig, model_type: str | None) -> None:
        self.config = config if isinstance(config, ResolvedConfig) else resolve(config, model_type)
        config = self.config.engine
        if config.tensor_parallel_size != 1:
            raise UserError("--backend hf runs on one device: use --tensor-parallel-size 1")
        self.device, self.dtype, self.max_model_len = self.config.device, self.config.dtype, self.config.max_model_len
        self.platform = platform_for(self.device)
        self.processor = family(self.config.model_type).processor(self.config.folder, self.config.hf_config,
                                                                  allow_missing=config.load_format == "dummy")
        self.block_manager = _BlockCounts()
        self.stats = EngineStats()
        if config.load_format == "dummy":
            with torch.device(self.device):
                self.model = AutoModelForImageTextToText.from_config(self.config.hf_config, dtype=self.dtype)
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(self.config.folder, dtype=self.dtype)
            self.model.to(self.device)
        self.model.eval()

    def reset_stats(self) -> None:
        self.stats = EngineStats()


class HFGenerate:
    """`LLM`'s interface over HF transformers."""

    def __init__(self, model: str | ResolvedConfig, model_type: str | None = None, **engine_args) -> None:
        config = model if isinstance(model, ResolvedConfig) else EngineConfig(model=model, **engine_args)
        self.engine = HFEngineView(config, model_type)

    def generate(self, prompts: list[dict], sampling_params: SamplingParams, use_tqdm: bool = True) -> list[RequestOutput]:
        engine, params = self.engine, sampling_params
        requests = [self._tokenize(p) for p in prompts]
        arrival = time.perf_counter()
        outputs = []
        batch_size = engine.config.max_num_seqs
        with progress_bar(total=len(requests) * params.max_tokens, desc="Generating (HF)", unit="tok",
                          disable=not use_tqdm) as bar:  # the batch's positions, EOS or not
            for start in range(0, len(requests), batch_size):
                chunk = requests[start : start + batch_size]
                outputs.extend(self._generate_batch(chunk, params, arrival, bar))
        return outputs

    def _tokenize(self, prompt: dict) -> tuple[str | None, list[int], torch.Tensor | None]:
        if "prompt_token_ids" in prompt:
            return None, prompt["prompt_token_ids"], prompt.get("mm_inputs")
        images, videos = multi_modal_items(prompt)
        ids, mm_inputs = self.engine.processor.process(prompt["prompt"], images, videos)
        return prompt["prompt"], ids, mm_inputs

    @torch.inference_mode()
    def _generate_batch(self, chunk: list, params: SamplingParams, arrival: float, bar) -> list[RequestOutput]:
        engine = self.engine
        hf_config = engine.config.hf_config
        pad = getattr(hf_config, "pad_token_id", None)
        pad = pad if pad is not None else (getattr(hf_config.text_config, "pad_token_id", None) or 0)
        width = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids, _ in chunk], device=engine.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids, _ in chunk], device=engine.device)
        mm_inputs = concat_mm_inputs([engine.processor.hf_model_inputs(mm) for _, _, mm in chunk if mm])
        kwargs = {k: v.to(engine.device, engine.dtype) if v.is_floating_point() else v.to(engine.device)
                  for k, v in mm_inputs.items()}
        kwargs.update(engine.processor.hf_token_inputs(input_ids))
        if params.ignore_eos:
            kwargs["min_new_tokens"] = params.max_tokens
        if not params.greedy:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k if params.top_k > 0 else None)
        clock = _StepClock(engine.platform, engine.device, bar)
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
