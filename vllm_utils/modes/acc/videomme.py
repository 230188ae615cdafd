"""Video-MME as published (`lmms-lab/Video-MME`): a parquet of questions (`videoID`, `question`, `options` as
"A. ..." lines, `answer` a letter, `duration` short/medium/long, `domain`, ...) and a folder of the videos it names
(`data/<videoID>.mp4` once the dataset's `videos_chunked_*.zip` are unzipped beside `videomme/`). The prompt is
the benchmark's own without subtitles, and a reply is scored by the letter its evaluation script extracts."""
import ast
import os
import re

from vllm_utils.errors import UserError
from vllm_utils.modes.acc.sample import Sample

NEEDS = ["videoID", "question", "options", "answer", "duration"]
DURATIONS = ("short", "medium", "long")
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv")  # the files lmms-eval looks for, in its order
INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
               "Respond with only the letter (A, B, C, or D) of the correct option.")
ANSWER_CUE = "The best answer is:"
# as the benchmark's `eval_your_results.py` lists them, two pairs run together by missing commas
_ANSWER_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
                    "The best option isThe correct option is", "Best answer:Best option:"]
VIDEO_FIX = ("put the dataset's videos in --video-dir (its videos_chunked_*.zip unzipped: data/<videoID>.mp4) or "
             "leave the question out")


def video_folder(dataset: str, given: str | None) -> str:
    """--video-dir, else the `data` folder the videos unzip to: beside the parquet's `videomme/` folder, or in the
    --dataset folder."""
    if given is not None:
        if not os.path.isdir(given):
            raise UserError(f"--video-dir '{given}' is not a folder; pass the folder holding Video-MME's "
                            f"<videoID>.mp4 files")
        return given
    base = dataset if os.path.isdir(dataset) else os.path.dirname(os.path.abspath(dataset))
    for candidate in (os.path.join(base, "data"), os.path.join(os.path.dirname(os.path.abspath(base)), "data")):
        if os.path.isdir(candidate):
            return candidate
    raise UserError(f"--dataset '{dataset}' is Video-MME and no 'data' folder of its videos lies beside it; unzip "
                    f"its videos_chunked_*.zip there, or pass --video-dir")


def video_file(folder: str, video_id: str) -> str:
    """The video's file: .mp4, else .MP4 or .mkv where only those exist (the .mp4 path when none does)."""
    paths = [os.path.join(folder, video_id + suffix) for suffix in VIDEO_SUFFIXES]
    return next((p for p in paths if os.path.isfile(p)), paths[0])


def prompt(question: str, options: list[str]) -> str:
    return "\n".join([INSTRUCTION, question, *options, ANSWER_CUE])


def adapter(folder: str):
    """Row -> Sample, with the row's video in `folder`."""
    def adapt(row: dict, i: int, base: str) -> Sample:
        rid = str(row.get("question_id") or f"{row['videoID']}-{i}")
        options = row["options"]
        if isinstance(options, str):
            try:
                options = ast.literal_eval(options)
            except (ValueError, SyntaxError):
                options = None
        if not isinstance(options, (list, tuple)) or not options:
            raise UserError(f"row {i} (id {rid}): column 'options' is not a list of 'A. ...' lines")
        duration = str(row["duration"])
        return Sample(rid, i, prompt(row["question"], [str(o) for o in options]), [], [str(row["answer"]).strip()],
                      "videomme", [str(o) for o in options], row.get("domain"), base,
                      videos=[video_file(folder, str(row["videoID"]))], extra={"duration": duration})
    return adapt


def extract_letter(reply: str) -> str:
    """The letter Video-MME's evaluation reads from a reply: the first capital A-D once its answer phrases are
    removed, wherever it stands (the "A" of "After" too, as there); "" where there is none."""
    for prefix in _ANSWER_PREFIXES:
        reply = reply.replace(prefix, "")
    found = re.search(r"[ABCD]", reply)
    return found[0] if found else ""


def by_duration(results: list) -> dict[str, float | None] | None:
    """Accuracy per video length (short, medium, long; others after them), over the questions that ran."""
    durations = {r.sample.extra.get("duration") for r in results} - {None}
    if not durations:
        return None
    order = [d for d in DURATIONS if d in durations] + sorted(durations - set(DURATIONS))
    scores = {d: [r.score for r in results if r.sample.extra.get("duration") == d and r.score is not None]
              for d in order}
    return {d: sum(s) / len(s) if s else None for d, s in scores.items()}
