"""Video-MME as published (`lmms-lab/Video-MME`): a parquet of questions (`videoID`, `question`, `options` as
"A. ..." lines, `answer` a letter, `duration` short/medium/long, `domain`, ...) and a folder of the videos it names
(`data/<videoID>.mp4` once the dataset's `videos_chunked_*.zip` are unzipped beside `videomme/`). The prompt is
the benchmark's own without subtitles; a reply is scored by the letter its evaluation script extracts
(`scorers.extract_letter`)."""
import ast
import os

from vllm_utils.errors import UserError
from vllm_utils.modes.acc.sample import Sample
from vllm_utils.modes.acc.scorers import choice_letters

NEEDS = ["videoID", "question", "options", "answer"]  # and `duration`, for the accuracy per video length
VIDEO_SUFFIXES = (".mp4", ".MP4", ".mkv")  # the files lmms-eval looks for, in its order
INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
               "Respond with only the letter (A, B, C, or D) of the correct option.")
ANSWER_CUE = "The best answer is:"


def video_folder(dataset: str, given: str | None) -> str:
    """--video-dir, else the `data` folder the videos unzip to: in the --dataset folder, or beside the `videomme/`
    folder (or the parquet file's folder) given as --dataset."""
    if given is not None:
        if not os.path.isdir(given):
            raise UserError(f"--video-dir '{given}' is not a folder; pass the folder holding Video-MME's "
                            f"<videoID>.mp4 files")
        return given
    base = os.path.abspath(dataset if os.path.isdir(dataset) else os.path.dirname(os.path.abspath(dataset)))
    candidates = [os.path.join(base, "data")]
    if os.path.isfile(dataset) or os.path.basename(base) == "videomme":
        candidates.append(os.path.join(os.path.dirname(base), "data"))
    for candidate in candidates:
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
    """Row -> Sample, with the row's video in `folder`; a row the benchmark could not score is refused."""
    def adapt(row: dict, i: int, base: str) -> Sample:
        rid = str(row.get("question_id") or f"{row.get('videoID')}-{i}")
        where = f"row {i} (id {rid})"
        for column in ("videoID", "question"):
            if not isinstance(row.get(column), str) or not row[column].strip():
                raise UserError(f"{where} has no '{column}'")
        options = _options(row["options"])
        if not options:
            raise UserError(f"{where}: column 'options' is not a list of 'A. ...' lines")
        letters = choice_letters(len(options))
        answer = str(row["answer"]).strip() if row.get("answer") is not None else ""
        if answer not in letters:
            raise UserError(f"{where}: answer '{answer}' is not the letter of one of its {len(options)} options "
                            f"({letters[0]}-{letters[-1]})")
        duration = row.get("duration")
        return Sample(rid, i, prompt(row["question"], options), [], [answer], "videomme", options, row.get("domain"),
                      base, videos=[video_file(folder, row["videoID"])],
                      extra={"duration": str(duration)} if duration is not None else {})
    return adapt


def _options(value) -> list[str]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return []
    return [str(o) for o in value] if isinstance(value, (list, tuple)) else []
