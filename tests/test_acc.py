"""--acc: each scorer on worked examples of its dataset's evaluation, each reader on a file in its published
layout, the engine's prompt log-probs against HF, and the mode end to end with the reference agreement."""
import csv
import glob
import json
import os
import random

import pytest
import torch
from PIL import Image

from vllm_utils.modes.acc.agreement import agreement, overall
from vllm_utils.modes.acc.bundled import ACC_SAMPLES
from vllm_utils.modes.acc.readers import read_dataset
from vllm_utils.modes.acc.scorers import anls, parse_choice, rouge_l, vqa_accuracy
from vllm_utils.modes.acc.vqa_normalize import normalize_answer
from vllm_utils.errors import UserError
from vllm_utils.hf_reference import HFReference

from test_cli import cli, error_lines


# ---- scorers --------------------------------------------------------------------------------------------------
def lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


@pytest.mark.parametrize("reply, reference", [("the cat sat on the mat", "the cat is on the mat"),
                                              ("A red circle.", "a red circle on a white background"),
                                              ("nothing alike", "a red circle")])
def test_rouge_l_is_the_lcs_f_measure(reply, reference):
    r, p = reference.lower().replace(".", "").split(), reply.lower().replace(".", "").split()
    common = lcs(r, p)
    expected = 0.0 if common == 0 else 2 * (common / len(p)) * (common / len(r)) / (common / len(p) + common / len(r))
    assert rouge_l(reply, reference) == pytest.approx(expected)


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"), ("the dog", "dog"), ("A cat.", "cat"), ("dont", "don't"), ("1,000", "1000"), ("3.5", "3.5"),
    ("hot-dog", "hot dog"), ("yes!", "yes"), ("Ten\tapples\n", "10 apples"), ("it's red", "it 's red"),
])
def test_vqa_normalisation_cases(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_is_the_leave_one_out_mean():
    answers = ["red"] * 8 + ["red circle", "orange"]
    assert vqa_accuracy("Red.", answers) == pytest.approx(1.0)  # 7 or 8 matches among any other nine
    assert vqa_accuracy("orange", answers) == pytest.approx(9 * (1 / 3) / 10)  # matched by one of the others in 9
    assert vqa_accuracy("two", ["2", "2", "two", "3"]) == pytest.approx((2 / 3 * 3 + 1) / 4)
    assert vqa_accuracy("blue", answers) == 0.0


def test_anls_worked_examples():
    assert anls("4721", ["4721"]) == 1.0
    assert anls(" Invoice ", ["INVOICE"]) == 1.0
    assert anls("472", ["4721"]) == pytest.approx(0.75)  # one edit in four characters
    assert anls("4712", ["4721"]) == 0.0  # two edits in four: at the 0.5 threshold, no credit
    assert anls("38.5", ["$38.50", "38.50"]) == pytest.approx(0.8)  # the best of the answers


def test_mmmu_letter_parsing():
    choices = ["Red", "Blue", "Green", "Yellow"]
    rng = random.Random(0)
    assert parse_choice("(B)", choices, rng).letter == "B"
    assert parse_choice("The answer is C.", choices, rng).letter == "C"
    assert parse_choice("A or maybe D", choices, rng).letter == "D"  # the last one mentioned
    assert parse_choice("(A) is wrong, the answer is (C) surely", choices, rng).letter == "C"
    parsed = parse_choice("I think the colour is clearly blue here", choices, rng)
    assert (parsed.letter, parsed.guessed) == ("B", False)  # over five words: an option's text
    guess = parse_choice("no idea", choices, random.Random(1))
    assert guess.guessed and guess.letter == random.Random(1).choice(["A", "B", "C", "D"])


# ---- readers --------------------------------------------------------------------------------------------------
def png_bytes(colour: str) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_hf_parquet(rows: dict, features: dict, path) -> None:
    import datasets

    os.makedirs(os.path.dirname(path), exist_ok=True)
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(str(path))


def test_textvqa_parquet_as_published(tmp_path):
    import datasets

    S, L = datasets.Value("string"), datasets.Sequence(datasets.Value("string"))
    write_hf_parquet({"image_id": ["x"], "question_id": [7], "question": ["what colour?"],
                      "image": [{"bytes": png_bytes("red"), "path": None}], "answers": [["red"] * 10],
                      "ocr_tokens": [[]]},
                     {"image_id": S, "question_id": datasets.Value("int64"), "question": S,
                      "image": datasets.Image(), "answers": L, "ocr_tokens": L},
                     tmp_path / "data" / "validation-00000-of-00001.parquet")
    write_hf_parquet({"image_id": ["y"], "question_id": [8], "question": ["test?"],
                      "image": [{"bytes": png_bytes("blue"), "path": None}], "answers": [[]], "ocr_tokens": [[]]},
                     {"image_id": S, "question_id": datasets.Value("int64"), "question": S,
                      "image": datasets.Image(), "answers": L, "ocr_tokens": L},
                     tmp_path / "data" / "test-00000-of-00001.parquet")
    [sample] = read_dataset(str(tmp_path))  # the validation split, found by its file names
    assert (sample.id, sample.metric, sample.references) == ("7", "vqa", ["red"] * 10)
    assert sample.text == "what colour?\nAnswer the question using a single word or phrase."
    assert sample.load_images()[0].getpixel((0, 0)) == (255, 0, 0)


def test_plain_parquet_images_as_structs_and_docvqa(tmp_path):
    """A parquet written without HF's metadata: the image column is a {bytes, path} struct."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.array([{"bytes": png_bytes("green"), "path": None}],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"questionId": ["q1"], "question": ["total?"], "image": image, "answers": [["38", "$38"]]})
    pq.write_table(table, tmp_path / "validation.parquet")
    [sample] = read_dataset(str(tmp_path / "validation.parquet"))
    assert (sample.metric, sample.references) == ("anls", ["38", "$38"])
    assert sample.load_images()[0].getpixel((5, 5)) == (0, 128, 0)


def test_mmmu_subject_folders_and_llava_bench_save_to_disk(tmp_path):
    import datasets

    S, I = datasets.Value("string"), datasets.Image()
    features = {"id": S, "question": S, "options": S, "answer": S, "question_type": S,
                **{f"image_{i}": I for i in range(1, 8)}}
    for subject, colour in (("Art", "red"), ("Art_Theory", "blue")):
        row = {"id": [f"validation_{subject}_1"], "question": ["<image 2> and <image 1>: which colour?"],
               "options": ["['Red', 'Blue']"], "answer": ["A"], "question_type": ["multiple-choice"],
               "image_1": [{"bytes": png_bytes(colour), "path": None}],
               "image_2": [{"bytes": png_bytes("white"), "path": None}], **{f"image_{i}": [None] for i in range(3, 8)}}
        write_hf_parquet(row, features, tmp_path / "mmmu" / subject / "validation-00000-of-00001.parquet")
        write_hf_parquet(row, features, tmp_path / "mmmu" / subject / "dev-00000-of-00001.parquet")
    samples = read_dataset(str(tmp_path / "mmmu"))
    assert sorted(s.subject for s in samples) == ["Art", "Art_Theory"]
    assert all(s.metric == "choice" and s.references == ["A"] for s in samples)
    assert "(A) Red\n(B) Blue\n" in samples[0].text and samples[0].text.endswith("from the given choices directly.")
    assert len(samples[0].load_images()) == 2  # the images the question mentions

    bench = datasets.Dataset.from_dict({"question_id": ["0"], "question": ["Describe it."], "category": ["detail"],
                                        "image": [{"bytes": png_bytes("red"), "path": None}],
                                        "gpt_answer": ["A red square."]},
                                       features=datasets.Features({"question_id": S, "question": S, "category": S,
                                                                   "image": I, "gpt_answer": S}))
    datasets.DatasetDict({"train": bench}).save_to_disk(str(tmp_path / "bench"))
    [sample] = read_dataset(str(tmp_path / "bench"))
    assert (sample.metric, sample.references, sample.subject) == ("rouge", ["A red square."], "detail")


def test_jsonl_paths_relative_to_the_file(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / "a.png")
    rows = [{"image": "img/a.png", "question": "Colour?", "choices": ["blue", "red"], "answer": "red"},
            {"images": ["img/a.png"], "question": "Say it.", "answer": "red", "metric": "vqa", "id": "x"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = read_dataset(str(tmp_path / "d.jsonl"))
    assert (first.metric, first.references, first.id) == ("choice", ["B"], "1")
    assert (second.metric, second.id) == ("vqa", "x")
    assert read_dataset(str(tmp_path / "d.jsonl"), limit=1) == [first]


def test_bad_datasets_are_named_in_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"questionId": ["q1"], "question": ["total?"], "image": [None], "answers": [["1"]]}),
                   tmp_path / "noimage.parquet")
    with pytest.raises(UserError, match=r"row 0 \(id q1\) has no image in column 'image'"):
        read_dataset(str(tmp_path / "noimage.parquet"))
    pq.write_table(pa.table({"questionId": ["q1"], "image": [None], "answers": [["1"]]}), tmp_path / "nocol.parquet")
    with pytest.raises(UserError, match="no column 'question'"):
        read_dataset(str(tmp_path / "nocol.parquet"), "docvqa")
    pq.write_table(pa.table({"foo": [1]}), tmp_path / "unknown.parquet")
    with pytest.raises(UserError, match="cannot tell the format"):
        read_dataset(str(tmp_path / "unknown.parquet"))
    with pytest.raises(UserError, match="unknown --dataset-format 'coco'"):
        read_dataset(str(tmp_path / "unknown.parquet"), "coco")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no rows"):
        read_dataset(str(tmp_path / "empty.jsonl"))
    (tmp_path / "missing.jsonl").write_text(json.dumps({"image": "gone.png", "question": "q", "answer": "a"}) + "\n")
    [sample] = read_dataset(str(tmp_path / "missing.jsonl"))  # a picture that is missing fails its sample alone
    with pytest.raises(UserError, match=r"image '.*gone.png' does not exist; fix the row's image in the --dataset"):
        sample.load_images()


@pytest.mark.parametrize("name", sorted(ACC_SAMPLES))
def test_bundled_samples_read_and_stay_small(name):
    from vllm_utils.multimodal.video import load_video

    samples = read_dataset(ACC_SAMPLES[name])
    assert samples and all(s.load_images() or s.videos for s in samples)
    assert all(len(load_video(path, 4).frames) == 4 for s in samples for path in s.videos)
    folder = os.path.dirname(ACC_SAMPLES[name]) if name.endswith("jsonl") else ACC_SAMPLES[name]
    assert all(os.path.getsize(f) < 100_000 for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True))


# ---- the engine's prompt log-probs (teacher forcing) ------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_fp32(tiny_llava):
    from vllm_utils import LLM

    return LLM(tiny_llava, device="cpu", dtype="float32", max_model_len=1024, block_size=16)


def test_teacher_forced_logprobs_match_hf(llm_fp32, hf_reference, images):
    from vllm_utils import SamplingParams

    prompt = hf_reference.chat_prompt("Describe the picture.")
    vocab = llm_fp32.engine.processor.text_token_ids()
    continuation = [vocab[7], vocab[40], vocab[3], vocab[99]]
    expected = hf_reference.token_logprobs({"prompt": prompt, "multi_modal_data": {"image": images[0]}}, continuation)
    ids, mm = llm_fp32.engine.processor.process(prompt, images[:1])
    requests = [{"prompt_token_ids": ids, "mm_inputs": mm, "continuation_token_ids": continuation},
                {"prompt": prompt, "multi_modal_data": {"image": images[1]}}]  # a plain one in the same prefill
    forced, plain = llm_fp32.generate(requests, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1))
    got = [d[t].logprob for d, t in zip(forced.prompt_logprobs[len(ids):], continuation)]
    assert got == pytest.approx(expected, abs=1e-4)
    assert forced.prompt_logprobs[0] is None and len(forced.prompt_logprobs) == len(ids) + len(continuation)
    alone = llm_fp32.generate([requests[1]], SamplingParams(temperature=0, max_tokens=3))[0]
    assert plain.outputs[0].token_ids == alone.outputs[0].token_ids  # its last row still samples as before
    first = forced.prompt_logprobs[len(ids)]  # predicted from the prompt's last row: HF's first greedy token
    assert min(first, key=lambda t: first[t].rank) == hf_reference.greedy({"prompt": prompt, "multi_modal_data": {"image": images[0]}},
                                                            1)[0]


def test_prompt_logprobs_in_chunks_equal_one_log_softmax(monkeypatch):
    from vllm_utils.engine import prompt_logprobs as module

    monkeypatch.setattr(module, "CHUNK_ROWS", 3)  # several chunks and a partial last one
    logits = torch.randn(8, 11, generator=torch.Generator().manual_seed(0))
    tokens = [4, 1, 7, 7, 0, 10, 2, 5]
    got = [None] + module.prompt_logprobs(logits[:-1], tokens[1:], top=2)
    full = logits.log_softmax(-1)
    assert len(got) == len(tokens)
    for i in range(1, len(tokens)):
        top = full[i - 1].topk(2).indices.tolist()
        assert set(got[i]) == {tokens[i], *top}
        lp, rank = got[i][tokens[i]]
        assert lp == pytest.approx(float(full[i - 1, tokens[i]]))
        assert rank == 1 + int((full[i - 1] > full[i - 1, tokens[i]]).sum())
        assert [got[i][t][1] for t in top] == [1, 2]


def test_continuation_tokens_are_text_whatever_their_id(llm_fp32, images):
    """A continuation holding the image token's id is embedded as that token, not read as an image position."""
    from vllm_utils import SamplingParams

    processor = llm_fp32.engine.processor
    ids, mm = processor.process(processor.chat_prompt("Hi"), images[:1])
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = llm_fp32.generate([{"prompt_token_ids": ids, "mm_inputs": mm,
                              "continuation_token_ids": [processor.mm_token_id, 5]}], params)[0]
    assert len(out.prompt_logprobs) == len(ids) + 2 and all(len(d) == 1 for d in out.prompt_logprobs[1:])


# ---- agreement: a perturbed engine is caught ------------------------------------------------------------------
def test_a_perturbed_engine_is_caught(tiny_llava, images):
    from vllm_utils import LLM, SamplingParams

    llm = LLM(tiny_llava, device="cpu", dtype="float32", max_model_len=1024, block_size=16)
    reference = HFReference(tiny_llava)
    processor = llm.engine.processor
    requests = [dict(zip(("prompt_token_ids", "mm_inputs"), processor.process(processor.chat_prompt(q), [image])))
                for q, image in (("Describe the picture.", images[0]), ("What is this?", images[1]))]

    def figures() -> dict:
        ours = [o.outputs[0].token_ids for o in llm.generate(requests, SamplingParams(temperature=0, max_tokens=12))]
        return overall(agreement(llm, reference, requests, ours, 12))

    same = figures()
    assert same["exact_match_rate"] == 1.0 and same["top1_agreement"] == 1.0 and same["max_abs_dlogprob"] < 1e-4
    with torch.no_grad():
        llm.engine.runner.model.language_model.norm.weight[0] += 2.0  # one weight of the final norm
    perturbed = figures()
    assert perturbed["max_abs_dlogprob"] > 100 * max(same["max_abs_dlogprob"], 1e-6)
    assert perturbed["mean_abs_dlogprob"] > 1e-3


# ---- the command line ---------------------------------------------------------------------------------------------
def test_acc_end_to_end_agrees_with_hf_fp32(tiny_llava, tmp_path):
    from rouge_score import rouge_scorer

    run = cli("--acc", f"--model={tiny_llava}", "--device=cpu", "--dtype=float32", "--dataset=sample-jsonl",
              "--reference=hf", "--output-len=12", "--batch-size=2", f"--save-output={tmp_path / 'out.jsonl'}",
              f"--output-json={tmp_path / 'acc.json'}", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "***Acc Info***" in run.stdout
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    ref = info["reference"]
    assert ref["exact_match_rate"] == 1.0 and ref["top1_agreement"] == 1.0 and ref["earliest_divergence"] is None
    assert ref["max_abs_dlogprob"] < 1e-4 and ref["samples_compared"] == 3
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["circle", "square", "invoice"]
    circle = records[0]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert circle["score"] == pytest.approx(scorer.score(circle["reference"], circle["answer"])["rougeL"].fmeasure)
    assert info["score"] == pytest.approx(sum(r["score"] for r in records) / 3)
    [csv_path] = glob.glob(str(tmp_path / "[0-9]*.csv"))
    rows = dict(csv.reader(open(csv_path)))
    assert rows["reference_top1_agreement"] == "1.0" and rows["num_samples"] == "3"
    assert json.loads((tmp_path / "acc.json").read_text())["acc_info"] == info


def test_acc_failed_sample_is_recorded_and_the_run_goes_on(tiny_llava, tmp_path):
    Image.new("RGB", (30, 30), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    rows = [{"id": "ok", "image": "ok.png", "question": "Colour?", "answers": ["red"], "metric": "anls"},
            {"id": "bad", "image": "broken.png", "question": "Colour?", "answers": ["red"], "metric": "anls"},
            {"id": "ok2", "image": "ok.png", "question": "Shape?", "answers": ["square"], "metric": "anls"},
            {"id": "gone", "image": "gone.png", "question": "Shape?", "answers": ["square"], "metric": "anls"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = cli("--acc", f"--model={tiny_llava}", "--device=cpu", f"--dataset={tmp_path / 'd.jsonl'}",
              "--output-len=4", "--batch-size=3", f"--save-output={tmp_path / 'out.jsonl'}", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert records["bad"]["error"] and records["bad"]["score"] is None
    assert "--input-image" not in records["bad"]["error"] and "--dataset" in records["bad"]["error"]
    assert "does not exist" in records["gone"]["error"] and records["gone"]["score"] is None
    assert records["ok"]["score"] is not None and records["ok2"]["score"] is not None
    assert '"num_failed": 2' in run.stdout and "sample bad (row 1) failed" in run.stderr


def test_acc_where_every_sample_fails_exits_non_zero(tiny_llava, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    rows = [{"id": f"bad{i}", "image": "broken.png", "question": "Colour?", "answers": ["red"], "metric": "anls"}
            for i in range(2)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = cli("--acc", f"--model={tiny_llava}", "--device=cpu", f"--dataset={tmp_path / 'd.jsonl'}",
              "--output-len=4", cwd=str(tmp_path))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert error_lines(run) == ["error: every sample failed (2 of 2; the reasons are above), so nothing was scored"]


@pytest.mark.parametrize("args, message", [
    (["--dataset-format=coco"], "unknown --dataset-format 'coco'"),
    (["--dataset-format=mmmu"], "JSONL: leave --dataset-format out, or pass a mmmu dataset (e.g. --dataset sample-mmmu"),
    (["--dataset=/nonexistent/data"], "does not exist"),
    (["--reference=hf", "--temperature=0.5"], "--temperature applies to --demo only; drop it for --acc"),
])
def test_acc_bad_input_is_one_line(tiny_llava, tmp_path, args, message):
    run = cli("--acc", f"--model={tiny_llava}", "--device=cpu", *args, cwd=str(tmp_path))
    assert run.returncode == 1 and len(error_lines(run)) == 1 and message in error_lines(run)[0], run.stderr
    assert "Traceback" not in run.stderr


def test_demo_reference_agreement(tiny_llava, tmp_path):
    from vllm_utils.testing.images import make_demo_image

    image = make_demo_image(str(tmp_path / "p.png"))
    run = cli("--demo", f"--model={tiny_llava}", "--device=cpu", "--dtype=float32", f"--input-image={image}",
              "--output-len=8", "--reference=hf")
    assert run.returncode == 0, run.stderr
    figures = json.loads(run.stdout.split("***Reference Agreement***", 1)[1])
    assert figures["exact_match_rate"] == 1.0 and figures["top1_agreement"] == 1.0


def test_help_names_the_acc_flags():
    run = cli("--help")
    for flag in ("--acc", "--dataset", "--dataset-format", "--save-output", "--reference", "--reference-dtype",
                 "--reference-device"):
        assert flag in run.stdout
