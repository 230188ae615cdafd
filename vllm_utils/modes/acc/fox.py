"""Fox (`ucaslcl/Fox_benchmark_data`, unzipped to `focus_benchmark_test/`): one JSON file per sub-task, each row
`{"image": "en_1.png", "conversations": [{"from": "human", "value": "<image>\\n... OCR: "}, {"from": "gpt",
"value": label}]}`, the pictures in a folder beside it that the benchmark's README pairs with each file. The
prompt is the row's own (its `<image>` placeholder dropped: the chat prompt puts the page first), the label the
reference of the OCR measures."""
import json
import os
import re

from vllm_utils.errors import UserError
from vllm_utils.modes.acc.sample import Sample

# the benchmark README's pairs of ground-truth file and picture folder (its line-level pair for English names the
# Chinese folder and vice versa; each file's own pictures are in its language's folder)
IMAGE_FOLDERS = {
    "cn_page_ocr.json": "cn_pdf_png", "en_page_ocr.json": "en_pdf_png",
    "cn_box_ocr.json": "cn_pdf_png", "en_box_ocr.json": "en_pdf_png",
    "cn_line_ocr.json": "cn_pdf_png", "en_line_ocr.json": "en_pdf_png",
    "cn_onbox_ocr.json": "cn_pdf_png_onbox", "en_onbox_ocr.json": "en_pdf_png_onbox",
}
_PLACEHOLDER = re.compile(r"^\s*<image>\s*")


def is_fox(path: str) -> bool:
    return path.endswith(".json") and os.path.isfile(path)


def image_folder(path: str, given: str | None) -> str:
    """--image-dir, else the folder the benchmark pairs with this file, beside it."""
    if given is not None:
        if not os.path.isdir(given):
            raise UserError(f"--image-dir '{given}' is not a folder; pass the folder holding the dataset's pictures")
        return given
    name = os.path.basename(path)
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), IMAGE_FOLDERS.get(name, ""))
    if name not in IMAGE_FOLDERS or not os.path.isdir(folder):
        where = f"its '{IMAGE_FOLDERS[name]}' folder is not beside it" if name in IMAGE_FOLDERS else \
            "the benchmark pairs no picture folder with that file name"
        raise UserError(f"--dataset '{path}' is a Fox file and {where}; pass the folder of its pictures with "
                        f"--image-dir")
    return folder


def read_fox(path: str, image_dir: str | None, limit: int | None = None) -> list[Sample]:
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --dataset '{path}' as Fox's JSON ({type(e).__name__})") from None
    if not isinstance(rows, list):
        raise UserError(f"--dataset '{path}' is not a list of rows, as Fox's ground-truth files are")
    folder = image_folder(path, image_dir)
    return [_sample(row, i, folder) for i, row in enumerate(rows[:limit] if limit else rows)]


def _sample(row: object, i: int, folder: str) -> Sample:
    turns = row.get("conversations") if isinstance(row, dict) else None
    image = row.get("image") if isinstance(row, dict) else None
    if not isinstance(image, str) or not image:
        multi = " (a multi-page row: not supported)" if isinstance(image, list) else ""
        raise UserError(f"row {i} of the Fox file has no 'image' file name{multi}")
    if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                                                 for t in turns[:2])):
        raise UserError(f"row {i} (image {image}) has no 'conversations' question and answer (two turns whose "
                        f"'value' is text)")
    question = _PLACEHOLDER.sub("", turns[0]["value"])
    return Sample(f"{i}:{image}", i, question, [image], [turns[1]["value"]], "ocr", base_dir=folder)
