"""`--perf`: one untimed warm-up request, then `--num-iters` timed runs of the plan's synthetic requests (at most
the batch size at once), each exactly `--input-len` prompt and `--output-len` output tokens; the figures."""
import time
from dataclasses import dataclass

from vllm_utils.modes.backends import Backend
from vllm_utils.modes.metrics import TimedRun, summarize
from vllm_utils.modes.plan import Plan
from vllm_utils.modes.synthetic import SyntheticRequest
from vllm_utils.progress import phase
from vllm_utils.sampling_params import SamplingParams


@dataclass(frozen=True)
class PerfResult:
    summary: dict  # raw figures (seconds, counts, distributions)
    cpu_threads: int | None  # the host threads the model ran on, where the host computed it


def run(plan: Plan, backend: Backend) -> PerfResult:
    spec, inputs, platform, device = plan.spec, plan.inputs, plan.platform, plan.config.device
    warm = SamplingParams(temperature=0, max_tokens=min(spec.output_len, 8), ignore_eos=True)
    with phase(f"Warm-up: 1 request of {spec.input_len} + {warm.max_tokens} tokens, not timed", "Warm-up"):
        backend.generate(_as_prompts(inputs.warm_up), warm, use_tqdm=False)  # first-use costs stay out
    platform.reset_peak_memory(device)
    params = SamplingParams(temperature=0, max_tokens=spec.output_len, ignore_eos=True)
    runs = []
    for i, requests in enumerate(inputs.runs):
        with phase(f"Timed run {i + 1}/{spec.num_iters}: {spec.num_prompts} request(s) of {spec.input_len} prompt "
                   f"+ {spec.output_len} output tokens", f"Timed run {i + 1}/{spec.num_iters}"):
            runs.append(timed_run(plan, backend, requests, params))
    summary = summarize(runs, spec.output_len)
    summary["image_tokens_per_request"] = inputs.runs[0][0].num_image_tokens
    summary["text_tokens_per_request"] = inputs.runs[0][0].num_text_tokens
    blocks = backend.kv_blocks()
    summary["kv_blocks_total"] = blocks
    if blocks is None:  # no paged cache: its block figures are "n/a", not 0
        summary["peak_kv_blocks_used"] = None
    summary["recurrent_state_gib"] = backend.state_bytes() / 2**30
    summary["peak_memory_gib"] = platform.peak_memory_bytes(device) / 2**30
    return PerfResult(summary, platform.compute_threads())


def _as_prompts(requests: list[SyntheticRequest]) -> list[dict]:
    return [r.as_prompt() for r in requests]


def timed_run(plan: Plan, backend: Backend, requests: list[SyntheticRequest], params: SamplingParams) -> TimedRun:
    backend.reset_prefix_cache()  # each run's prompts computed whole, whatever the runs before left cached
    backend.reset_stats()
    plan.platform.synchronize(plan.config.device)
    start = time.perf_counter()
    outputs = backend.generate(_as_prompts(requests), params)
    wall = time.perf_counter() - start
    for request, out in zip(requests, outputs):
        if len(out.prompt_token_ids) != len(request.prompt_token_ids) or len(out.outputs[0].token_ids) != params.max_tokens:
            raise RuntimeError("a request did not keep its exact input/output length")
    return TimedRun(wall, outputs, backend.stats)
