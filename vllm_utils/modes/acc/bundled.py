"""The small samples bundled with the package, one per format, so that `--acc` runs out of the box (built by
`make_samples.py` from synthetic pictures and questions written for them)."""
import os

SAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")
ACC_SAMPLES = {
    "sample-jsonl": os.path.join(SAMPLES_DIR, "jsonl", "sample.jsonl"),
    "sample-llava-bench": os.path.join(SAMPLES_DIR, "llava-bench"),
    "sample-mmmu": os.path.join(SAMPLES_DIR, "mmmu"),
    "sample-textvqa": os.path.join(SAMPLES_DIR, "textvqa"),
    "sample-docvqa": os.path.join(SAMPLES_DIR, "docvqa"),
    "sample-videomme": os.path.join(SAMPLES_DIR, "videomme"),
    "sample-fox": os.path.join(SAMPLES_DIR, "fox", "en_page_ocr.json"),
}


def dataset_path(name_or_path: str) -> str:
    return ACC_SAMPLES.get(name_or_path, name_or_path)
