"""`python3 -m vllm_utils.bench_serve --base-url URL`: load an OpenAI-compatible server (ours: `python3 -m
vllm_utils.serve`, or vLLM's) with `--perf`'s synthetic requests (`--mm-per-prompt` black images of
`--input-vision-shape` plus random text, `--input-len` prompt tokens counting the images and template as the server
counts them, `--output-len` tokens each, EOS ignored), arriving as a Poisson process at `--request-rate` or kept at
`--max-concurrency` in flight; report TTFT, TPOT, inter-token and end-to-end latency (mean, p50, p90, p99), request
and token throughput, and goodput under `--goodput` SLOs, as `***Perf Info***`, the result CSV and
`--output-json`, the way `--perf` writes them.

A comma list for one of `--request-rate`, `--max-concurrency`, `--input-len`, `--output-len` sweeps it: each value
is run in turn, then one combined CSV and JSON (a row per value), the plots (`--plot-dir`) and, with
`--html-report`, a self-contained HTML report (`serve/sweep_report.py`).

One untimed warm-up request first: it also measures what the server adds to the text (chat template, image
positions), so that each timed request's text makes the prompt exactly `--input-len` tokens."""
import argparse
import asyncio
import copy
import os
import sys
from dataclasses import dataclass

from vllm_utils.errors import UserError, one_line

PROG = "python3 -m vllm_utils.bench_serve"
SLO_KEYS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2el_ms"}


def build_parser() -> argparse.ArgumentParser:
    from vllm_utils.benchmark_vision_language import _HelpFormatter, _Parser

    p = _Parser(prog=PROG, description="Benchmark an OpenAI-compatible server with synthetic requests.",
                formatter_class=_HelpFormatter, allow_abbrev=False)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (its API under /v1)")
    p.add_argument("--endpoint", default="chat", choices=["chat", "completions"],
                   help="chat: /v1/chat/completions (images and text); completions: /v1/completions (text only)")
    p.add_argument("--model", default=None, help="the served model's name (default: the first of GET /v1/models)")
    p.add_argument("--tokenizer", default=None,
                   help="a local folder with the model's tokenizer, for the random text (default: --model, or the "
                        "served model's name, where that is a folder)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("VLLM_API_KEY"),
                   help="the server's API key (default: $OPENAI_API_KEY, else $VLLM_API_KEY)")
    p.add_argument("--input-len", default="1024",
                   help="prompt tokens, image positions and template included (a comma list sweeps it)")
    p.add_argument("--output-len", default="128",
                   help="tokens generated per request, EOS ignored (a comma list sweeps it)")
    p.add_argument("--num-prompts", type=int, default=100, help="timed requests")
    p.add_argument("--mm-per-prompt", type=int, default=1, help="images per request (chat; 0: text only)")
    p.add_argument("--input-vision-shape", default="336,336", help="HEIGHT,WIDTH of the black images")
    p.add_argument("--request-rate", default="inf",
                   help="requests per second, Poisson arrivals (default inf: all at once); a comma list such as "
                        "1,2,4,inf sweeps it")
    p.add_argument("--max-concurrency", default=None,
                   help="at most this many requests in flight (a comma list such as 1,4,16 sweeps it)")
    p.add_argument("--goodput", nargs="*", default=[], metavar="KEY:MS",
                   help="SLOs in ms (ttft, tpot, e2el), e.g. ttft:500 tpot:50: goodput counts the requests "
                        "meeting all of them")
    p.add_argument("--seed", type=int, default=0, help="seeds the random text and the arrival times")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--result-dir", default=".", help="folder of the result CSV")
    p.add_argument("--result-filename", default=None,
                   help="name of the result CSV, a new file (default: YYYYmmddHHMMSS.csv, never one taken)")
    p.add_argument("--save-result", action=argparse.BooleanOptionalAction, default=True,
                   help="write the result CSV (--no-save-result: print the figures only)")
    p.add_argument("--output-json", default=None, help="also write settings, figures and every request's timing "
                                                       "to this new file")
    p.add_argument("--plot-dir", default=None,
                   help="a sweep's PNG plots go to this folder (created if new; files in it are never overwritten; "
                        "default: NAME-plots beside the result CSV NAME.csv, or else the JSON or the HTML report)")
    p.add_argument("--html-report", default=None,
                   help="also write one self-contained HTML report (settings, environment, the table, the plots) "
                        "to this new file")
    return p


def _number_list(flag: str, text: str, kind, check, what: str) -> list:
    values = []
    for item in str(text).split(","):
        try:
            value = kind(item.strip())
        except ValueError:
            value = None
        if value is None or not check(value):
            raise UserError(f"{flag} '{text}': {what}, or a comma list of them to sweep")
        values.append(value)
    return values


def parse_lists(args: argparse.Namespace) -> dict[str, list]:
    """The values of each sweepable flag (one value: no sweep); at most one flag may list several."""
    lists = {
        "request_rate": _number_list("--request-rate", args.request_rate, float, lambda v: v > 0,
                                     "give requests per second > 0 (inf: all at once)"),
        "max_concurrency": [None] if args.max_concurrency is None else _number_list(
            "--max-concurrency", args.max_concurrency, int, lambda v: v >= 1, "give a whole number >= 1"),
        "input_len": _number_list("--input-len", args.input_len, int, lambda v: v >= 1, "give a whole number >= 1"),
        "output_len": _number_list("--output-len", args.output_len, int, lambda v: v >= 1,
                                   "give a whole number >= 1"),
    }
    swept = [key for key, values in lists.items() if len(values) > 1]
    if len(swept) > 1:
        flags = " and ".join("--" + key.replace("_", "-") for key in swept)
        raise UserError(f"{flags} are both lists: a run sweeps one flag at a time; give the others one value each")
    return lists


def sweep_key(lists: dict[str, list]) -> str | None:
    return next((key for key, values in lists.items() if len(values) > 1), None)


def points(args: argparse.Namespace, lists: dict[str, list]) -> list[argparse.Namespace]:
    """One namespace per run, each flag a single value."""
    key = sweep_key(lists)
    base = copy.copy(args)
    for name, values in lists.items():
        setattr(base, name, values[0])
    if key is None:
        return [base]
    runs = []
    for value in lists[key]:
        run = copy.copy(base)
        setattr(run, key, value)
        runs.append(run)
    return runs


def parse_goodput(items: list[str]) -> dict[str, float]:
    slos = {}
    for item in items:
        key, _, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if key not in SLO_KEYS or not ms > 0:
            raise UserError(f"--goodput '{item}': give KEY:MS with KEY one of {', '.join(SLO_KEYS)} and MS > 0")
        slos[key] = ms
    return slos


def check_args(args: argparse.Namespace, lists: dict[str, list]) -> None:
    if args.num_prompts < 1:
        raise UserError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.mm_per_prompt < 0 or (args.mm_per_prompt and args.endpoint == "completions"):
        raise UserError("--mm-per-prompt: 0 or more images, and /v1/completions takes none (use --endpoint chat)")
    from vllm_utils.modes.files import check_distinct, check_new_file
    from vllm_utils.modes.plan import check_report_files
    from vllm_utils.modes.spec import ReportSpec, parse_vision_shapes

    if len(parse_vision_shapes(args.input_vision_shape)) != 1:
        raise UserError("--input-vision-shape: one HEIGHT,WIDTH (every image of a request has it)")
    check_report_files(ReportSpec(args.save_result, args.result_dir, args.result_filename, args.output_json), None)
    key = sweep_key(lists)
    if key is None and args.plot_dir is None and args.html_report is None:
        return
    from vllm_utils.serve import require
    from vllm_utils.serve.sweep_report import check_plot_dir

    require({"matplotlib": "matplotlib"}, "plotting a sweep or writing its HTML report")
    csv = os.path.join(args.result_dir, args.result_filename) if args.save_result and args.result_filename else None
    check_distinct({"--result-filename": csv, "--output-json": args.output_json, "--html-report": args.html_report})
    if args.html_report:
        check_new_file(args.html_report, "--html-report", "report.html")
    if args.plot_dir:
        check_plot_dir(args.plot_dir, key or "request_rate")


def load_tokenizer(path: str | None):
    if path is None or not os.path.isdir(path):
        raise UserError(f"the random text needs the model's tokenizer: pass --tokenizer with a local folder holding "
                        f"it ({path!r} is not a folder)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read a tokenizer in '{path}' ({type(e).__name__}); pass --tokenizer") from None


@dataclass
class Session:
    client: object  # openai.AsyncOpenAI
    model: str
    maker: object  # loadgen.TextMaker


async def connect(args: argparse.Namespace) -> Session:
    import openai

    from vllm_utils.serve import loadgen

    client = openai.AsyncOpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key or "EMPTY",
                                max_retries=0, timeout=args.timeout)
    try:
        model = args.model or (await client.models.list()).data[0].id
    except openai.APIConnectionError:
        raise UserError(f"no server answers at {args.base_url}; start one (python3 -m vllm_utils.serve) or fix "
                        f"--base-url") from None
    except openai.APIStatusError as e:
        raise UserError(f"GET {args.base_url}/v1/models answered {e.status_code}: {e.message}") from None
    return Session(client, model, loadgen.TextMaker(load_tokenizer(args.tokenizer or args.model or model), args.seed))


async def bench(args: argparse.Namespace, session: Session) -> dict:
    """One run: the warm-up request, then `--num-prompts` timed ones (`args` holds one value of each flag)."""
    from vllm_utils.serve import loadgen

    client, model, maker = session.client, session.model, session.maker
    height, width = (int(v) for v in args.input_vision_shape.split(","))
    images = [loadgen.black_image_url(height, width)] * (args.mm_per_prompt if args.endpoint == "chat" else 0)

    def payload(text_tokens: int):
        lead, text = maker.text(1), maker.text(max(text_tokens - 1, 1))
        return loadgen.chat_messages(lead, text, images) if args.endpoint == "chat" else lead + text

    target = loadgen.Target(client, model, args.endpoint, args.output_len)
    probe_tokens = min(args.input_len, 32)
    warm = await loadgen.send(target, payload(probe_tokens), max_tokens=min(args.output_len, 8))
    if not warm.ok:
        raise UserError(f"the warm-up request failed: {warm.error}")
    overhead = warm.prompt_tokens - probe_tokens  # template, BOS, image positions, as the server counted them
    text_tokens = args.input_len - overhead
    if text_tokens < 2:
        raise UserError(f"--input-len {args.input_len} is shorter than what the server adds to a request's text "
                        f"({overhead} tokens: template and {len(images)} image(s)) plus 2; use --input-len >= "
                        f"{overhead + 2}")
    payloads = [payload(text_tokens) for _ in range(args.num_prompts)]
    print(f"Sending {args.num_prompts} request(s) of {args.input_len} + {args.output_len} tokens ({len(images)} "
          f"image(s) each) to {args.base_url}, model {model}, rate {args.request_rate} req/s, concurrency "
          f"{args.max_concurrency or 'unbounded'}", file=sys.stderr)
    done = [0]

    def progress(timing) -> None:
        done[0] += 1
        if done[0] % max(1, args.num_prompts // 10) == 0 or done[0] == args.num_prompts:
            print(f"  {done[0]}/{args.num_prompts} answered", file=sys.stderr)

    timings, wall = await loadgen.run_load(target, payloads, args.request_rate, args.max_concurrency, args.seed,
                                           progress)
    return {"model": model, "timings": timings, "wall": wall}


async def run_all(runs: list[argparse.Namespace], on_result) -> None:
    """Every run in order over one client; `on_result(run, result)` reports each as it ends."""
    session = await connect(runs[0])
    try:
        for run in runs:
            on_result(run, await bench(run, session))
    finally:
        await session.client.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from vllm_utils.serve import require

        require({"openai": "openai", "httpx": "httpx"}, "the load generator")
        lists = parse_lists(args)
        check_args(args, lists)
        slos = parse_goodput(args.goodput)
        runs = points(args, lists)
        key = sweep_key(lists)
        if key is None and args.plot_dir is None and args.html_report is None:
            from vllm_utils.serve.bench_report import report

            asyncio.run(run_all(runs, lambda run, r: report(run, slos, r["model"], r["timings"], r["wall"])))
        else:
            from vllm_utils.serve.sweep_report import Sweep

            sweep = Sweep(args, key or "request_rate", slos)
            try:
                asyncio.run(run_all(runs, sweep.add))
            except (UserError, KeyboardInterrupt):
                try:
                    sweep.save(partial=True)  # the points measured so far, if any
                except UserError as e:
                    print(f"error: {e}", file=sys.stderr)
                raise
            sweep.save()
    except Exception as e:
        why = one_line(e)
        if why is None:
            raise
        print(f"error: {why}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
