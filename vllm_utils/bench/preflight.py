"""Checks that need no weights, run before the model loads (a 7B takes minutes to build): flag values,
output paths, the model name, and the lengths that the model's config alone decides."""
import argparse
import math
import os
from typing import TYPE_CHECKING

from vllm_utils.errors import UserError

if TYPE_CHECKING:
    from vllm_utils.config import ResolvedConfig
    from vllm_utils.multimodal.processor import ProcessorAdapter

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's; requests are checked again against the processor's own token

# flags whose value counts something: 0 or less is refused, never read as "the default"
COUNTS = ("--input-len", "--output-len", "--num-prompts", "--num-iters", "--batch-size", "--block-size", "--mm-per-prompt",
          "--max-num-batched-tokens",
          "--tensor-parallel-size", "--num-kv-blocks", "--max-model-len")


def _value(args: argparse.Namespace, flag: str):
    return getattr(args, flag[2:].replace("-", "_"))


def check_flags(args: argparse.Namespace) -> None:
    for flag in COUNTS:
        value = _value(args, flag)
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.num_frames is not None:
        from vllm_utils.multimodal.video import check_num_frames

        check_num_frames(args.num_frames)
    if (args.input_video or args.num_frames is not None) and args.acc:
        raise UserError("--input-video and --num-frames apply to --demo and --perf; drop them for --acc")
    if args.input_video and args.input_image:
        raise UserError("give --input-image or --input-video, not both: a request carries images or one video")
    if len(args.input_video) > 1 and args.perf:
        raise UserError("--perf takes one --input-video (every request carries it); drop the others")
    for path in args.input_video:
        if not os.path.isfile(path):
            raise UserError(f"--input-video '{path}' is not a file; give the path of a video file")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")


def check_outputs(args: argparse.Namespace) -> None:
    """Every file a run will write, checked before it starts, so that no result is lost at its end."""
    from vllm_utils.bench.report import check_output_json, probe_folder

    if args.perf or args.acc:
        probe_folder(os.getcwd(), "the result CSV", "run from a writable working directory (the CSV goes there)")
    if args.output_json:
        if not (args.perf or args.acc):
            raise UserError("--output-json applies to --perf and --acc only; drop it or use one of them")
        check_output_json(args.output_json)
    for flag, value in (("--dataset", args.dataset), ("--dataset-format", args.dataset_format),
                        ("--dataset-split", args.dataset_split), ("--save-output", args.save_output)):
        if value is not None and not args.acc:
            raise UserError(f"{flag} applies to --acc only; drop it or use --acc")
    if args.save_output:
        if os.path.isdir(args.save_output):
            raise UserError(f"--save-output '{args.save_output}' is a directory; give a file path such as "
                            f"{os.path.join(args.save_output, 'samples.jsonl')}")
        probe_folder(os.path.dirname(os.path.abspath(args.save_output)), "--save-output")


def check_reference(args: argparse.Namespace) -> None:
    """--reference compares greedy outputs of the same weights: HF must load the very checkpoint we run."""
    if not args.reference:
        return
    if args.perf:
        raise UserError("--reference applies to --acc and --demo; drop it for --perf (--backend hf times HF)")
    if args.backend == "hf":
        raise UserError("--reference hf compares our engine with HF: drop --backend hf")
    if args.temperature != 0:
        raise UserError("--reference compares greedy outputs: drop --temperature (or set it to 0)")
    if args.load_format == "dummy":
        raise UserError("--reference needs the checkpoint's weights (HF cannot load our random ones): drop "
                        "--load-format dummy")


def check_reads_text(args: argparse.Namespace, config: "ResolvedConfig", mode: str) -> "ProcessorAdapter":
    """--demo and --acc tokenize text: the model folder must hold a tokenizer. Reads the processor files, not the
    weights; returns the processor."""
    from vllm_utils.models.registry import family

    processor = family(config.model_type).processor(config.folder, config.hf_config, allow_missing=True)
    if processor.tokenizer is None:
        raise UserError(f"--model {args.model} has no tokenizer files, and {mode} tokenizes text: point --model at "
                        f"the complete model folder (only --perf runs without them, with --load-format dummy)")
    return processor


def check_model_name(model: str | None, load_format: str) -> None:
    """A Hub name whose config the package carries runs with random weights only: nothing is downloaded."""
    from vllm_utils.bundled import bundled_config_dir

    if model is not None and load_format != "dummy" and bundled_config_dir(model):
        raise UserError(f"'{model}' is a Hugging Face Hub name and nothing is downloaded here: add --load-format "
                        f"dummy to run it with random weights, or download it (e.g. `hf download {model} "
                        f"--local-dir DIR`) and pass --model DIR")


def check_prompt_placeholders(prompts: list[str], per_prompt: int = 1, placeholder: str = IMAGE_PLACEHOLDER) -> None:
    """--demo: each prompt has `per_prompt` images; its text holds a placeholder for each, or none."""
    for prompt in prompts:
        count = prompt.count(placeholder)
        if count not in (0, per_prompt):
            raise UserError(f"--prompt {prompt!r} holds {count} {placeholder} placeholder(s) for its {per_prompt} "
                            f"image(s); leave them out (the images are placed before the text) or put exactly "
                            f"{per_prompt}, where the images belong")


def check_perf_lengths(args: argparse.Namespace, config: "ResolvedConfig") -> None:
    """--perf lengths against the resolved configuration: an image's positions and the context length. Reads the
    processor files, not the weights."""
    from vllm_utils.bench.synthetic import check_input_len, fixed_tokens, perf_images, perf_video
    from vllm_utils.models.registry import family

    processor = family(config.model_type).processor(config.folder, config.hf_config,
                                                    allow_missing=args.load_format == "dummy")
    check_takes_video(args, config)
    video = perf_video(args, processor)
    images = [] if video is not None else perf_images(args, processor)
    check_input_len(args.input_len, *fixed_tokens(processor, images, video), "video" if video else "images")
    if args.input_len + args.output_len > config.max_model_len:
        raise UserError(f"--input-len {args.input_len} + --output-len {args.output_len} exceeds the max model "
                        f"length {config.max_model_len}; raise --max-model-len or shorten the request")


def check_takes_video(args: argparse.Namespace, config: "ResolvedConfig") -> None:
    """Videos only for a family that takes them, refused before the weights load."""
    from vllm_utils.models.registry import family

    if (args.input_video or args.num_frames is not None) and family(config.model_type).processor.video_token is None:
        raise UserError(f"--input-video/--num-frames: {config.model_type} models take no video; use a video model "
                        f"(qwen2_vl, qwen2_5_vl) or give images")
