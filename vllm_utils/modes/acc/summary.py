"""The `--acc` figures: the score overall, per subject and per metric, the failed samples, and the reference
agreement, as `***Acc Info***` holds them (like `--perf`'s `***Perf Info***`)."""

from vllm_utils.modes.acc.videomme import by_duration

METRIC_NAMES = {"rouge": "rougeL_f", "choice": "accuracy", "vqa": "vqa_accuracy", "anls": "anls",
                "open": "open_match", "videomme": "accuracy"}


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
    durations = by_duration(results)
    if durations:
        info["by_duration"] = durations
    if agreement is not None:
        info["reference"] = agreement["overall"]
    return info
