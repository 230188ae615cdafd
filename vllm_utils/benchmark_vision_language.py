"""Command line: `--demo` (images + prompts in, generated text out), `--perf` (synthetic requests of exact
length, timed) and `--acc` (a dataset's questions, scored; optionally compared with an HF reference).

One pass down: argv -> a frozen spec of the mode (modes/spec.py) -> the plan (modes/plan.py: resolved once, the
processor and inputs built once, every check that needs no weights) -> the backend (ours or HF) -> the mode ->
the report. Only this module and the spec know argparse.

Nothing heavy is imported at module level: `--help` and flag errors answer at once."""
import argparse
import os
import sys

from vllm_utils import __version__
from vllm_utils.bundled import BUNDLED
from vllm_utils.errors import one_line
from vllm_utils.modes.acc.bundled import ACC_SAMPLES

PROG = "python3 -m vllm_utils.benchmark_vision_language"
EPILOG = f"""\
bundled configurations (run with --load-format dummy, nothing downloaded): {', '.join(sorted(BUNDLED))}

Without --model, each mode runs the tiny random model of --model-type (default llava), built and cached on first
use. A flag of another mode is refused. Every bad input, flag errors included, gets one 'error: ...' line on stderr
and exit status 1. Progress goes to stderr: live bars on a terminal, else one line per
VLLM_UTILS_PROGRESS_INTERVAL seconds (default 10)."""
FAMILIES = "llava, llava_next, llava_onevision, llava_next_video, qwen2_vl or qwen2_5_vl"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default unless it has none worth showing or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if unset or action.default is argparse.SUPPRESS or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line and exit status 1, as for every other bad input (argparse's own: usage block, 2)."""
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Validate (--demo), benchmark (--perf) and score (--acc) a vision-language "
                                       "model.", formatter_class=_HelpFormatter, epilog=EPILOG, allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"vllm_utils {__version__}")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--demo", action="store_true", help="generate text for images (or videos) and prompts")
    mode.add_argument("--perf", action="store_true", help="time synthetic requests of exact length")
    mode.add_argument("--acc", action="store_true",
                      help="score the replies to a dataset's questions as the dataset's evaluation does")
    _model_flags(p.add_argument_group("model and engine (every mode)"))
    _input_flags(p.add_argument_group("pictures and videos (--demo, --perf; --num-frames also --acc)"))
    demo = p.add_argument_group("--demo")
    demo.add_argument("--prompt", action="append", default=[],
                      help="prompt text (repeatable; default: 'Describe the picture.', or 'Describe the video.' with "
                           "--input-video). The chat template places the image before it; a prompt holding one "
                           "<image> places it there instead")
    demo.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    demo.add_argument("--top-p", type=float, default=1.0, help="sample from the likeliest tokens of this mass")
    demo.add_argument("--top-k", type=int, default=-1, help="sample from the k likeliest tokens (-1: all)")
    perf = p.add_argument_group("--perf")
    perf.add_argument("--input-len", type=int, default=1024, help="prompt tokens, image positions included")
    perf.add_argument("--input-vision-shape", default=None,
                      help="HEIGHT,WIDTH of the synthetic images (or video frames), ';' between images (e.g. 672,672 "
                           "or 336,672;672,336; default: the processor's size)")
    perf.add_argument("--num-prompts", type=int, default=1,
                      help="requests in each timed run (default: 1); --acc: the first N rows (default there: all)")
    perf.add_argument("--num-iters", type=int, default=1, help="timed repetitions")
    acc = p.add_argument_group("--acc")
    acc.add_argument("--dataset", default=None,
                     help="a Hugging Face dataset folder (parquet/arrow files as published, or save_to_disk), one "
                          "parquet/arrow file, a JSONL, or a bundled sample: " + ", ".join(ACC_SAMPLES)
                          + " (default: sample-jsonl)")
    acc.add_argument("--dataset-format", default=None,
                     help="jsonl, llava-bench, mmmu, textvqa, docvqa, videomme or fox (default: from the columns; a "
                          ".json file: fox)")
    acc.add_argument("--dataset-split", default=None,
                     help="the split of a folder holding several (default: validation, else the only one)")
    acc.add_argument("--video-dir", default=None,
                     help="videomme: the folder of its <videoID>.mp4 files (default: the 'data' folder its "
                          "videos_chunked_*.zip unzip to, in the --dataset folder or beside its videomme/ folder); "
                          "each video gives --num-frames frames")
    acc.add_argument("--image-dir", default=None,
                     help="fox: the folder of the file's pictures (default: the one the benchmark pairs with it, "
                          "beside it: en_pdf_png/ for en_page_ocr.json, ...)")
    acc.add_argument("--save-output", default=None,
                     help="write one JSON line per sample (id, prompt, answer, reference, score) to this new file")
    ref = p.add_argument_group("reference (--demo, --acc)")
    ref.add_argument("--reference", default=None, choices=["hf"],
                     help="run the same prompts through HF transformers and report how well our engine agrees "
                          "(greedy exact match, first divergence, teacher-forced top-1 and log-probs)")
    ref.add_argument("--reference-dtype", default="float32", help="the reference's dtype")
    ref.add_argument("--reference-device", default="cpu", help="the reference's device")
    out = p.add_argument_group("results (--perf, --acc)")
    out.add_argument("--result-dir", default=".", help="folder of the result CSV")
    out.add_argument("--result-filename", default=None,
                     help="name of the result CSV, a new file (default: YYYYmmddHHMMSS.csv, never one taken)")
    out.add_argument("--save-result", action=argparse.BooleanOptionalAction, default=True,
                     help="write the result CSV (--no-save-result: print the figures only)")
    out.add_argument("--output-json", default=None, help="also write settings, metrics and environment to this "
                                                         "new file")
    return p


def _model_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--model", default=None,
                   help="model folder (Hugging Face layout), or a bundled name with --load-format dummy (default: the "
                        "tiny random model of --model-type, built and cached on first use)")
    g.add_argument("--model-type", default=None,
                   help=f"model family: {FAMILIES} (default: the one the model folder's config.json names, llava "
                        f"without --model; a mismatch is refused)")
    g.add_argument("--device", default=None, help="cpu, cuda or gcu (default: cuda if present, else cpu)")
    g.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, float16 or bfloat16")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="auto: the folder's safetensors; dummy: random weights (no checkpoint needed)")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks (processes) the model is split over; must divide the heads and MLP widths")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's max_position_embeddings)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens computed per engine step; below --max-model-len, long prompts are prefilled in "
                        "chunks of it, with the running requests' decodes in the same steps (default: "
                        "max(8192, --max-model-len): whole prompts)")
    g.add_argument("--output-len", type=int, default=None,
                   help="tokens to generate, >= 1 (default: 64 for --demo, 128 for --perf; --acc: per metric, 1024 "
                        "for ROUGE, 32 for choices and ANLS, 16 for VQA)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="most requests running at once (default: the number of requests, at most 256)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (engine only)")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV-cache blocks (engine only; default: sized from memory)")
    g.add_argument("--enforce-eager", action="store_true", help="do not capture CUDA graphs (engine only)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="a prompt starts after the longest prefix of full KV blocks an earlier one computed, keyed by "
                        "their tokens and images' content (engine only; default: on, except for models with "
                        "linear-attention layers, whose recurrent state the blocks do not hold)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of random weights, synthetic requests and sampling (one generator for all requests), "
                        "0 to 4294967295")
    g.add_argument("--mm-processor-kwargs", default=None,
                   help="a JSON object of settings for the model's HF processor, as vLLM takes it (GOT-OCR2: "
                        "'{\"crop_to_patches\": true, \"max_patches\": 6}' cuts pages into tiles, "
                        "'{\"multi_page\": true}' reads --mm-per-prompt pages as one document)")
    g.add_argument("--backend", default="engine", choices=["engine", "hf"],
                   help="engine: ours; hf: the same workload through HF transformers' generate, for comparison")


def _input_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--input-image", action="append", default=[],
                   help="--demo: image file (repeatable); --perf: the image of every request (default: black)")
    g.add_argument("--input-video", action="append", default=[],
                   help="--demo: video file (repeatable; one request each, with every --prompt, after every "
                        "--input-image given); --perf: the video of every request (instead of images). Video models "
                        "only (the README's model table names them); needs PyAV")
    g.add_argument("--num-frames", type=int, default=None,
                   help="frames sampled evenly from each --input-video, or each video of an --acc dataset (default: "
                        "16, or all of a shorter one); --perf without --input-video: requests carry a black video of "
                        "this many frames of --input-vision-shape")
    g.add_argument("--mm-per-prompt", type=int, default=1,
                   help="images per request: --demo groups each N consecutive --input-image into one prompt; "
                        "--perf gives every synthetic request N images")


def given_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the flags given on the command line (whatever their value)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def quiet_libraries() -> None:
    """Our own progress bars and errors only: no advisory warnings from transformers."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run(args: argparse.Namespace, given: set[str]) -> None:
    from vllm_utils.modes.spec import spec_from_args

    spec = spec_from_args(args, given)  # before the heavy imports: a bad flag value is told at once
    quiet_libraries()
    from vllm_utils.modes import demo, perf
    from vllm_utils.modes.acc import run as acc
    from vllm_utils.modes.backends import open_backend
    from vllm_utils.modes.plan import make_plan
    from vllm_utils.modes.report import report

    plan = make_plan(spec)
    with open_backend(plan) as backend:
        result = {"demo": demo.run, "perf": perf.run, "acc": acc.run}[plan.mode](plan, backend)
    report(plan, result)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = given_flags(argv)
    from vllm_utils.notes import forget_notes

    forget_notes()
    try:
        run(args, given)
    except Exception as e:
        why = one_line(e)  # bad input or out of memory; anything else is a bug, whose traceback is needed
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
