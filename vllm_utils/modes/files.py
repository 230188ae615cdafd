"""Result files: the seed's CSV (Key,Value rows) under a name no other run can take, and a full JSON, each written
whole or not at all and never over an existing file; and the checks, run before any model loads, that their
places are writable and that no file would be overwritten."""
import csv
import io
import json
import os
import tempfile
import threading
import time

from vllm_utils.errors import UserError


def probe_folder(folder: str, what: str, fix: str = "choose a writable folder") -> None:
    """Raises a UserError unless a file can be created in `folder` (tried, not guessed from permissions)."""
    if not os.path.isdir(folder):
        raise UserError(f"the folder '{folder}' for {what} does not exist; create it or choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".vllm_utils-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} in '{folder}' ({e.strerror}); {fix}") from None


def _write_temp(folder: str, name: str, text: str) -> str:
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def csv_text(rows: dict[str, object]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["Key", "Value"])
    writer.writerows(rows.items())
    return buf.getvalue()


def unique_names(folder: str, stamp: str):
    """`stamp.csv`, then `stamp-1.csv`, `stamp-2.csv`, ..."""
    yield os.path.join(folder, f"{stamp}.csv")
    n = 1
    while True:
        yield os.path.join(folder, f"{stamp}-{n}.csv")
        n += 1


def write_csv(rows: dict[str, object], folder: str = ".", name: str | None = None) -> str:
    """`name` in `folder`, or the seed's `YYYYmmddHHMMSS.csv`, or `...-N.csv` when that name is taken: the name is
    claimed by an exclusive hard link of the complete file, so no run ever overwrites another's, even at the same
    time (a given `name` that is taken is an error)."""
    text = csv_text(rows)
    tmp = _write_temp(os.path.abspath(folder), "result.csv", text)
    try:
        names = [os.path.join(folder, name)] if name else unique_names(folder, time.strftime("%Y%m%d%H%M%S"))
        for path in names:
            try:
                _claim(tmp, path, text)
                return path
            except FileExistsError:
                if name:
                    raise UserError(f"--result-filename '{path}' was written meanwhile by another run") from None
                continue
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    raise AssertionError("unreachable")


def _claim(tmp: str, path: str, text: str) -> None:
    """Makes `path` hold `text` if no file has that name yet; FileExistsError otherwise."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: exclusive create, then write
        with open(path, "x", newline="") as f:
            f.write(text)


def write_json(path: str, document: dict, flag: str = "--output-json") -> str:
    """The whole file or none, under a name no file has (claimed as the CSV's is)."""
    text = json.dumps(document, indent=2) + "\n"
    tmp = _write_temp(os.path.dirname(os.path.abspath(path)), os.path.basename(path), text)
    try:
        _claim(tmp, path, text)
    except FileExistsError:
        raise UserError(f"{flag} '{path}' was written meanwhile by another run; it is never overwritten") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_distinct(paths: dict[str, str | None]) -> None:
    """No two results of a run go to the same file."""
    seen: dict[str, str] = {}
    for flag, path in paths.items():
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise UserError(f"{seen[key]} and {flag} name the same file '{path}'; give each its own")
        seen[key] = flag


def check_new_file(path: str, flag: str, example: str) -> None:
    """`path` may be written by this run: not a folder, not an existing file (never overwritten), in a writable
    folder."""
    if os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a directory; give a file path such as {os.path.join(path, example)}")
    if os.path.exists(path):
        raise UserError(f"{flag} '{path}' exists and is never overwritten; remove it or choose another path")
    probe_folder(os.path.dirname(os.path.abspath(path)), flag)
