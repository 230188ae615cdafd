"""The `--acc` figures: the score overall, per subject, per metric and per a dataset's own grouping (Video-MME's
duration), the failed samples, and the reference agreement, as `***Acc Info***` holds them (like `--perf`'s `***Perf Info***`)."""

from vllm_utils.modes.acc.scorers import NO_LETTER

METRIC_NAMES = {"rouge": "rougeL_f", "choice": "accuracy", "vqa": "vqa_accuracy", "anls": "anls",
                "open": "open_match", "videomme": "accuracy", "ocr": "f1"}


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
    info.update(by_extra(results))
    if any(r.sample.metric == "videomme" for r in results):  # the official figure leaves these out
        info["num_no_letter"] = sum(r.parsed == NO_LETTER for r in results)
    measured = [r.measures for r in scored if r.measures]
    if measured:  # OCR: each measure's mean, as Fox's evaluation averages them (edit_distance: lower is better)
        info["ocr"] = {name: _mean([m[name] for m in measured if m.get(name) is not None]) for name in measured[0]}
    if agreement is not None:
        info["reference"] = agreement["overall"]
    return info


def by_extra(results: list) -> dict[str, dict[str, float | None]]:
    """The score per value of each field a dataset groups its figures by (`Sample.extra`, e.g. Video-MME's
    duration: `by_duration`), values in the dataset's order, over the samples that ran."""
    groups: dict[str, dict[str, list[float]]] = {}
    for r in results:
        for key, value in r.sample.extra.items():
            scores = groups.setdefault(key, {}).setdefault(value, [])
            if r.score is not None:
                scores.append(r.score)
    return {f"by_{key}": {value: _mean(scores) for value, scores in values.items()} for key, values in groups.items()}
