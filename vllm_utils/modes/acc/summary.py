"""The `--acc` figures: the score overall, per subject and per metric, the failed samples, and the reference
agreement; printed as `***Acc Info***` and a JSON block, like `--perf`'s `***Perf Info***`."""
import json

METRIC_NAMES = {"rouge": "rougeL_f", "choice": "accuracy", "vqa": "vqa_accuracy", "anls": "anls",
                "open": "open_match"}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def acc_info(dataset: str, results: list, agreement: dict | None) -> dict:
    """`score`: the mean over the samples that ran (failed ones are counted in `num_failed`, not as 0)."""
    scored = [r for r in results if r.score is not None]
    metrics = sorted({r.sample.metric for r in results})
    info: dict[str, object] = {
        "dataset": dataset, "metric": METRIC_NAMES[metrics[0]] if len(metrics) == 1 else "mixed",
        "score": _mean([r.score for r in scored]), "num_samples": len(results), "num_scored": len(scored),
        "num_failed": len(results) - len(scored),
    }
    if len(metrics) > 1:
        info["by_metric"] = {METRIC_NAMES[m]: _mean([r.score for r in scored if r.sample.metric == m])
                             for m in metrics}
    subjects = sorted({r.sample.subject for r in results if r.sample.subject})
    if subjects:
        info["by_subject"] = {s: _mean([r.score for r in scored if r.sample.subject == s]) for s in subjects}
    if agreement is not None:
        info["reference"] = agreement["overall"]
    return info


def print_summary(info: dict, agreement: dict | None) -> None:
    print("***Acc Info***")
    print(json.dumps(info, indent=4))
    if agreement is None:
        return
    print("reference agreement per sample (exact match, first divergence, top-1 agreement, mean/max |Δ log-prob|):")
    for row in agreement["per_sample"]:
        if row["error"]:
            print(f"  {row['id']}: not compared ({row['error']})")
        else:
            print(f"  {row['id']}: {'yes' if row['exact_match'] else 'no'}, {row['first_divergence']}, "
                  f"{row['top1_agreement']:.4f}, {row['mean_abs_dlogprob']:.2e}/{row['max_abs_dlogprob']:.2e}")
