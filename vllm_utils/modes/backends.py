"""What runs a mode's requests, behind one small interface: our engine, or HF transformers' `generate` on the same
workload (`--backend hf`: static batches of the batch size, no paged cache). Both give `generate` (outputs as
`LLM.generate` returns them, with per-token times), the step statistics the reports read, and the KV blocks where
there is a paged cache. Device facts come from the plan's platform, not from here."""
import sys
import time
from contextlib import contextmanager
from itertools import count
from typing import Iterator, Protocol

import torch
from transformers import StoppingCriteria

from vllm_utils.config import EngineConfig, ResolvedConfig
from vllm_utils.engine.llm_engine import EngineStats
from vllm_utils.engine.resolve import resolve
from vllm_utils.engine.sequence import SequenceTimes
from vllm_utils.hf_reference import HFReference
from vllm_utils.errors import UserError
from vllm_utils.llm import LLM, per_prompt
from vllm_utils.outputs import CompletionOutput, RequestOutput
from vllm_utils.modes.plan import Plan
from vllm_utils.multimodal.processor import ProcessorAdapter
from vllm_utils.platforms import Platform, platform_for
from vllm_utils.progress import phase, progress_bar
from vllm_utils.sampling_params import SamplingParams


class Backend(Protocol):
    stats: EngineStats

    def generate(self, requests: list[dict], params: SamplingParams | list[SamplingParams],
                 use_tqdm: bool = True) -> list[RequestOutput]:
        ...

    def reset_stats(self) -> None: ...

    def reset_prefix_cache(self) -> None:
        """Forgets what earlier requests left in the prefix cache (none: nothing to forget)."""

    def kv_blocks(self) -> int | None:
        """The paged KV cache's blocks; None without one."""

    def state_bytes(self) -> int:
        """Bytes of the linear-attention layers' recurrent states (every sequence slot); 0 without them."""

    def close(self) -> None: ...


class EngineBackend:
    def __init__(self, config: ResolvedConfig, processor: ProcessorAdapter) -> None:
        self.llm = LLM(config, processor=processor)

    @property
    def stats(self) -> EngineStats:
        return self.llm.engine.stats

    def generate(self, requests: list[dict], params: SamplingParams | list[SamplingParams],
                 use_tqdm: bool = True) -> list[RequestOutput]:
        return self.llm.generate(requests, params, use_tqdm)

    def reset_stats(self) -> None:
        self.llm.engine.reset_stats()

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def kv_blocks(self) -> int:
        return self.llm.engine.block_manager.num_blocks

    def state_bytes(self) -> int:
        return self.llm.engine.runner.state_bytes

    def close(self) -> None:
        self.llm.engine.shutdown()


_request_ids = count()


class _StepClock(StoppingCriteria):
    """Called by `generate` after each new token: records when it came, and counts the batch's tokens on `bar`."""

    def __init__(self, platform: Platform, device: torch.device, bar) -> None:
        self.platform, self.device, self.bar, self.times = platform, device, bar, []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.platform.synchronize(self.device)
        self.times.append(time.perf_counter())
        self.bar.update(input_ids.shape[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class HFBackend:
    """HF transformers' model of the same checkpoint, in the run's dtype on its device (dummy weights: HF's own
    random ones), `max_num_seqs` requests to a static batch, left-padded."""

    def __init__(self, config: ResolvedConfig, processor: ProcessorAdapter | None = None) -> None:
        self.config = config
        self.reference = HFReference(config, config.dtype, config.device, processor=processor, hf_processor=False)
        self.processor = self.reference.processor
        self.platform = platform_for(config.device)
        self.stats = EngineStats()

    @classmethod
    def from_folder(cls, model: str, model_type: str | None = None, **engine_args) -> "HFBackend":
        return cls(resolve(EngineConfig(model=model, **engine_args), model_type))

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    def reset_prefix_cache(self) -> None:
        pass

    def kv_blocks(self) -> None:
        return None

    def state_bytes(self) -> int:
        return 0  # transformers' cache grows with each request: not a pool of its own

    def close(self) -> None:
        pass

    def generate(self, requests: list[dict], params: SamplingParams | list[SamplingParams],
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Per-prompt params may differ in `max_tokens` only: a batch runs to its longest, each row cut to its own
        (greedy or seeded alike, the same tokens as a run that stopped there)."""
        each = per_prompt(params, len(requests))
        if any(p.replace(max_tokens=1) != each[0].replace(max_tokens=1) for p in each):
            raise UserError("--backend hf runs a batch with one set of sampling parameters (max_tokens aside)")
        if any(p.max_tokens is None for p in each):
            raise UserError("--backend hf needs max_tokens set in SamplingParams")
        plain = each[0].replace(max_tokens=1)
        if plain != SamplingParams(temperature=plain.temperature, top_p=plain.top_p, top_k=plain.top_k,
                                   seed=plain.seed, ignore_eos=plain.ignore_eos, max_tokens=1):
            raise UserError("--backend hf samples with temperature, top_p, top_k and a seed, one output a prompt: "
                            "leave the other SamplingParams fields at their defaults")
        processed = [self._processed(r) for r in requests]
        arrival = time.perf_counter()
        outputs = []
        batch_size = self.config.max_num_seqs
        with progress_bar(total=sum(p.max_tokens for p in each), desc="Generating (HF)", unit="tok",
                          disable=not use_tqdm) as bar:  # the batch's positions, EOS or not
            for start in range(0, len(processed), batch_size):
                chunk = slice(start, start + batch_size)
                outputs.extend(self._generate_batch(processed[chunk], each[chunk], arrival, bar))
        return outputs

    def _processed(self, request: dict) -> tuple[str | None, list[int], dict | None]:
        if "prompt_token_ids" in request:
            return request.get("prompt"), request["prompt_token_ids"], request.get("mm_inputs")
        from vllm_utils.llm import multi_modal_items

        ids, mm_inputs = self.processor.process(request["prompt"], *multi_modal_items(request))
        return request["prompt"], ids, mm_inputs

    @torch.inference_mode()
    def _generate_batch(self, chunk: list, each: list[SamplingParams], arrival: float,
                        bar) -> list[RequestOutput]:
        params = each[0].replace(max_tokens=max(p.max_tokens for p in each))
        hf_config, device = self.config.hf_config, self.config.device
        pad = getattr(hf_config, "pad_token_id", None)
        pad = pad if pad is not None else (getattr(hf_config.text_config, "pad_token_id", None) or 0)
        width = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids, _ in chunk])
        inputs = self.reference.model_inputs(input_ids, [mm for _, _, mm in chunk if mm])
        inputs["attention_mask"] = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids, _ in chunk],
                                                device=device)
        eos = self.processor.eos_token_ids
        kwargs = {} if params.ignore_eos or not eos else {"eos_token_id": eos}
        if not params.greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k if params.top_k > 0 else None)
        clock = _StepClock(self.platform, device, bar)
        scheduled = time.perf_counter()
        out = self.reference.model.generate(**inputs, max_new_tokens=params.max_tokens, do_sample=not params.greedy,
                                            stopping_criteria=[clock], pad_token_id=pad, **kwargs)
        self._count(clock, scheduled, int(inputs["attention_mask"].sum()), len(chunk))
        results = []
        for row, ((prompt, ids, _), own) in enumerate(zip(chunk, each)):
            tokens = out[row, width : width + own.max_tokens].tolist()
            ends = [i for i, t in enumerate(tokens) if t in eos]
            if not params.ignore_eos and ends:
                tokens = tokens[: ends[0] + 1]
            reason = "stop" if tokens and tokens[-1] in eos and not params.ignore_eos else "length"
            times = SequenceTimes(arrival=arrival, first_scheduled=scheduled, token_times=clock.times[: len(tokens)])
            completion = CompletionOutput(0, self.processor.decode(tokens), tokens, None, None, reason)
            results.append(RequestOutput(str(next(_request_ids)), prompt, ids, None, [completion], True, times))
        return results

    def _count(self, clock: _StepClock, scheduled: float, prompt_tokens: int, rows: int) -> None:
        stats = self.stats
        stats.prefill_steps += 1
        stats.prefill_tokens += prompt_tokens
        stats.prefill_seconds += clock.times[0] - scheduled
        stats.decode_steps += len(clock.times) - 1
        stats.decode_tokens += (len(clock.times) - 1) * rows
        stats.decode_seconds += clock.times[-1] - clock.times[0]


@contextmanager
def open_backend(plan: Plan) -> Iterator[Backend]:
    """The plan's backend, loaded as a phase, and closed (tensor-parallel workers stopped) when the mode is done."""
    engine = plan.spec.engine
    weights = " with random weights" if engine.load_format == "dummy" else ""
    what = f"Loading the model {plan.model}{weights} on {plan.config.device}"
    if engine.backend == "hf":
        if engine.ignored_by_hf:
            print(f"note: --backend hf ignores the engine-only flags {', '.join(engine.ignored_by_hf)}",
                  file=sys.stderr)
        with phase(what + " through HF transformers", "Loading"):
            backend = HFBackend(plan.config, plan.processor)
    else:
        with phase(what, "Loading"):
            backend = EngineBackend(plan.config, plan.processor)
    try:
        yield backend
    finally:
        backend.close()


def open_reference(plan: Plan) -> HFReference:
    """--reference hf: HF transformers' model of the same checkpoint, fed the requests our engine was."""
    reference = plan.spec.reference
    with phase(f"Loading the HF reference ({reference.dtype} on {reference.device})", "Loading"):
        return HFReference(plan.config, reference.dtype, reference.device, processor=plan.processor,
                           hf_processor=False)
