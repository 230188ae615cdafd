"""One dataset row as `--acc` runs it, whatever the file it came from."""
import io
import os
from dataclasses import dataclass, field

from PIL import Image, ImageOps

SHORT_ANSWER = "Answer the question using a single word or phrase."  # lmms-eval's / MMMU's short-answer line
# open: MMMU's open questions (the answer found in the reply); videomme: the letter Video-MME's evaluation reads;
# ocr: Fox's OCR measures (the score is their F1)
METRICS = ("rouge", "choice", "vqa", "anls", "open", "videomme", "ocr")
# a sample whose image or video cannot be read fails alone (the run goes on); its record says what to do
IMAGE_FIX = "fix the row's image in the --dataset (a JSONL's paths are relative to the file)"
VIDEO_FIX = ("check the file, or give the folder of the dataset's videos with --video-dir (Video-MME: its "
             "videos_chunked_*.zip unzipped)")


@dataclass
class Sample:
    id: str
    row: int  # 0-based position in the dataset, for messages
    text: str  # the question as the dataset's evaluation renders it (the chat template is added later)
    images: list  # raw values: PIL images, {"bytes", "path"} dicts (HF `Image` features) or paths
    references: list[str]  # the answer (choice: its letter), or every human answer
    metric: str
    choices: list[str] | None = None
    subject: str | None = None
    base_dir: str = "."  # relative image paths are read from here
    videos: list[str] = field(default_factory=list)  # video files, each shown before the text
    extra: dict = field(default_factory=dict)  # what a dataset reports its figures by (Video-MME's duration)

    def load_images(self) -> list[Image.Image]:
        """The upright RGB pictures (as `multimodal.image.load_image` reads files); raises on a bad image."""
        return [_open(value, self.base_dir) for value in self.images]


def _open(value, base_dir: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    else:
        path = value.get("path") if isinstance(value, dict) else value
        from vllm_utils.multimodal.image import load_image

        return load_image(os.path.join(base_dir, path), fix=IMAGE_FIX)
    return ImageOps.exif_transpose(image).convert("RGB")


def has_image(value) -> bool:
    if isinstance(value, dict):
        return bool(value.get("bytes") or value.get("path"))
    return value is not None and value != ""
