"""Fox for --acc: its layout read (ground-truth JSON, pictures in the folder the benchmark pairs with the file), and
the OCR measures as Fox's and GOT-OCR2's evaluation scripts compute them, on pairs checked by hand."""
import json

import pytest

from vllm_utils.errors import UserError
from vllm_utils.modes.acc.bundled import dataset_path
from vllm_utils.modes.acc.readers import read_dataset
from vllm_utils.modes.acc.scorers import ocr_measures


def test_ocr_measures_of_an_english_pair_checked_by_hand():
    """Words: reply [the cat sat on the mat], label [the cat sat on a mat]. The scripts score the label against
    the reply: BLEU's n-gram precisions of the label are 5/6, 3/5, 2/4, 1/3 (equal lengths: no brevity penalty);
    on the word sets, 5 shared of the label's 6 (their "precision") and of the reply's 5 (their "recall"); the
    characters differ by 3 edits ("a" -> "the") over the longer 22."""
    measures = ocr_measures("the cat sat on the mat", "the cat sat on a mat")
    assert measures["bleu"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert measures["precision"] == pytest.approx(5 / 6) and measures["recall"] == 1.0
    assert measures["f1"] == pytest.approx(10 / 11)  # 2pr / (p + r)
    assert measures["edit_distance"] == pytest.approx(3 / 22)


def test_ocr_measures_split_chinese_into_jieba_words():
    """jieba: 我们/在/北京大学/学习 against 我们/在/北京/学习: 3 of 4 words shared each way; 2 of 9 characters edited."""
    measures = ocr_measures("我们在北京大学学习", "我们在北京学习")
    assert measures["precision"] == measures["recall"] == measures["f1"] == 0.75
    assert measures["edit_distance"] == pytest.approx(2 / 9)


@pytest.mark.parametrize("reply, label", [("a dog sat", "the cat sat"), ("hello world", "hello world")])
def test_meteor_is_nltks_where_its_wordnet_data_is_installed_and_never_partial(reply, label):
    """Without WordNet nltk still scores a reply whose words all match exactly: every reply gets None then, so that
    the mean is not of the easy ones alone."""
    import nltk
    from nltk.translate import meteor_score

    try:
        nltk.data.find("corpora/wordnet")
        expected = meteor_score.meteor_score([reply.split()], label.split())
    except LookupError:
        expected = None
    measures = ocr_measures(reply, label)
    assert measures["meteor"] == (pytest.approx(expected) if expected is not None else None)


def test_the_bundled_sample_reads_as_published():
    samples = read_dataset(dataset_path("sample-fox"))
    assert [s.metric for s in samples] == ["ocr"] * 3
    assert samples[0].text == "OCR: " and samples[2].text.startswith("[0, 350, 1000, 1000] OCR")
    assert samples[0].references[0].startswith("Quarterly report") and samples[0].base_dir.endswith("en_pdf_png")
    assert samples[0].load_images()[0].size == (240, 68)


def _fox_file(tmp_path, rows, name="en_page_ocr.json", folder="en_pdf_png"):
    (tmp_path / folder).mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return str(path)


ROW = {"image": "p.png", "conversations": [{"from": "human", "value": "<image>\nOCR: "},
                                           {"from": "gpt", "value": "text"}]}


def test_image_dir_overrides_the_paired_folder(tmp_path):
    path = _fox_file(tmp_path, [ROW], name="my_ocr.json", folder="pictures")
    with pytest.raises(UserError, match="pairs no picture folder with that file name; .* --image-dir"):
        read_dataset(path)
    [sample] = read_dataset(path, image_dir=str(tmp_path / "pictures"))
    assert sample.base_dir == str(tmp_path / "pictures")


@pytest.mark.parametrize("rows, fmt, message", [
    ([{"image": ["a.png", "b.png"], "conversations": ROW["conversations"]}], None, "a multi-page row: not supported"),
    ([{"image": "p.png", "conversations": [{"value": "OCR: "}]}], None, "no 'conversations' question and answer"),
    ([{"image": "p.png", "conversations": [{"value": "OCR: "}, {"value": None}]}], None, "whose 'value' is text"),
    ({"image": "p.png"}, None, "is not a list of rows"),
    ([ROW], "textvqa", "only the fox format reads"),
])
def test_bad_fox_files_are_one_line(tmp_path, rows, fmt, message):
    with pytest.raises(UserError, match=message):
        read_dataset(_fox_file(tmp_path, rows), fmt)


def test_the_fox_format_wants_a_fox_file():
    with pytest.raises(UserError, match="--dataset-format fox reads one of Fox's JSON files"):
        read_dataset(dataset_path("sample-jsonl"), "fox")
