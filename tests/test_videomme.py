"""--acc on Video-MME: the benchmark's letter extraction, its published layout read (the parquet, the videos beside
it or in --video-dir), and the mode end to end on the bundled sample against HF (a Qwen2-VL here; the LLaVA video
families in test_llava_video.py), with a missing video failing its questions alone."""
import json
import re
import shutil
from types import SimpleNamespace

import pytest

from vllm_utils.errors import UserError
from vllm_utils.modes.acc.bundled import ACC_SAMPLES
from vllm_utils.modes.acc.readers import read_dataset
from vllm_utils.modes.acc.scorers import NO_LETTER, extract_letter
from vllm_utils.modes.acc.videomme import ANSWER_CUE, INSTRUCTION

from test_cli import cli, error_lines

SAMPLE = ACC_SAMPLES["sample-videomme"]


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("The best answer is: C.", "C"), ("(D) It stays still.", "D"), ("The answer is A", "A"),
    ("b", ""), ("none of these", ""),
    ("After the circle moves, C", "A"),  # the first capital A-D wherever it stands, as the benchmark's script reads
    ("Best option: D", "B"),  # its list runs "Best answer:" and "Best option:" together, so neither is removed
    ("The best option isThe correct option is C", "C"),
])
def test_the_letter_is_the_one_video_mmes_evaluation_extracts(reply, letter):
    assert extract_letter(reply) == letter


def test_the_bundled_sample_reads_in_its_published_layout():
    samples = read_dataset(SAMPLE)
    assert len(samples) == 6 and {s.metric for s in samples} == {"videomme"}
    first = samples[0]
    assert first.videos and all(path.endswith(".mp4") for s in samples for path in s.videos)
    lines = first.text.split("\n")
    assert lines[0] == INSTRUCTION and lines[-1] == ANSWER_CUE and lines[2:6] == first.choices
    assert [line[:2] for line in first.choices] == ["A.", "B.", "C.", "D."] and first.references[0] in "ABCD"
    assert {s.extra["duration"] for s in samples} == {"short", "medium", "long"}


def test_videos_elsewhere_need_video_dir(tmp_path):
    shutil.copytree(f"{SAMPLE}/videomme", tmp_path / "questions" / "videomme")
    shutil.copytree(f"{SAMPLE}/data", tmp_path / "clips")
    with pytest.raises(UserError, match="no 'data' folder of its videos lies beside it; .* pass --video-dir"):
        read_dataset(str(tmp_path / "questions"))
    samples = read_dataset(str(tmp_path / "questions"), video_dir=str(tmp_path / "clips"))
    assert all(path.startswith(str(tmp_path / "clips")) for s in samples for path in s.videos)
    parquet = next((tmp_path / "questions" / "videomme").glob("*.parquet"))
    shutil.move(tmp_path / "clips", tmp_path / "questions" / "data")
    beside = [s.videos for s in read_dataset(str(tmp_path / "questions"))]
    assert [s.videos for s in read_dataset(str(parquet))] == beside and beside[0][0].startswith(str(tmp_path))


def copy_with(tmp_path, change) -> str:
    """The bundled sample copied to tmp_path/vmme with `change(rows)` applied to its questions."""
    import datasets

    shutil.copytree(SAMPLE, tmp_path / "vmme")
    parquet = next((tmp_path / "vmme" / "videomme").glob("*.parquet"))
    rows = datasets.load_dataset("parquet", data_files=str(parquet), split="train").to_list()
    change(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    return str(tmp_path / "vmme")


@pytest.mark.parametrize("column, value, message", [
    ("question", None, "row 1 (id 001-2) has no 'question'"),
    ("answer", "E", "row 1 (id 001-2): answer 'E' is not the letter of one of its 4 options (A-D)"),
    ("answer", None, "row 1 (id 001-2): answer '' is not the letter"),
])
def test_a_row_the_benchmark_cannot_score_is_refused(tmp_path, column, value, message):
    folder = copy_with(tmp_path, lambda rows: rows[1].update({column: value}))
    with pytest.raises(UserError, match=re.escape(message)):
        read_dataset(folder)


def test_without_durations_it_is_still_video_mme_and_reports_none(tmp_path):
    folder = copy_with(tmp_path, lambda rows: [row.pop("duration") for row in rows])
    samples = read_dataset(folder)
    assert {s.metric for s in samples} == {"videomme"} and all(s.extra == {} for s in samples)


def test_an_unrelated_data_folder_above_the_dataset_is_not_taken_for_its_videos(tmp_path):
    shutil.copytree(f"{SAMPLE}/videomme", tmp_path / "nest" / "vmme" / "videomme")
    (tmp_path / "nest" / "data").mkdir()
    with pytest.raises(UserError, match="no 'data' folder of its videos"):
        read_dataset(str(tmp_path / "nest" / "vmme"))


def test_accuracy_per_duration_is_over_the_questions_that_ran():
    from vllm_utils.modes.acc.run import Result
    from vllm_utils.modes.acc.summary import acc_info

    samples = read_dataset(SAMPLE)
    scores = [1.0, 0.0, None, 1.0, 1.0, 0.0]  # the third failed
    parsed = ["A", NO_LETTER, None, "B", "C", NO_LETTER]
    results = [Result(s, score=x, parsed=p, error=None if x is not None else "gone")
               for s, x, p in zip(samples, scores, parsed)]
    info = acc_info("sample-videomme", results, None)
    expected = {}
    for s, x in zip(samples, scores):
        if x is not None:
            expected.setdefault(s.extra["duration"], []).append(x)
    assert list(info["by_duration"]) == ["short", "medium", "long"]
    assert info["by_duration"] == {d: sum(v) / len(v) for d, v in expected.items()}
    assert info["score"] == 3 / 5 and info["num_failed"] == 1 and info["metric"] == "accuracy"
    assert info["num_no_letter"] == 2


@pytest.mark.parametrize("tiny_qwen", ["qwen2_vl"], indirect=True)
def test_replies_are_scored_by_their_letter_through_the_mode(tiny_qwen, tiny_qwen_plan):
    """The mode's loop on replies written for the sample: the right letter, a wrong one, none."""
    from vllm_utils.modes.acc import run as acc

    plan = tiny_qwen_plan
    samples = plan.inputs.samples
    wrong = {"A": "B", "B": "C", "C": "D", "D": "A"}
    replies = [f"The best answer is: {samples[0].references[0]}", wrong[samples[1].references[0]],
               "no idea", f"({samples[3].references[0]})", samples[4].references[0], wrong[samples[5].references[0]]]

    class Replies:  # a backend answering as written
        def generate(self, requests, params, use_tqdm=False):
            texts = iter(replies[len(done):])
            out = [SimpleNamespace(outputs=[SimpleNamespace(text=next(texts), token_ids=[1])]) for _ in requests]
            done.extend(out)
            return out

    done: list = []
    result = acc.run(plan, Replies())
    assert [r["score"] for r in result.records] == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert [r["parsed"] for r in result.records][2] == NO_LETTER and result.info["num_no_letter"] == 1
    assert result.info["score"] == 0.5 and result.info["by_duration"] == {"short": 0.5, "medium": 0.5, "long": 0.5}


@pytest.fixture
def tiny_qwen_plan(request, tmp_path):
    """The plan of `--acc --dataset sample-videomme` on a tiny Qwen2-VL, batches of 4."""
    from vllm_utils.benchmark_vision_language import build_parser, given_flags
    from vllm_utils.modes.plan import make_plan
    from vllm_utils.modes.spec import spec_from_args

    model = request.getfixturevalue("tiny_qwen")
    argv = ["--acc", f"--model={model}", "--device=cpu", "--dataset=sample-videomme", "--batch-size=4",
            "--no-save-result", "--num-frames=4"]
    return make_plan(spec_from_args(build_parser().parse_args(argv), given_flags(argv)))


def run_videomme(model: str, tmp_path, *args: str) -> tuple[dict, list[dict], object]:
    """--acc on the bundled Video-MME sample with the HF reference, fp32: the Acc Info, the records, the run."""
    out = tmp_path / "records.jsonl"
    run = cli("--acc", f"--model={model}", "--device=cpu", "--dtype=float32", "--dataset=sample-videomme",
              "--reference=hf", "--num-frames=6", f"--save-output={out}", "--no-save-result", *args, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    return info, [json.loads(line) for line in out.read_text().splitlines()], run


def check_agrees_with_hf(info: dict, records: list[dict]) -> None:
    """Scores of random models are 0 whatever the code does: what this run shows is the agreement."""
    ref = info["reference"]
    assert ref["samples_compared"] == 6 and ref["exact_match_rate"] == 1.0 and ref["max_abs_dlogprob"] < 1e-4
    assert len({r["answer"] for r in records}) > 3  # the replies differ with the video and the question
    assert list(info["by_duration"]) == ["short", "medium", "long"] and info["num_scored"] == 6


@pytest.mark.parametrize("tiny_qwen", ["qwen2_vl"], indirect=True)
def test_video_mme_sample_agrees_with_hf(tiny_qwen, tmp_path):
    info, records, _ = run_videomme(tiny_qwen, tmp_path)
    check_agrees_with_hf(info, records)


@pytest.mark.parametrize("tiny_qwen", ["qwen2_vl"], indirect=True)
def test_a_missing_video_fails_its_questions_and_the_rest_are_scored(tiny_qwen, tmp_path):
    shutil.copytree(SAMPLE, tmp_path / "vmme")
    (tmp_path / "vmme" / "data" / "synthColour02.mp4").unlink()
    out = tmp_path / "records.jsonl"
    run = cli("--acc", f"--model={tiny_qwen}", "--device=cpu", f"--dataset={tmp_path / 'vmme'}", "--output-len=2",
              f"--save-output={out}", "--no-save-result", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    failed = [line for line in run.stderr.splitlines() if "failed" in line]
    assert len(failed) == 2 and all("synthColour02.mp4' does not exist" in line for line in failed)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] is None for r in records] == [False, False, True, True, False, False]
    assert '"num_scored": 4' in run.stdout and '"num_failed": 2' in run.stdout


@pytest.mark.parametrize("tiny_qwen", ["qwen2_vl"], indirect=True)
def test_each_video_is_decoded_once_for_its_questions(tiny_qwen, tmp_path, monkeypatch):
    """Batches of 3 split the second video's two questions: its frames are still decoded once."""
    from vllm_utils.multimodal import video

    decoded = []
    load = video.load_video
    monkeypatch.setattr(video, "load_video", lambda path, *a, **k: decoded.append(path) or load(path, *a, **k))
    run = cli("--acc", f"--model={tiny_qwen}", "--device=cpu", "--dataset=sample-videomme", "--output-len=1",
              "--batch-size=3", "--no-save-result", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert len(decoded) == 3 and len(set(decoded)) == 3


@pytest.mark.parametrize("args, message", [
    ([], "--dataset 'sample-videomme' holds videos: llava models take no video; use a video model"),
    (["--dataset=sample-jsonl", "--num-frames=4"], "--num-frames samples the videos of a dataset, and --dataset "
                                                   "'sample-jsonl' has none: drop --num-frames"),
    (["--dataset=sample-jsonl", "--video-dir=."], "--video-dir holds Video-MME's videos"),
    (["--video-dir=/nonexistent"], "--video-dir '/nonexistent' is not a folder"),
])
def test_video_mme_bad_input_is_one_line_before_loading(tiny_llava, tmp_path, args, message):
    run = cli("--acc", f"--model={tiny_llava}", "--device=cpu", "--dataset=sample-videomme", *args,
              cwd=str(tmp_path))
    assert run.returncode == 1 and "Loading" not in run.stderr, run.stderr
    assert len(error_lines(run)) == 1 and message in error_lines(run)[0], run.stderr
