"""The last stage: a mode's result printed as the seed tool prints it (`Prompt: ..., Generated text: ...` lines,
`***Perf Info***`, `***Acc Info***`), then written to the result CSV and `--output-json`."""
import json
import sys

from vllm_utils.errors import UserError
from vllm_utils.modes.acc.run import AccResult
from vllm_utils.modes.demo import DemoResult
from vllm_utils.modes.environment import environment
from vllm_utils.modes.files import write_csv, write_json
from vllm_utils.modes.metrics import seed_perf_info
from vllm_utils.modes.perf import PerfResult
from vllm_utils.modes.plan import Plan
from vllm_utils.modes.spec import ReportSpec


def report(plan: Plan, result: DemoResult | PerfResult | AccResult) -> None:
    if isinstance(result, DemoResult):
        print_demo(result)
        return
    if isinstance(result, PerfResult):
        settings, info = perf_settings(plan), perf_info(result)
        print_perf(plan, result, info)
        rows = {**settings, **csv_figures(result.summary, info)}
        document = {"settings": settings, "perf_info": info, "metrics": result.summary}
    else:
        settings, info = acc_settings(plan), result.info
        print_acc(result)
        rows = {**settings, **flatten(info)}
        document = {"settings": settings, "acc_info": info, "samples": result.records,
                    "agreement": result.agreement}
    save_reports(plan.spec.report, rows, lambda: {**document, "environment": environment(plan.config.device)})
    if isinstance(result, AccResult) and result.records and len(result.failures) == len(result.records):
        # a run that scored nothing is no result, whatever it wrote down
        raise UserError(f"every sample failed ({len(result.records)} of {len(result.records)}; the reasons are "
                        f"above), so nothing was scored")


# ---- --demo -------------------------------------------------------------------------------------------------
def print_demo(result: DemoResult) -> None:
    for label, output in zip(result.labels, result.outputs):
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}, {label}")
    if result.agreement is None:
        return
    for i, a in enumerate(result.agreement):
        print(f"Reference agreement {i}: exact match {a.exact_match}, first divergence {a.first_divergence}, "
              f"top-1 {a.top1_agreement}, mean |dlogprob| {a.mean_abs_dlogprob}, max |dlogprob| {a.max_abs_dlogprob}"
              + (f", error {a.error}" if a.error else ""))
    print("***Reference Agreement***")
    print(json.dumps(result.agreement_overall, indent=4))


# ---- --perf -------------------------------------------------------------------------------------------------
def perf_info(result: PerfResult) -> dict[str, object]:
    info: dict[str, object] = seed_perf_info(result.summary)
    if result.cpu_threads is not None:
        info["cpu_threads"] = result.cpu_threads
    return info


def print_perf(plan: Plan, result: PerfResult, info: dict) -> None:
    s, vision = result.summary, plan.inputs.vision
    print("***Perf Info***")
    print(json.dumps(info, indent=4))
    rows = [("TTFT (ms)", s["ttft_ms"]), ("TPOT (ms)", s["tpot_ms"]), ("inter-token latency (ms)", s["itl_ms"])]
    print(f"{'':26}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, d in rows:
        print(f"{name:26}{d['mean']:10.2f}{d['p50']:10.2f}{d['p90']:10.2f}{d['p99']:10.2f}")
    print(f"prefill throughput: {s['prefill_tokens_per_second']:.1f} prompt tokens/s; "
          f"decode throughput (whole batch): {s['decode_tokens_per_second']:.1f} tokens/s")
    blocks = "n/a" if s["kv_blocks_total"] is None else f"{s['peak_kv_blocks_used']} of {s['kv_blocks_total']}"
    print(f"tokens per request: {s['image_tokens_per_request']} {vision} + {s['text_tokens_per_request']} text; "
          f"KV-cache blocks used at peak: {blocks}; "
          + (f"recurrent state: {s['recurrent_state_gib'] * 1024:.1f} MiB; " if s.get("recurrent_state_gib") else "")
          + f"peak memory: {s['peak_memory_gib']:.2f} GiB; preemptions: {s['preemptions']}; prefix-cache hits: "
          + ("off" if s["prefix_cache_hit_rate"] is None else f"{s['prefix_cache_hit_rate']:.1%} of prompt tokens"))
    if result.cpu_threads is not None:
        print(plan.platform.threads_line())


# the raw figure each of the seed's keys is printed from: the CSV holds each figure once, as a number
_SEED_FIGURES = ("wall_seconds", "latency_per_token_s", "requests_per_s", "output_tokens_per_s", "prefill_latency_s",
                 "decode_latency_s")


def csv_figures(summary: dict, info: dict) -> dict[str, object]:
    """The seed's keys as numbers in the unit `***Perf Info***` prints (ms, requests/s, tokens/s), then the other
    figures."""
    seed = {key: float(value.split()[0]) if isinstance(value, str) else value for key, value in info.items()}
    return {**seed, **flatten({k: v for k, v in summary.items() if k not in _SEED_FIGURES})}


def perf_settings(plan: Plan) -> dict[str, object]:
    spec, config, engine = plan.spec, plan.config, plan.spec.engine
    synthetic_video = plan.inputs.synthetic_video
    return {
        "mode": "perf", "model": plan.model, "model_type": config.model_type, "device": str(config.device),
        "dtype": str(config.dtype).removeprefix("torch."), "tensor_parallel_size": engine.tensor_parallel_size,
        "max_model_len": config.max_model_len, "input_len": spec.input_len, "output_len": spec.output_len,
        "num_prompts": spec.num_prompts, "batch_size": config.max_num_seqs, "block_size": engine.block_size,
        "enforce_eager": engine.enforce_eager, "enable_prefix_caching": config.prefix_caching and engine.backend == "engine",
        "load_format": engine.load_format, "num_iters": spec.num_iters,
        "seed": engine.seed, "input_image": ";".join(spec.images) or ("" if synthetic_video or spec.video else "black"),
        "mm_per_prompt": spec.mm_per_prompt,
        "input_vision_shape": ";".join(f"{h},{w}" for h, w in spec.vision_shapes),
        "input_video": spec.video or ("black" if synthetic_video else ""), "num_frames": spec.num_frames or "",
        "backend": engine.backend, "max_num_batched_tokens": config.max_num_batched_tokens,
        "num_kv_blocks": engine.num_kv_blocks if engine.num_kv_blocks is not None else "auto",
    }


# ---- --acc --------------------------------------------------------------------------------------------------
def print_acc(result: AccResult) -> None:
    for failure in result.failures:
        print(failure, file=sys.stderr)
    print("***Acc Info***")
    print(json.dumps(result.info, indent=4))
    if result.agreement is None:
        return
    print("reference agreement per sample (exact match, first divergence, top-1 agreement, mean/max |Δ log-prob|):")
    for row in result.agreement["per_sample"]:
        if row["error"]:
            print(f"  {row['id']}: not compared ({row['error']})")
        else:
            print(f"  {row['id']}: {'yes' if row['exact_match'] else 'no'}, {row['first_divergence']}, "
                  f"{row['top1_agreement']:.4f}, {row['mean_abs_dlogprob']:.2e}/{row['max_abs_dlogprob']:.2e}")


def acc_settings(plan: Plan) -> dict[str, object]:
    spec, config = plan.spec, plan.config
    return {
        "mode": "acc", "model": plan.model, "model_type": config.model_type, "device": str(config.device),
        "dtype": str(config.dtype).removeprefix("torch."), "dataset": spec.dataset,
        "dataset_format": spec.dataset_format or "auto", "num_prompts": spec.limit or "all",
        "batch_size": config.max_num_seqs, "output_len": plan.inputs.output_len,
        "max_model_len": config.max_model_len, "seed": spec.engine.seed,
        "reference": "hf" if spec.reference else "none", "backend": spec.engine.backend,
        "enable_prefix_caching": config.prefix_caching and spec.engine.backend == "engine",
        **({"num_frames": spec.num_frames, "video_dir": spec.video_dir or "beside the dataset"}
           if any(s.videos for s in plan.inputs.samples) else {}),
        **({"image_dir": spec.image_dir} if spec.image_dir else {}),
    }


# ---- the files ----------------------------------------------------------------------------------------------
def flatten(summary: dict, prefix: str = "") -> dict[str, object]:
    """Nested figures as the CSV's Key,Value rows: keys joined by "_", floats to 4 places, None as "n/a"."""
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}_"))
        else:
            flat[prefix + key] = "n/a" if value is None else round(value, 4) if isinstance(value, float) else value
    return flat


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
        except UserError as e:  # its name was taken meanwhile
            failed.append(f"{what} ({e})")
    if failed:
        raise UserError(f"could not write {' or '.join(failed)}; the figures printed above are complete")
