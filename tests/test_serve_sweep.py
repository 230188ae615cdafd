"""The load generator's sweeps (`bench_serve --request-rate 1,2,inf`): against our server with the tiny LLaVA, three
request rates give one combined CSV (a row per rate), three PNG plots and a self-contained HTML report holding the
table and the plots inline; two lists at once are refused with one line; and the report, opened in headless
Chromium (where one is installed), shows its plots."""
import base64
import contextlib
import csv
import io
import json
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("matplotlib")
from test_serve import KEY, media, server  # noqa: E402,F401  (the module's server, started once)

from vllm_utils.bench_serve import main  # noqa: E402

RATES = ["50", "200", "inf"]
PLOTS = ["throughput_vs_latency.png", "ttft_vs_request_rate.png", "tpot_vs_request_rate.png"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(server, tmp_path_factory):  # noqa: F811
    """One sweep over three request rates, 4 requests each; its files and what it printed."""
    folder = tmp_path_factory.mktemp("sweep")
    argv = ["--base-url", server["base"], "--api-key", KEY, "--input-len", "48", "--output-len", "4",
            "--num-prompts", "4", "--input-vision-shape", "56,56", "--request-rate", ",".join(RATES),
            "--result-dir", str(folder), "--result-filename", "sweep.csv", "--output-json", str(folder / "sweep.json"),
            "--plot-dir", str(folder / "plots"), "--html-report", str(folder / "report.html")]
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()
    print(f"the sweep took {time.perf_counter() - started:.1f} s")
    return folder, SimpleNamespace(stdout=out.getvalue(), stderr=err.getvalue())


def test_sweep_writes_the_combined_csv_json_and_plots(sweep):
    folder, run = sweep
    assert run.stdout.count("***Perf Info***") == 3 and "*** sweep over --request-rate ***" in run.stdout
    rows = list(csv.DictReader((folder / "sweep.csv").open()))
    assert [r["request_rate"] for r in rows] == ["50.0", "200.0", "inf"]
    assert list(rows[0])[0] == "request_rate"  # the swept flag first
    for row in rows:
        assert int(row["requests"]) == 4 and int(row["failed"]) == 0 and float(row["token_per_second"]) > 0
        assert row["input_len"] == "48" and row["output_len"] == "4"
    document = json.loads((folder / "sweep.json").read_text())
    assert document["sweep"] == "--request-rate" and len(document["points"]) == 3
    assert [len(p["requests"]) for p in document["points"]] == [4, 4, 4]
    assert document["settings"]["request_rate"] == "50,200,inf" and document["environment"]["packages"]
    for name in PLOTS:
        data = (folder / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("RGB")
        assert image.width >= 600 and len(set(image.getdata())) > 50, name  # drawn, not blank


def test_html_report_is_self_contained(sweep):
    folder, _ = sweep
    page = (folder / "report.html").read_text()
    images = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", page)
    assert [name for name, _ in images] == PLOTS
    for name, data in images:
        assert base64.b64decode(data) == (folder / "plots" / name).read_bytes()
    table = re.search(r"<table id=\"points\">(.*?)</table>", page, flags=re.S).group(1)
    assert table.count("<tr>") == 4 and "TTFT p99 ms" in table  # the heading and three points
    assert all(f"<td>{r}</td>" in table for r in ("50", "200", "inf"))
    assert "Environment" in page and "cpu_model" in page and "input_vision_shape" in page
    assert not re.search(r"(src|href)=['\"](https?:|file:|//)", page)  # nothing fetched from elsewhere


def test_files_are_never_overwritten(server, sweep, capsys):  # noqa: F811
    folder, _ = sweep
    before = (folder / "report.html").read_bytes()
    argv = ["--base-url", server["base"], "--api-key", KEY, "--request-rate", "1,2", "--result-dir", str(folder),
            "--html-report", str(folder / "report.html")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --html-report") and "never overwritten" in err and "\n" not in err
    argv[-2:] = ["--plot-dir", str(folder / "plots")]
    assert main(argv) == 1
    assert "already holds throughput_vs_latency.png" in capsys.readouterr().err
    assert (folder / "report.html").read_bytes() == before


def test_two_lists_are_refused_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "vllm_utils.bench_serve", "--request-rate", "1,2,inf",
                          "--max-concurrency", "1,4", "--result-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        "error: --request-rate and --max-concurrency are both lists: a run sweeps one flag at a time; give the "
        "others one value each"]
    run = subprocess.run([sys.executable, "-m", "vllm_utils.bench_serve", "--request-rate", "1,x"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1 and "--request-rate '1,x'" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_is_one_line(monkeypatch, capsys, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    assert main(["--request-rate", "1,2", "--result-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == \
        "error: plotting a sweep or writing its HTML report needs matplotlib: pip install 'vllm_utils[serve]'"


def _browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "chromium-headless-shell")
                 if shutil.which(b)), None)


def test_report_shows_its_plots_in_a_headless_browser(request, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium, chromium-browser or chromium-headless-shell on PATH (apt-get install chromium)")
    folder, _ = request.getfixturevalue("sweep")
    shot = tmp_path / "shot.png"
    run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000",
                          f"--screenshot={shot}", (folder / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=60)
    assert shot.exists(), run.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1000)
    plots = image.crop((0, 150, 1280, 1000))  # below the title and the first paragraph: the plots
    pixels = list(plots.getdata())
    assert len(set(pixels)) > 200  # not one flat colour, nor a page of text alone

    def near(colour, pixel, tolerance=40):
        return all(abs(a - b) <= tolerance for a, b in zip(colour, pixel))
    # matplotlib's first two line colours (C0 blue, C1 orange): the plots' curves were drawn on the page
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert sum(near(colour, p) for p in pixels) > 100, colour
