"""A load-generator sweep (`bench_serve` with a comma list for one of `--request-rate`, `--max-concurrency`,
`--input-len`, `--output-len`), or any run given `--plot-dir` or `--html-report`: each point's figures printed as a
single run prints them, then one combined CSV (a row per point, the swept flag its first column) and JSON, the
plots as PNGs (matplotlib, Agg, no display: output-token throughput against TPOT and end-to-end latency, and TTFT
and TPOT percentiles against the swept value) and one self-contained HTML report (settings, environment, the table,
the plots inline as base64 PNGs). Every file is new: written whole under a name no file has, never over one."""
import argparse
import base64
import csv
import html
import io
import json
import math
import os
import platform
import sys
import time

from vllm_utils.errors import UserError
from vllm_utils.modes.environment import cpu_model, package_versions
from vllm_utils.modes.files import _claim, _write_temp, probe_folder, unique_names
from vllm_utils.modes.report import csv_figures
from vllm_utils.serve.bench_report import print_figures, request_records, settings

FLAGS = {"request_rate": "--request-rate", "max_concurrency": "--max-concurrency", "input_len": "--input-len",
         "output_len": "--output-len"}
LABELS = {"request_rate": "request rate (requests/s)", "max_concurrency": "max concurrency",
          "input_len": "input length (tokens)", "output_len": "output length (tokens)"}


def plot_names(key: str) -> list[str]:
    return ["throughput_vs_latency.png", f"ttft_vs_{key}.png", f"tpot_vs_{key}.png"]


def check_plot_dir(folder: str, key: str) -> None:
    """`--plot-dir` can take the plots: a folder (or a new one in an existing folder) holding none of their names."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--plot-dir '{folder}' is a file; give a folder (it is created if new)")
    if os.path.isdir(folder):
        for name in plot_names(key):
            if os.path.exists(os.path.join(folder, name)):
                raise UserError(f"--plot-dir '{folder}' already holds {name}, never overwritten; choose another "
                                f"folder or remove it")
        probe_folder(folder, "--plot-dir")
    else:
        probe_folder(os.path.dirname(os.path.abspath(folder)), "--plot-dir (created there)")


def client_environment() -> dict[str, object]:
    """Where the load generator ran (the server may be elsewhere): the CLI's fields that a client has."""
    from importlib import metadata

    packages = package_versions()
    for name in ("openai", "httpx", "matplotlib"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"host": platform.node(), "machine": platform.machine(), "os": platform.platform(),
            "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "packages": packages}


def _value(key: str, value) -> str:
    if value is None:
        return "unbounded"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:g}"
    return str(value)


# ---- the new files ----------------------------------------------------------------------------------------------
def _new_file(path: str, data: bytes) -> str:
    """`data` as `path`, whole, if no file has that name; FileExistsError otherwise."""
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here: exclusive create
            with open(path, "xb") as f:
                f.write(data)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def table_csv(rows: list[dict[str, object]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_table(rows: list[dict[str, object]], folder: str, name: str | None) -> str:
    """The combined CSV as `name` in `folder`, or under the seed's `YYYYmmddHHMMSS[-N].csv`, never over a file."""
    text = table_csv(rows)
    tmp = _write_temp(os.path.abspath(folder), "sweep.csv", text)
    try:
        paths = [os.path.join(folder, name)] if name else unique_names(folder, time.strftime("%Y%m%d%H%M%S"))
        for path in paths:
            try:
                _claim(tmp, path, text)
                return path
            except FileExistsError:
                if name:
                    raise UserError(f"--result-filename '{path}' was written meanwhile by another run") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    raise AssertionError("unreachable")


def new_folder(stem: str) -> str:
    """`stem`, or `stem-1`, `stem-2`, ...: the first that no file or folder has, created."""
    path, n = stem, 0
    while True:
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1
            path = f"{stem}-{n}"


# ---- plots ------------------------------------------------------------------------------------------------------
def _figure(width: float = 7.0, height: float = 4.2, panels: int = 1):
    from matplotlib.figure import Figure  # no pyplot: no global backend or state; PNGs through Agg

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def draw_plots(key: str, labels: list[str], summaries: list[dict]) -> dict[str, bytes]:
    """The three PNGs, by file name."""
    flag = FLAGS[key]
    throughput = [s["output_tokens_per_s"] for s in summaries]
    pngs = {}
    fig, axes = _figure(11.0, 4.4, panels=2)
    for ax, figure, title in ((axes[0], "tpot_ms", "TPOT (ms)"), (axes[1], "e2el_ms", "end-to-end latency (ms)")):
        for stat, style in (("mean", "o-"), ("p99", "s--")):
            xs = [s[figure][stat] for s in summaries]
            ax.plot(xs, throughput, style, label=f"{stat} {title.split(' (')[0]}")
            if stat == "mean":
                for x, y, label in zip(xs, throughput, labels):
                    ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(title)
        ax.set_ylabel("output tokens/s")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"Output throughput against latency (points: {flag})")
    pngs["throughput_vs_latency.png"] = _png(fig)
    for figure, name, title in (("ttft_ms", f"ttft_vs_{key}.png", "TTFT (ms)"),
                                ("tpot_ms", f"tpot_vs_{key}.png", "TPOT (ms)")):
        fig, (ax,) = _figure()
        positions = list(range(len(labels)))
        for stat, style in (("p50", "o-"), ("p90", "s-"), ("p99", "^-")):
            ax.plot(positions, [s[figure][stat] for s in summaries], style, label=stat)
        ax.set_xticks(positions, labels)
        ax.set_xlabel(f"{LABELS[key]} ({flag})")
        ax.set_ylabel(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(f"{title.split(' (')[0]} percentiles against {flag}")
        pngs[name] = _png(fig)
    return pngs


# ---- the HTML report --------------------------------------------------------------------------------------------
TABLE_COLUMNS = [  # (heading, figure path in a point's summary, format)
    ("requests", ("requests",), "{:d}"), ("failed", ("failed",), "{:d}"), ("wall s", ("wall_seconds",), "{:.2f}"),
    ("requests/s", ("requests_per_s",), "{:.2f}"), ("output tok/s", ("output_tokens_per_s",), "{:.1f}"),
    ("total tok/s", ("total_tokens_per_s",), "{:.1f}"),
] + [(f"{name} {stat} ms", (key, stat), "{:.2f}") for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"),
                                                                       ("ITL", "itl_ms"), ("E2EL", "e2el_ms"))
     for stat in ("mean", "p50", "p90", "p99")]


def _cell(summary: dict, path: tuple, fmt: str) -> str:
    value = summary
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return "n/a" if value is None else fmt.format(value)


def _kv_table(items: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f"<table class='kv'>{rows}</table>"


def html_report(key: str, common: dict, environment: dict, labels: list[str], summaries: list[dict],
                pngs: dict[str, bytes], started: str, slos: dict[str, float]) -> str:
    columns = TABLE_COLUMNS + ([("goodput req/s", ("goodput_requests_per_s",), "{:.2f}")] if slos else [])
    head = "".join(f"<th>{html.escape(h)}</th>" for h in [FLAGS[key]] + [c[0] for c in columns])
    body = "".join("<tr><td>" + html.escape(label) + "</td>" + "".join(
        f"<td>{_cell(s, path, fmt)}</td>" for _, path, fmt in columns) + "</tr>" for label, s in zip(labels, summaries))
    env = {k: v for k, v in environment.items() if k != "packages"}
    env.update({f"package {k}": v for k, v in environment.get("packages", {}).items()})
    images = "".join(
        f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
        f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, data in pngs.items())
    title = f"bench_serve sweep over {FLAGS[key]}: {', '.join(labels)}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }}
table.kv th, table.kv td {{ text-align: left; }}
th {{ background: #eee; }}
figure {{ display: inline-block; margin: 0.5em; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Started {html.escape(started)}; {len(labels)} point(s), measured by <code>python3 -m vllm_utils.bench_serve</code>
from the client's side (TTFT: sent to first chunk; TPOT: (end-to-end - TTFT) / (tokens - 1); ITL: between chunks).</p>
<h2>Plots</h2>
<div id="plots">{images}</div>
<h2>Points</h2>
<table id="points"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Settings</h2>
{_kv_table(common)}
<h2>Environment (the load generator's machine)</h2>
{_kv_table(env)}
</body></html>
"""


# ---- the sweep --------------------------------------------------------------------------------------------------
class Sweep:
    """Collects each point as it ends (printing its figures), then writes the combined files."""

    def __init__(self, args: argparse.Namespace, key: str, slos: dict[str, float]) -> None:
        self.args, self.key, self.slos = args, key, slos
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.points: list[dict] = []
        self.model = ""

    def add(self, run: argparse.Namespace, result: dict) -> None:
        label = _value(self.key, getattr(run, self.key))
        print(f"=== {FLAGS[self.key]} {label} ===")
        try:
            summary, info = print_figures(run, self.slos, result["model"], result["timings"], result["wall"])
        except UserError as e:  # every request failed
            raise UserError(f"{FLAGS[self.key]} {label}: {e}") from None
        self.model = result["model"]
        self.points.append({"label": label, "settings": settings(run, result["model"], self.slos),
                            "summary": summary, "info": info, "requests": request_records(result["timings"])})

    def common_settings(self) -> dict[str, object]:
        common = dict(self.points[0]["settings"])
        common[self.key] = ",".join(p["label"] for p in self.points)
        return {"sweep": FLAGS[self.key], **common}

    def print_table(self) -> None:
        print(f"*** sweep over {FLAGS[self.key]} ***")
        heads = ["requests/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "E2EL mean"]
        print(f"{FLAGS[self.key]:>18}" + "".join(f"{h:>11}" for h in heads))
        for p in self.points:
            s = p["summary"]
            values = [s["requests_per_s"], s["output_tokens_per_s"], s["ttft_ms"]["p50"], s["ttft_ms"]["p99"],
                      s["tpot_ms"]["p50"], s["tpot_ms"]["p99"], s["e2el_ms"]["mean"]]
            print(f"{p['label']:>18}" + "".join(f"{v:11.2f}" for v in values))
        print("(latencies in ms)")

    def save(self, partial: bool = False) -> None:
        if not self.points:
            return
        args, key = self.args, self.key
        if partial:
            print(f"note: writing the {len(self.points)} point(s) measured before the error", file=sys.stderr)
        self.print_table()
        labels = [p["label"] for p in self.points]
        summaries = [p["summary"] for p in self.points]
        rows = [{key: p["settings"][key], **{k: v for k, v in p["settings"].items() if k != key},
                 **csv_figures(p["summary"], p["info"])} for p in self.points]
        environment = client_environment()
        failed, csv_path, pngs = [], None, {}

        def attempt(what: str, write, say: bool = True) -> str | None:
            try:
                path = write()
                if say:
                    print(f"Saved to {path}", file=sys.stderr)
                return path
            except OSError as e:
                failed.append(f"{what} ({e.strerror or e})")
            except UserError as e:
                failed.append(f"{what} ({e})")
            return None

        if args.save_result:
            csv_path = attempt("the combined CSV", lambda: write_table(rows, args.result_dir, args.result_filename))
        if args.output_json:
            document = {"sweep": FLAGS[key], "settings": self.common_settings(), "environment": environment,
                        "rows": rows, "plots": plot_names(key),
                        "points": [{"settings": p["settings"], "perf_info": p["info"], "metrics": p["summary"],
                                    "requests": p["requests"]} for p in self.points]}
            data = (json.dumps(document, indent=2) + "\n").encode()
            attempt("--output-json", lambda: _exclusive(args.output_json, data, "--output-json"))
        folder = args.plot_dir
        if folder is None:
            beside = csv_path or args.output_json or args.html_report
            if beside is not None:
                folder = attempt("the plot folder", lambda: new_folder(os.path.splitext(beside)[0] + "-plots"),
                                 say=False)
            elif not partial:
                print("note: no PNGs written (--no-save-result): pass --plot-dir DIR for them", file=sys.stderr)
        elif attempt("--plot-dir", lambda: os.makedirs(folder, exist_ok=True) or folder, say=False) is None:
            folder = None
        if folder is not None or args.html_report:
            pngs = draw_plots(key, labels, summaries)
        if folder is not None:
            for name, data in pngs.items():
                attempt(name, lambda: _exclusive(os.path.join(folder, name), data, "--plot-dir"))
        if args.html_report:
            page = html_report(key, self.common_settings(), environment, labels, summaries, pngs, self.started,
                               self.slos)
            attempt("--html-report", lambda: _exclusive(args.html_report, page.encode(), "--html-report"))
        if failed:
            raise UserError(f"could not write {' or '.join(failed)}; the figures printed above are complete")


def _exclusive(path: str, data: bytes, flag: str) -> str:
    try:
        return _new_file(path, data)
    except FileExistsError:
        raise UserError(f"{flag}: '{path}' exists (written meanwhile?); it is never overwritten") from None
