"""Checks that need no weights, run before the model loads (a 7B takes minutes to build): flag values,
output paths, the model name, and the lengths that the model's config alone decides."""
import argparse
import math
import os

from vllm_utils.errors import UserError

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's; requests are checked again against the processor's own token

# flags whose value counts something: 0 or less is refused, never read as "the default"
COUNTS = ("--input-len", "--output-len", "--num-prompts", "--num-iters", "--batch-size", "--block-size",
          "--tensor-parallel-size", "--num-kv-blocks", "--max-model-len")


def _value(args: argparse.Namespace, flag: str):
    return getattr(args, flag[2:].replace("-", "_"))


def check_flags(args: argparse.Namespace) -> None:
    for flag in COUNTS:
        value = _value(args, flag)
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")


def check_outputs(args: argparse.Namespace) -> None:
    """Every file a run will write, checked before it starts, so that no result is lost at its end."""
    from vllm_utils.bench.report import check_output_json, probe_folder

    if args.perf:
        probe_folder(os.getcwd(), "the result CSV", "run from a writable working directory (the CSV goes there)")
    if args.output_json:
        if not args.perf:
            raise UserError("--output-json applies to --perf only; drop it or use --perf")
        check_output_json(args.output_json)


def check_model_name(model: str | None, load_format: str) -> None:
    """A Hub name whose config the package carries runs with random weights only: nothing is downloaded."""
    from vllm_utils.models.bundled_configs import bundled_config_dir

    if model is not None and load_format != "dummy" and bundled_config_dir(model):
        raise UserError(f"'{model}' is a Hugging Face Hub name and nothing is downloaded here: add --load-format "
                        f"dummy to run it with random weights, or download it (e.g. `hf download {model} "
                        f"--local-dir DIR`) and pass --model DIR")


def check_prompt_placeholders(prompts: list[str], placeholder: str = IMAGE_PLACEHOLDER) -> None:
    """--demo: each prompt has one image; its text may hold that image's placeholder, or none."""
    for prompt in prompts:
        count = prompt.count(placeholder)
        if count > 1:
            raise UserError(f"--prompt {prompt!r} holds {count} {placeholder} placeholders for its one image; "
                            f"leave them out (the image is placed before the text) or put exactly one where "
                            f"the image belongs")


def check_perf_lengths(args: argparse.Namespace) -> None:
    """--perf lengths against the model's config: an image's positions and the context length."""
    from vllm_utils.bench.synthetic import check_input_len
    from vllm_utils.config import load_hf_config
    from vllm_utils.models.registry import model_class

    hf_config = load_hf_config(args.model)
    cls = model_class(hf_config, args.model_type, args.model)
    check_input_len(args.input_len, cls.image_features(hf_config))
    positions = hf_config.text_config.max_position_embeddings
    if args.max_model_len is not None and args.max_model_len > positions:
        raise UserError(f"--max-model-len {args.max_model_len} exceeds the model's max_position_embeddings "
                        f"({positions}); lower it")
    limit = args.max_model_len or positions
    if args.input_len + args.output_len > limit:
        raise UserError(f"--input-len {args.input_len} + --output-len {args.output_len} exceeds the max model "
                        f"length {limit}; raise --max-model-len or shorten the request")
