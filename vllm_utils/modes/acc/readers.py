"""Dataset files -> `Sample`s: a Hugging Face dataset as published (a folder of parquet or arrow files, a
`save_to_disk` folder, or one such file), read with the `datasets` library, a simple JSONL, or one of Fox's JSON
files. One adapter per format turns a row into a question, its images and its references."""
import ast
import glob
import json
import os
import re

from vllm_utils.modes.acc.sample import SHORT_ANSWER, Sample, has_image
from vllm_utils.modes.acc import fox, videomme
from vllm_utils.modes.acc.scorers import choice_letters, render_choices
from vllm_utils.errors import UserError

FORMATS = ("jsonl", "llava-bench", "mmmu", "textvqa", "docvqa", "videomme", "fox")
MMMU_IMAGES = [f"image_{i}" for i in range(1, 8)]
_NEEDS = {  # the columns each format reads (one of the names in a tuple)
    "llava-bench": ["question_id", "question", "image", ("answer", "gpt_answer")],
    "mmmu": ["id", "question", "options", "answer", "question_type", "image_1"],
    "textvqa": ["question_id", "question", "image", "answers"],
    "docvqa": ["questionId", "question", "image", "answers"],
    "videomme": videomme.NEEDS,
}


def read_dataset(path: str, fmt: str | None = None, split: str | None = None, limit: int | None = None,
                 video_dir: str | None = None, image_dir: str | None = None) -> list[Sample]:
    """The first `limit` rows of the dataset at `path` (all when None); one-line UserErrors for bad input.
    `video_dir`: where Video-MME's videos are (default: its `data` folder); `image_dir`: Fox's pictures."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown --dataset-format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise UserError(f"--dataset '{path}' does not exist; pass a dataset folder, a parquet/arrow file, a JSONL "
                        f"or a Fox JSON file")
    if fmt == "fox" and not fox.is_fox(path):
        raise UserError(f"--dataset-format fox reads one of Fox's JSON files (e.g. en_page_ocr.json), and "
                        f"'{path}' is not one")
    if fox.is_fox(path) and fmt not in (None, "fox"):
        raise UserError(f"--dataset '{path}' is a JSON file, which only the fox format reads: leave "
                        f"--dataset-format out")
    if image_dir is not None and not fox.is_fox(path):
        raise UserError(f"--image-dir holds Fox's pictures, and --dataset '{path}' is not a Fox file: drop "
                        f"--image-dir")
    if fox.is_fox(path):
        if video_dir is not None:
            raise UserError("--video-dir holds Video-MME's videos, and a Fox file reads none: drop --video-dir")
        samples = fox.read_fox(path, image_dir, limit)
        if not samples:
            raise UserError(f"--dataset '{path}' holds no rows")
        return samples
    if fmt not in (None, "jsonl") and path.endswith(".jsonl"):
        raise UserError(f"--dataset-format {fmt} reads parquet/arrow files or a dataset folder, and '{path}' is a "
                        f"JSONL: leave --dataset-format out, or pass a {fmt} dataset (e.g. --dataset sample-{fmt})")
    if fmt == "jsonl" or (fmt is None and path.endswith(".jsonl")):
        fmt = "jsonl"
        samples = read_jsonl(path, limit)
    else:
        table = load_table(path, split)
        fmt = fmt or detect_format(path, table.column_names)
        check_columns(table.column_names, fmt, path)
        table = _undecoded_images(table).select(range(min(len(table), limit or len(table))))
        base = path if os.path.isdir(path) else os.path.dirname(path)
        adapt = videomme.adapter(videomme.video_folder(path, video_dir)) if fmt == "videomme" else ADAPTERS[fmt]
        samples = [adapt(row, i, base) for i, row in enumerate(table)]
    if video_dir is not None and fmt != "videomme":
        raise UserError(f"--video-dir holds Video-MME's videos, and --dataset '{path}' is a {fmt} dataset, which "
                        f"reads none: drop --video-dir")
    if not samples:
        raise UserError(f"--dataset '{path}' holds no rows")
    return samples


def load_table(path: str, split: str | None):
    try:
        import datasets
    except ImportError:
        raise UserError("reading Hugging Face datasets needs the `datasets` package: pip install "
                        "'vllm_utils[acc]'") from None
    datasets.disable_progress_bars()
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_dict.json")):
        table = datasets.load_from_disk(path)
        return table[_pick_split(list(table), split, path)]
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json")):
        return datasets.load_from_disk(path)
    files = [path] if os.path.isfile(path) else sorted(
        glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
        or glob.glob(os.path.join(path, "**", "*.arrow"), recursive=True))
    if not files:
        raise UserError(f"--dataset '{path}' holds no .parquet or .arrow files (nor a save_to_disk dataset)")
    if os.path.isdir(path):
        by_split = {}
        for f in files:
            by_split.setdefault(os.path.basename(f).split("-")[0].split(".")[0], []).append(f)
        files = by_split[_pick_split(list(by_split), split, path)]
    kind = "parquet" if files[0].endswith(".parquet") else "arrow"
    try:
        return datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as e:  # a corrupt file or files whose columns differ: say which folder
        first_line = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"cannot read --dataset '{path}' ({type(e).__name__}: {first_line})") from None


def _pick_split(splits: list[str], wanted: str | None, path: str) -> str:
    """`--dataset-split`, else `validation`, else the only split there is."""
    if wanted is not None:
        if wanted not in splits:
            raise UserError(f"--dataset '{path}' has no split '{wanted}' (it has {', '.join(sorted(splits))})")
        return wanted
    if "validation" in splits or len(splits) == 1:
        return "validation" if "validation" in splits else splits[0]
    raise UserError(f"--dataset '{path}' holds the splits {', '.join(sorted(splits))}; pick one with --dataset-split")


def detect_format(path: str, columns: list[str]) -> str:
    cols = set(columns)
    if {"videoID", "options"} <= cols:
        return "videomme"
    if {"options", "question_type"} <= cols:
        return "mmmu"
    if "questionId" in cols:
        return "docvqa"
    if "answers" in cols and "question_id" in cols:
        return "textvqa"
    if "question_id" in cols and cols & {"answer", "gpt_answer"}:
        return "llava-bench"
    raise UserError(f"cannot tell the format of --dataset '{path}' from its columns ({', '.join(columns)}); "
                    f"pass --dataset-format ({', '.join(FORMATS)})")


def check_columns(columns: list[str], fmt: str, path: str) -> None:
    for need in _NEEDS[fmt]:
        names = need if isinstance(need, tuple) else (need,)
        if not set(names) & set(columns):
            raise UserError(f"--dataset '{path}' has no column '{names[0]}', which the {fmt} format needs "
                            f"(columns: {', '.join(columns)})")


def _undecoded_images(table):
    """Image features as {bytes, path} dicts: each picture is decoded when its sample runs, so that a bad one
    fails that sample alone."""
    import datasets

    for name, feature in table.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            table = table.cast_column(name, datasets.Image(decode=False))
    return table


def _image(row: dict, column: str, i: int, row_id: str) -> list:
    if not has_image(row.get(column)):
        raise UserError(f"row {i} (id {row_id}) has no image in column '{column}'")
    return [row[column]]


def _llava_bench(row: dict, i: int, base: str) -> Sample:
    rid = str(row["question_id"])
    answer = row.get("answer") if row.get("answer") is not None else row.get("gpt_answer")
    return Sample(rid, i, row["question"], _image(row, "image", i, rid), [answer or ""], "rouge",
                  subject=row.get("category"), base_dir=base)


def _mmmu(row: dict, i: int, base: str) -> Sample:
    rid = str(row["id"])
    subject = "_".join(rid.split("_")[1:-1]) or None  # validation_Art_Theory_12 -> Art_Theory
    options = _literal_list(row["options"], i, rid, "options")
    text_all = row["question"] + " ".join(options)
    mentioned = sorted({int(n) for n in re.findall(r"<image (\d)>", text_all)})
    columns = [f"image_{n}" for n in mentioned] or [c for c in MMMU_IMAGES if has_image(row.get(c))][:1]
    images = [img for c in columns for img in _image(row, c, i, rid)] if columns else _image(row, "image_1", i, rid)
    if row["question_type"] == "multiple-choice" and options:
        return Sample(rid, i, render_choices(row["question"], options), images, [row["answer"].strip()], "choice",
                      options, subject, base)
    answers = _literal_list(row["answer"], i, rid, "answer") if row["answer"].startswith("[") else [row["answer"]]
    return Sample(rid, i, f"{row['question']}\n\n{SHORT_ANSWER}", images, answers, "open", None, subject, base)


def _literal_list(value, i: int, rid: str, column: str) -> list[str]:
    try:
        items = ast.literal_eval(value) if isinstance(value, str) else value
        return [str(x) for x in items]
    except (ValueError, SyntaxError, TypeError):
        raise UserError(f"row {i} (id {rid}): column '{column}' is not a list ({str(value)[:60]!r})") from None


def _short_answer(metric: str, id_column: str):
    def adapt(row: dict, i: int, base: str) -> Sample:
        rid = str(row[id_column])
        if not row.get("answers"):
            raise UserError(f"row {i} (id {rid}) has no answers in column 'answers' (a test split? use validation)")
        return Sample(rid, i, f"{row['question']}\n{SHORT_ANSWER}", _image(row, "image", i, rid),
                      [str(a) for a in row["answers"]], metric, base_dir=base)
    return adapt


ADAPTERS = {"llava-bench": _llava_bench, "mmmu": _mmmu, "textvqa": _short_answer("vqa", "question_id"),
            "docvqa": _short_answer("anls", "questionId")}


def read_jsonl(path: str, limit: int | None = None) -> list[Sample]:
    """One JSON object a line: `image` (a path relative to the file) or `images` (a list of them), `question`,
    `answer` or `answers`, optional `choices` (then the answer is a letter or an option's text), `id`, `subject`,
    and `metric` (rouge, choice, vqa or anls; default: choice with choices, else rouge)."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(samples) >= limit:
                break
            if line.strip():
                samples.append(_jsonl_row(line, number, len(samples), os.path.dirname(os.path.abspath(path))))
    return samples


def _jsonl_row(line: str, number: int, i: int, base: str) -> Sample:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"line {number} of the JSONL is not JSON ({e.msg})") from None
    rid = str(row.get("id", number))
    where = f"line {number} (id {rid})"
    images = row.get("images", [row["image"]] if "image" in row else None)
    if not images or not all(has_image(x) for x in images):
        raise UserError(f"{where} has no image: give 'image' (a path relative to the file) or 'images'")
    if "question" not in row:
        raise UserError(f"{where} has no 'question'")
    answers = row.get("answers", [row["answer"]] if "answer" in row else None)
    if not answers:
        raise UserError(f"{where} has no 'answer' (or 'answers')")
    choices = row.get("choices")
    metric = row.get("metric", "choice" if choices else "rouge")
    if metric not in ("rouge", "choice", "vqa", "anls") or (metric == "choice") != bool(choices):
        raise UserError(f"{where}: metric '{metric}' needs choices exactly when it is 'choice' (metrics: rouge, "
                        f"choice, vqa, anls)")
    text = row["question"]
    if choices:
        letters = choice_letters(len(choices))
        answers = [letters[choices.index(answers[0])] if answers[0] in choices else str(answers[0]).strip()]
        if answers[0] not in letters:
            raise UserError(f"{where}: answer '{answers[0]}' is neither a letter {letters[0]}-{letters[-1]} nor "
                            f"one of the choices")
        text = render_choices(text, choices)
    return Sample(rid, i, text, list(images), [str(a) for a in answers], metric, choices, row.get("subject"), base)
