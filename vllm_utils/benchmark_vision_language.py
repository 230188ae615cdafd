"""Command line: `--demo` (images + prompts in, generated text out), `--perf` (synthetic requests of
exact length, timed) and `--acc` (a dataset's questions, scored; optionally compared with an HF reference).
Flags -> checks -> configuration -> bench/; nothing else lives here.

Nothing heavy is imported at module level: `--help` and flag errors answer at once."""
import argparse
import os
import sys
from typing import TYPE_CHECKING

from vllm_utils.bench.demo import DEFAULT_PROMPT
from vllm_utils.errors import UserError, one_line

if TYPE_CHECKING:
    from vllm_utils.config import ResolvedConfig
from vllm_utils.bundled import BUNDLED
from vllm_utils.bench.acc.bundled import ACC_SAMPLES

ENGINE_ONLY_FLAGS = ("--block-size", "--num-kv-blocks", "--enforce-eager")  # what --backend hf ignores
PROG = "python3 -m vllm_utils.benchmark_vision_language"
EPILOG = f"""\
bundled configurations (run with --load-format dummy, nothing downloaded): {', '.join(sorted(BUNDLED))}

Every bad input, flag errors included, gets one 'error: ...' line on stderr and exit status 1.
Progress goes to stderr: live bars on a terminal, else one line per VLLM_UTILS_PROGRESS_INTERVAL seconds
(default 10)."""


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
                                       "model.",
                formatter_class=_HelpFormatter, epilog=EPILOG)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--demo", action="store_true", help="generate text for images and prompts")
    mode.add_argument("--perf", action="store_true", help="time synthetic requests of exact length")
    mode.add_argument("--acc", action="store_true",
                      help="score the replies to a dataset's questions as the dataset's evaluation does")
    p.add_argument("--model-type", default=None,
                   help="model family: llava, llava_next, llava_onevision, qwen2_vl or qwen2_5_vl (default: the one "
                        "the model folder's config.json names; a mismatch is refused)")
    p.add_argument("--model", default=None,
                   help="model folder (Hugging Face layout), or a bundled name with --load-format dummy "
                        "(default: a tiny random LLaVA, built and cached on first use)")
    p.add_argument("--device", default=None, help="cpu, cuda or gcu (default: cuda if present, else cpu)")
    p.add_argument("--input-image", action="append", default=[],
                   help="--demo: image file (repeatable); --perf: the image of every request (default: black)")
    p.add_argument("--input-video", action="append", default=[],
                   help="--demo: video file (repeatable; one request each, with every --prompt); --perf: the video of "
                        "every request (instead of images). Video models only (qwen2_vl, qwen2_5_vl); needs PyAV")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames sampled evenly from each --input-video (default: 16); --perf without --input-video: "
                        "requests carry a black video of this many frames of --input-vision-shape")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens computed per engine step; below --max-model-len, long prompts are prefilled in "
                        "chunks of it, with the running requests' decodes in the same steps (default: "
                        "max(8192, --max-model-len): whole prompts)")
    p.add_argument("--mm-per-prompt", type=int, default=1,
                   help="images per request: --demo groups each N consecutive --input-image into one prompt; "
                        "--perf gives every synthetic request N images")
    p.add_argument("--input-vision-shape", default=None,
                   help="--perf: HEIGHT,WIDTH of the synthetic images (or video frames), ';' between images (e.g. "
                        "672,672 or 336,672;672,336; default: the processor's size)")
    p.add_argument("--prompt", action="append", default=[],
                   help=f"--demo: prompt text (repeatable; default: '{DEFAULT_PROMPT}'). The chat template places "
                        f"the image before it; a prompt holding one {'<image>'} places it there instead")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="ranks (processes) the model is split over; must divide the heads and MLP widths")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's max_position_embeddings)")
    p.add_argument("--input-len", type=int, default=1024, help="--perf: prompt tokens, image positions included")
    p.add_argument("--output-len", type=int, default=None,
                   help="tokens to generate, >= 1 (default: 64 for --demo, 128 for --perf; --acc: per metric, "
                        "1024 for ROUGE, 32 for choices and ANLS, 16 for VQA)")
    p.add_argument("--num-prompts", type=int, default=1,
                   help="--perf: requests in each timed run; --acc: the first N rows (default there: all)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="most requests running at once (default: the number of requests, at most 256)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (engine only)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, float16 or bfloat16")
    p.add_argument("--enforce-eager", action="store_true", help="do not capture CUDA graphs (engine only)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of random weights, synthetic requests and sampling (one generator for all requests)")
    p.add_argument("--temperature", type=float, default=0.0, help="--demo: sampling temperature; 0 is greedy")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV-cache blocks (engine only; default: sized from memory)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="auto: the folder's safetensors; dummy: random weights (no checkpoint needed)")
    p.add_argument("--num-iters", type=int, default=1, help="--perf: timed repetitions")
    p.add_argument("--backend", default="engine", choices=["engine", "hf"],
                   help="engine: ours; hf: the same workload through HF transformers' generate, for comparison")
    p.add_argument("--output-json", default=None,
                   help="--perf, --acc: also write settings, metrics and environment to this file")
    p.add_argument("--dataset", default=None,
                   help="--acc: a Hugging Face dataset folder (parquet/arrow files as published, or save_to_disk), "
                        "one parquet/arrow file, a JSONL, or a bundled sample: " + ", ".join(ACC_SAMPLES)
                        + " (default: sample-jsonl)")
    p.add_argument("--dataset-format", default=None,
                   help="--acc: jsonl, llava-bench, mmmu, textvqa or docvqa (default: from the columns)")
    p.add_argument("--dataset-split", default=None,
                   help="--acc: the split of a folder holding several (default: validation, else the only one)")
    p.add_argument("--save-output", default=None,
                   help="--acc: write one JSON line per sample (id, prompt, answer, reference, score) to this file")
    p.add_argument("--reference", default=None, choices=["hf"],
                   help="--acc, --demo: run the same prompts through HF transformers and report how well our "
                        "engine agrees (greedy exact match, first divergence, teacher-forced top-1 and log-probs)")
    p.add_argument("--reference-dtype", default="float32", help="--reference: the reference's dtype")
    p.add_argument("--reference-device", default="cpu", help="--reference: the reference's device")
    return p


def explicit_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the flags given on the command line (whatever their value)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.explicit = explicit_flags(argv)
    return args


def resolve_config(args: argparse.Namespace) -> "ResolvedConfig":
    """The flags as the engine's configuration, resolved against the model's once (no weights read)."""
    from vllm_utils.config import EngineConfig
    from vllm_utils.engine.resolve import resolve

    return resolve(EngineConfig(model=args.model, **engine_args(args)), args.model_type)


def engine_args(args: argparse.Namespace) -> dict:
    from vllm_utils.platforms import default_device

    return dict(
        device=args.device or default_device(),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        max_num_seqs=args.batch_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        seed=args.seed,
        load_format=args.load_format,
    )


def ignored_by_hf(args: argparse.Namespace) -> list[str]:
    return [flag for flag in ENGINE_ONLY_FLAGS if flag[2:].replace("-", "_") in args.explicit]


def make_llm(args: argparse.Namespace, config: "ResolvedConfig"):
    """Our engine, or HF transformers behind the same interface (`--backend hf`), loaded as a phase."""
    from vllm_utils.progress import phase

    weights = " with random weights" if args.load_format == "dummy" else ""
    what = f"Loading the model {args.model}{weights} on {config.device}"
    if args.backend == "hf":
        from vllm_utils.bench.hf_backend import HFGenerate

        if ignored_by_hf(args):
            print(f"note: --backend hf ignores the engine-only flags {', '.join(ignored_by_hf(args))}",
                  file=sys.stderr)
        with phase(what + " through HF transformers", "Loading"):
            return HFGenerate(config)
    from vllm_utils.llm import LLM

    with phase(what, "Loading"):
        return LLM(config)


def quiet_libraries() -> None:
    """Our own progress bars and errors only: no advisory warnings from transformers."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def preflight(args: argparse.Namespace) -> None:
    """Everything that can be checked without the model's weights."""
    from vllm_utils.bench.preflight import check_flags, check_model_name, check_outputs, check_reference
    from vllm_utils.models.registry import check_model_type

    check_flags(args)
    check_reference(args)
    check_outputs(args)
    if args.model_type is not None:
        check_model_type(args.model_type)
    check_model_name(args.model, args.load_format)


def run(args: argparse.Namespace) -> None:
    preflight(args)
    if args.demo:
        from vllm_utils.bench.demo import run_demo

        run_demo(args, resolve_config, make_llm)
    elif args.acc:
        from vllm_utils.bench.acc.run import run_acc
        from vllm_utils.bench.perf import save_reports
        from vllm_utils.bench.report import environment

        from vllm_utils.bench.demo import use_default_demo_model

        if args.model is None:
            use_default_demo_model(args, with_image=False)
        if args.dataset is None:
            args.dataset = "sample-jsonl"
            print("No --dataset given: scoring the bundled sample-jsonl.", file=sys.stderr)
        run_acc(args, resolve_config, make_llm, save_reports, environment)
    else:
        from vllm_utils.bench.perf import run_perf

        run_perf(args, resolve_config, make_llm)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    import torch

    try:
        run(args)
    except (UserError, torch.OutOfMemoryError, MemoryError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
