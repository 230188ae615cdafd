"""The last stage: a mode's result printed as the seed tool prints it (`Prompt: ..., Generated text: ...` lines,
`***Perf Info***`, `***Acc Info***`) and written to the result CSV and `--output-json`."""
import json
import sys

from vllm_utils.errors import UserError
from vllm_utils.modes.acc.run import AccResult
from vllm_utils.modes.acc.agreement import overall
from vllm_utils.modes.acc.summary import acc_info, print_summary
from vllm_utils.modes.demo import DemoResult
from vllm_utils.modes.environment import environment
from vllm_utils.modes.files import flatten, write_csv, write_json
from vllm_utils.modes.metrics import seed_perf_info
from vllm_utils.modes.perf import PerfResult
from vllm_utils.modes.plan import Plan
from vllm_utils.modes.spec import ReportSpec


def report(plan: Plan, result: DemoResult | PerfResult | AccResult) -> None:
    if isinstance(result, DemoResult):
        report_demo(result)
    elif isinstance(result, PerfResult):
        report_perf(plan, result)
    else:
        report_acc(plan, result)


# ---- --demo -------------------------------------------------------------------------------------------------
def report_demo(result: DemoResult) -> None:
    for label, output in zip(result.labels, result.outputs):
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}, {label}")
    if result.agreement is None:
        return
    for i, a in enumerate(result.agreement):
        print(f"Reference agreement {i}: exact match {a.exact_match}, first divergence {a.first_divergence}, "
              f"top-1 {a.top1_agreement}, mean |dlogprob| {a.mean_abs_dlogprob}, max |dlogprob| {a.max_abs_dlogprob}"
              + (f", error {a.error}" if a.error else ""))
    print("***Reference Agreement***")
    print(json.dumps(overall(result.agreement), indent=4))


# ---- --perf -------------------------------------------------------------------------------------------------
def report_perf(plan: Plan, result: PerfResult) -> None:
    info = seed_perf_info(result.summary)
    if result.cpu_threads is not None:
        info["cpu_threads"] = result.cpu_threads
    print("***Perf Info***")
    print(json.dumps(info, indent=4))
    print_details(result.summary, plan.inputs.vision)
    if result.cpu_threads is not None:
        print(plan.platform.threads_line())
    settings = perf_settings(plan)
    rows = {**settings, **csv_figures(result.summary, info)}
    save_reports(plan.spec.report, rows, lambda: {"settings": settings, "perf_info": info, "metrics": result.summary,
                                      "environment": environment(plan.config.device)})


# the seed's keys, and the raw figure each is printed from (seconds or per second): the CSV holds each once, as a
# number in the seed's unit (ms, requests/s, tokens/s)
_SEED_FIGURES = {"latency_num_prompts": "wall_seconds", "latency_per_token": "latency_per_token_s",
                 "request_per_second": "requests_per_s", "token_per_second": "output_tokens_per_s",
                 "prefill_latency_per_token": "prefill_latency_s", "decode_latency_per_token": "decode_latency_s"}


def csv_figures(summary: dict, info: dict) -> dict[str, object]:
    """The seed's keys as numbers (the unit is the one `***Perf Info***` prints), then the other figures."""
    seed = {key: float(value.split()[0]) if isinstance(value, str) else value for key, value in info.items()}
    rest = {k: v for k, v in summary.items() if k not in _SEED_FIGURES.values()}
    return {**seed, **flatten(rest)}


def perf_settings(plan: Plan) -> dict[str, object]:
    spec, config, engine = plan.spec, plan.config, plan.spec.engine
    synthetic_video = plan.inputs.synthetic_video
    return {
        "model": plan.model, "model_type": config.model_type, "device": str(config.device),
        "dtype": str(config.dtype).removeprefix("torch."), "tensor_parallel_size": engine.tensor_parallel_size,
        "max_model_len": config.max_model_len, "input_len": spec.input_len, "output_len": spec.output_len,
        "num_prompts": spec.num_prompts, "batch_size": config.max_num_seqs, "block_size": engine.block_size,
        "enforce_eager": engine.enforce_eager, "load_format": engine.load_format, "num_iters": spec.num_iters,
        "seed": engine.seed, "input_image": ";".join(spec.images) or ("" if synthetic_video or spec.video else "black"),
        "mm_per_prompt": spec.mm_per_prompt,
        "input_vision_shape": ";".join(f"{h},{w}" for h, w in spec.vision_shapes),
        "input_video": spec.video or ("black" if synthetic_video else ""),
        "num_frames": spec.num_frames or "",
        "backend": engine.backend, "max_num_batched_tokens": config.max_num_batched_tokens,
        "num_kv_blocks": engine.num_kv_blocks if engine.num_kv_blocks is not None else "auto",
    }


def print_details(s: dict, vision: str = "image") -> None:
    """`vision`: what the requests' multimodal positions hold (image or video)."""
    rows = [("TTFT (ms)", s["ttft_ms"]), ("TPOT (ms)", s["tpot_ms"]), ("inter-token latency (ms)", s["itl_ms"])]
    print(f"{'':26}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, d in rows:
        print(f"{name:26}{d['mean']:10.2f}{d['p50']:10.2f}{d['p90']:10.2f}{d['p99']:10.2f}")
    print(f"prefill throughput: {s['prefill_tokens_per_second']:.1f} prompt tokens/s; "
          f"decode throughput (whole batch): {s['decode_tokens_per_second']:.1f} tokens/s")
    blocks = "n/a" if s["kv_blocks_total"] is None else f"{s['peak_kv_blocks_used']} of {s['kv_blocks_total']}"
    print(f"tokens per request: {s['image_tokens_per_request']} {vision} + {s['text_tokens_per_request']} text; "
          f"KV-cache blocks used at peak: {blocks}; "
          f"peak memory: {s['peak_memory_gib']:.2f} GiB; preemptions: {s['preemptions']}")


# ---- --acc --------------------------------------------------------------------------------------------------
def report_acc(plan: Plan, result: AccResult) -> None:
    results = result.results
    for r in results:
        if r.error:
            print(f"sample {r.sample.id} (row {r.sample.row}) failed: {r.error}", file=sys.stderr)
    info = acc_info(plan.spec.dataset, results, result.agreement)
    print_summary(info, result.agreement)
    settings = acc_settings(plan)
    save_reports(plan.spec.report, {**settings, **flatten(info)},
                 lambda: {"settings": settings, "acc_info": info, "samples": [r.record() for r in results],
                          "agreement": result.agreement, "environment": environment(plan.config.device)})
    if results and all(r.error for r in results):  # a run that scored nothing is no result, whatever it wrote down
        raise UserError(f"every sample failed ({len(results)} of {len(results)}; the reasons are above), so "
                        f"nothing was scored")


def acc_settings(plan: Plan) -> dict[str, object]:
    spec, config = plan.spec, plan.config
    return {
        "mode": "acc", "model": plan.model, "model_type": config.model_type, "device": str(config.device),
        "dtype": str(config.dtype).removeprefix("torch."), "dataset": spec.dataset,
        "dataset_format": spec.dataset_format or "auto", "num_prompts": spec.limit or "all",
        "batch_size": config.max_num_seqs, "output_len": plan.inputs.output_len,
        "max_model_len": config.max_model_len, "seed": spec.engine.seed,
        "reference": "hf" if spec.reference else "none",
    }


# ---- the files ----------------------------------------------------------------------------------------------
def save_reports(report: ReportSpec, rows: dict[str, object], document) -> None:
    """Writes every report asked for; if one fails, says which after trying the others (the figures are printed
    above either way). `document()` builds the JSON's content."""
    writers = []
    if report.save_result:
        writers.append(("the result CSV", lambda: write_csv(rows, report.result_dir, report.result_filename)))
    if report.output_json:
        writers.append(("--output-json", lambda: write_json(report.output_json, document())))
    failed = []
    for what, write in writers:
        try:
            print(f"Saved to {write()}", file=sys.stderr)
        except OSError as e:
            failed.append(f"{what} ({e.strerror or e})")
    if failed:
        raise UserError(f"could not write {' or '.join(failed)}; the figures printed above are complete")
