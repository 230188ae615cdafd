"""Writing results: the seed's CSV (Key,Value rows) and a full JSON, both atomically."""
import csv
import io
import json
import os
import platform
import time

import torch


def atomic_write(path: str, text: str) -> None:
    """Temp file in the same folder + rename: readers see the old file or the whole new one, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def csv_text(rows: dict[str, object]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["Key", "Value"])
    writer.writerows(rows.items())
    return buf.getvalue()


def write_csv(rows: dict[str, object], folder: str = ".") -> str:
    path = os.path.join(folder, time.strftime("%Y%m%d%H%M%S") + ".csv")
    atomic_write(path, csv_text(rows))
    return path


def environment(device: torch.device) -> dict[str, str]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.machine(),
           "cpu_threads": str(torch.get_num_threads()), "device": str(device)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def write_json(path: str, document: dict) -> None:
    atomic_write(path, json.dumps(document, indent=2) + "\n")
