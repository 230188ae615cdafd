"""The command line's flags as one frozen spec per mode: every default applied once, every check a flag's value
alone allows (counts, ranges, flags of another mode), before anything is read from disk. Only this module and the
CLI know argparse; the plan and the modes read specs."""
import argparse
import json
import math
import os
from dataclasses import dataclass

from vllm_utils.errors import UserError
from vllm_utils.multimodal.video import DEFAULT_NUM_FRAMES, check_num_frames

DEFAULT_PROMPT = "Describe the picture."
DEFAULT_VIDEO_PROMPT = "Describe the video."
DEFAULT_OUTPUT_LEN = {"demo": 64, "perf": 128}
# --acc: new tokens per reply by metric, as lmms-eval's task configs allow (the most any sample's metric allows)
ACC_OUTPUT_LEN = {"rouge": 1024, "choice": 32, "vqa": 16, "anls": 32, "open": 32, "videomme": 16, "ocr": 4096}
MAX_SEED = 2**32 - 1
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float", "half")
REFERENCE_DTYPES = ("float32", "float16", "bfloat16")

# flags whose value counts something: 0 or less is refused, never read as "the default"
COUNTS = ("input_len", "output_len", "num_prompts", "num_iters", "batch_size", "block_size", "mm_per_prompt",
          "max_num_batched_tokens", "tensor_parallel_size", "num_kv_blocks", "max_model_len")
# flags of some modes only (argparse destinations): given to another mode, they are refused
MODES_OF = {
    "input_image": ("demo", "perf"), "input_video": ("demo", "perf"), "num_frames": ("demo", "perf", "acc"),
    "mm_per_prompt": ("demo", "perf"), "prompt": ("demo",), "temperature": ("demo",), "top_p": ("demo",),
    "top_k": ("demo",), "input_len": ("perf",), "input_vision_shape": ("perf",), "num_iters": ("perf",),
    "num_prompts": ("perf", "acc"), "dataset": ("acc",), "dataset_format": ("acc",), "dataset_split": ("acc",),
    "video_dir": ("acc",), "image_dir": ("acc",), "save_output": ("acc",), "reference": ("demo", "acc"),
    "reference_dtype": ("demo", "acc"),
    "reference_device": ("demo", "acc"), "output_json": ("perf", "acc"), "result_dir": ("perf", "acc"),
    "result_filename": ("perf", "acc"), "save_result": ("perf", "acc"),
}
ENGINE_ONLY = ("block_size", "num_kv_blocks", "enforce_eager", "enable_prefix_caching")  # what --backend hf ignores


def flag(dest: str) -> str:
    if dest == "save_result":
        return "--save-result/--no-save-result"
    return "--" + dest.replace("_", "-")


@dataclass(frozen=True)
class EngineSpec:
    """The model and how to run it: every mode's. `model` None: the family's tiny default model."""

    model: str | None
    model_type: str | None
    device: str | None  # None: the platform's default
    dtype: str
    load_format: str
    tensor_parallel_size: int
    max_model_len: int | None
    max_num_batched_tokens: int | None
    batch_size: int | None  # None: as many as the mode's requests (at most 256)
    block_size: int
    num_kv_blocks: int | None
    enforce_eager: bool
    seed: int
    backend: str  # "engine" or "hf"
    ignored_by_hf: tuple[str, ...]  # engine-only flags given with --backend hf
    mm_processor_kwargs: dict | None = None  # settings of the model's HF processor (GOT-OCR2's multi-crop, ...)
    enable_prefix_caching: bool | None = None  # None: on where it is exact


@dataclass(frozen=True)
class ReferenceSpec:
    """--reference hf: the same prompts through HF transformers, in this dtype on this device."""

    dtype: str
    device: str


@dataclass(frozen=True)
class ReportSpec:
    """Where --perf and --acc write their results."""

    save_result: bool
    result_dir: str
    result_filename: str | None  # None: YYYYmmddHHMMSS.csv, never one already taken
    output_json: str | None


@dataclass(frozen=True)
class DemoSpec:
    engine: EngineSpec
    images: tuple[str, ...]  # empty with no video: the default model's picture (no --model) or an error
    videos: tuple[str, ...]
    num_frames: int  # frames sampled from each video
    fewer_frames: bool  # a shorter clip gives every frame it has (--num-frames not given)
    mm_per_prompt: int
    prompts: tuple[str, ...]  # given, else the default for images or videos
    output_len: int
    temperature: float
    top_p: float
    top_k: int
    reference: ReferenceSpec | None
    mode: str = "demo"


@dataclass(frozen=True)
class PerfSpec:
    engine: EngineSpec
    images: tuple[str, ...]  # empty: black images of `vision_shapes`, or the processor's size
    video: str | None
    num_frames: int | None  # frames of the video; with no video file a black one of so many; None: images
    fewer_frames: bool  # as for --demo
    mm_per_prompt: int
    vision_shapes: tuple[tuple[int, int], ...]  # (height, width) of synthetic images or frames
    input_len: int
    output_len: int
    num_prompts: int
    num_iters: int
    report: ReportSpec
    mode: str = "perf"


@dataclass(frozen=True)
class AccSpec:
    engine: EngineSpec
    dataset: str  # a path or a bundled sample's name
    dataset_given: bool  # else the bundled sample-jsonl
    dataset_format: str | None
    dataset_split: str | None
    limit: int | None  # --num-prompts: the first N rows
    num_frames: int  # frames sampled from each video of the dataset
    fewer_frames: bool  # as for --demo
    video_dir: str | None  # Video-MME's videos; None: beside the dataset
    image_dir: str | None  # Fox's pictures; None: the folder the benchmark pairs with the file
    output_len: int | None  # None: per metric
    save_output: str | None
    reference: ReferenceSpec | None
    report: ReportSpec
    mode: str = "acc"


Spec = DemoSpec | PerfSpec | AccSpec


def spec_from_args(args: argparse.Namespace, given: set[str]) -> Spec:
    """`given`: the destinations of the flags on the command line (whatever their value)."""
    mode = "demo" if args.demo else "perf" if args.perf else "acc"
    check_modes(mode, args, given)
    check_values(args)
    engine = engine_spec(args, given)
    if mode == "demo":
        return demo_spec(args, engine)
    if mode == "perf":
        return perf_spec(args, engine)
    return acc_spec(args, engine, given)


def check_values(args: argparse.Namespace) -> None:
    for dest in COUNTS:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise UserError(f"{flag(dest)} must be >= 1, got {value}")
    if args.num_frames is not None:
        check_num_frames(args.num_frames)
    if args.dtype != "auto" and args.dtype not in DTYPE_NAMES:
        raise UserError(f"unknown --dtype '{args.dtype}': use auto, {', '.join(DTYPE_NAMES)}")
    if args.result_filename is not None and (not args.result_filename or os.path.basename(args.result_filename)
                                             != args.result_filename):
        raise UserError(f"--result-filename '{args.result_filename}' must be a file name, inside --result-dir (give "
                        f"the folder there)")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < -1 or args.top_k == 0:
        raise UserError(f"--top-k must be -1 (all tokens) or >= 1, got {args.top_k}")
    if args.temperature == 0:
        for dest, off in (("top_p", 1.0), ("top_k", -1)):
            if getattr(args, dest) != off:
                raise UserError(f"{flag(dest)} shapes sampling, and --temperature 0 is greedy: give --temperature > 0 "
                                f"or drop {flag(dest)}")
    if args.reference_dtype not in REFERENCE_DTYPES:
        raise UserError(f"unknown --reference-dtype '{args.reference_dtype}': use {', '.join(REFERENCE_DTYPES)}")
    for path in args.input_video:
        if not os.path.isfile(path):
            raise UserError(f"--input-video '{path}' is not a file; give the path of a video file")


def check_modes(mode: str, args: argparse.Namespace, given: set[str]) -> None:
    """A flag of other modes is refused, the same way for every flag and mode."""
    for dest in sorted(given & set(MODES_OF)):
        modes = MODES_OF[dest]
        if mode not in modes:
            hint = " (--backend hf times HF)" if dest == "reference" and mode == "perf" else ""
            raise UserError(f"{flag(dest)} applies to {' and '.join('--' + m for m in modes)} only; drop it for "
                            f"--{mode}{hint}")
    for dest in ("reference_dtype", "reference_device"):
        if dest in given and args.reference is None:
            raise UserError(f"{flag(dest)} sets the reference of --reference hf; add --reference hf or drop it")
    if args.reference:
        if args.backend == "hf":
            raise UserError("--reference hf compares our engine with HF: drop --backend hf")
        if args.temperature != 0:
            raise UserError("--reference compares greedy outputs: drop --temperature (or set it to 0)")
        if args.load_format == "dummy":
            raise UserError("--reference needs the checkpoint's weights (HF cannot load our random ones): drop "
                            "--load-format dummy")
    if args.save_result is False and args.result_filename:
        raise UserError("--result-filename names the result CSV and --no-save-result writes none; drop one")


def check_model_name(model: str | None, load_format: str) -> None:
    """A Hub name whose config the package carries runs with random weights only: nothing is downloaded."""
    from vllm_utils.bundled import bundled_config_dir

    if model is None or load_format == "dummy" or not bundled_config_dir(model):
        return
    from vllm_utils.config import cached_snapshot

    if not cached_snapshot(model):
        raise UserError(f"'{model}' is a Hugging Face Hub name and nothing is downloaded here: add --load-format "
                        f"dummy to run it with random weights, or download it (e.g. `hf download {model} "
                        f"--local-dir DIR`) and pass --model DIR")


def engine_spec(args: argparse.Namespace, given: set[str]) -> EngineSpec:
    check_model_name(args.model, args.load_format)
    ignored = tuple(flag(d) for d in ENGINE_ONLY if d in given) if args.backend == "hf" else ()
    if args.backend == "hf" and args.tensor_parallel_size != 1:
        raise UserError("--backend hf runs on one device: use --tensor-parallel-size 1")
    return EngineSpec(
        model=args.model, model_type=args.model_type, device=args.device, dtype=args.dtype,
        load_format=args.load_format, tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
        batch_size=args.batch_size, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        enforce_eager=args.enforce_eager, seed=args.seed, backend=args.backend, ignored_by_hf=ignored,
        mm_processor_kwargs=parse_processor_kwargs(args.mm_processor_kwargs),
        enable_prefix_caching=args.enable_prefix_caching)


def parse_processor_kwargs(text: str | None) -> dict | None:
    """--mm-processor-kwargs: a JSON object, as vLLM takes it."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"--mm-processor-kwargs takes a JSON object, e.g. '{{\"crop_to_patches\": true}}'; got "
                        f"{text!r}")
    return value


def reference_spec(args: argparse.Namespace) -> ReferenceSpec | None:
    return ReferenceSpec(args.reference_dtype, args.reference_device) if args.reference else None


def report_spec(args: argparse.Namespace) -> ReportSpec:
    return ReportSpec(args.save_result, args.result_dir, args.result_filename, args.output_json)


def demo_spec(args: argparse.Namespace, engine: EngineSpec) -> DemoSpec:
    default_prompt = DEFAULT_VIDEO_PROMPT if args.input_video else DEFAULT_PROMPT
    if args.num_frames is not None and not args.input_video:
        raise UserError("--num-frames samples each --input-video's frames: give --input-video or drop --num-frames")
    if args.input_video and engine.model is None and engine.model_type is None:
        raise UserError("--input-video needs a video model: pass --model with the folder of one, or the --model-type "
                        "of a family that takes videos (e.g. qwen2_vl) for its tiny random model")
    if args.input_video and args.mm_per_prompt > 1:
        raise UserError("--mm-per-prompt groups images into prompts, and with --input-video every --input-image goes "
                        "into each video's request: drop --mm-per-prompt")
    return DemoSpec(
        engine=engine, images=tuple(args.input_image), videos=tuple(args.input_video),
        num_frames=args.num_frames or DEFAULT_NUM_FRAMES, fewer_frames=args.num_frames is None,
        mm_per_prompt=args.mm_per_prompt,
        prompts=tuple(args.prompt or [default_prompt]), output_len=args.output_len or DEFAULT_OUTPUT_LEN["demo"],
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, reference=reference_spec(args))


def perf_spec(args: argparse.Namespace, engine: EngineSpec) -> PerfSpec:
    if args.input_video and args.input_image:
        raise UserError("--perf takes --input-image or --input-video, not both: its requests carry images or one video")
    if len(args.input_video) > 1:
        raise UserError("--perf takes one --input-video (every request carries it); drop the others")
    shapes = parse_vision_shapes(args.input_vision_shape)
    if len(args.input_image) not in (0, 1, args.mm_per_prompt):
        each = f"one --input-image (used for each) or {args.mm_per_prompt}" if args.mm_per_prompt > 1 else \
            "one --input-image (or raise --mm-per-prompt)"
        raise UserError(f"--perf gives every request --mm-per-prompt {args.mm_per_prompt} image(s): pass {each}, not "
                        f"{len(args.input_image)}")
    if args.input_image and shapes:
        raise UserError("--input-vision-shape sizes synthetic images, and --input-image gives real ones; drop one")
    video = args.input_video[0] if args.input_video else None
    if (video is not None or args.num_frames is not None) and args.mm_per_prompt > 1:
        raise UserError("--mm-per-prompt gives each request several images, and a video request carries one video: "
                        "drop --mm-per-prompt or the video")
    if (video is not None or args.num_frames is not None) and len(shapes) > 1:
        raise UserError(f"--input-vision-shape gives {len(shapes)} sizes but a video has one; give one HEIGHT,WIDTH")
    if video is not None and shapes:
        raise UserError("--input-vision-shape sizes a synthetic video, and --input-video gives a real one; drop one")
    if shapes and len(shapes) not in (1, args.mm_per_prompt) and video is None and args.num_frames is None:
        raise UserError(f"--input-vision-shape gives {len(shapes)} sizes for --mm-per-prompt {args.mm_per_prompt} "
                        f"images; give one size, or one per image")
    output_len = args.output_len or DEFAULT_OUTPUT_LEN["perf"]
    if args.max_model_len is not None and args.input_len + output_len > args.max_model_len:
        raise UserError(f"--input-len {args.input_len} + --output-len {output_len} exceeds --max-model-len "
                        f"{args.max_model_len}; raise --max-model-len or shorten the request")
    return PerfSpec(
        engine=engine, images=tuple(args.input_image), video=video,
        num_frames=args.num_frames or (DEFAULT_NUM_FRAMES if video is not None else None),
        fewer_frames=args.num_frames is None,
        mm_per_prompt=args.mm_per_prompt, vision_shapes=tuple(shapes), input_len=args.input_len,
        output_len=output_len, num_prompts=args.num_prompts, num_iters=args.num_iters, report=report_spec(args))


def acc_spec(args: argparse.Namespace, engine: EngineSpec, given: set[str]) -> AccSpec:
    return AccSpec(
        engine=engine, dataset=args.dataset or "sample-jsonl", dataset_given=args.dataset is not None,
        dataset_format=args.dataset_format,
        dataset_split=args.dataset_split, limit=args.num_prompts if "num_prompts" in given else None,
        num_frames=args.num_frames or DEFAULT_NUM_FRAMES, fewer_frames=args.num_frames is None,
        video_dir=args.video_dir, image_dir=args.image_dir, output_len=args.output_len, save_output=args.save_output,
        reference=reference_spec(args), report=report_spec(args))


def parse_vision_shapes(text: str | None) -> list[tuple[int, int]]:
    """--input-vision-shape "H,W" or "H,W;H,W;..." -> [(height, width), ...], within the pixel count an image file
    may have (twice PIL's decompression-bomb limit, as for --input-image)."""
    if not text:
        return []
    from vllm_utils.multimodal.image import MAX_PIXELS

    shapes = []
    for part in text.split(";"):
        try:
            height, width = (int(v) for v in part.split(","))
        except ValueError:
            raise UserError(f"--input-vision-shape '{text}': give HEIGHT,WIDTH in pixels, ';' between images "
                            f"(e.g. 672,672 or 336,672;672,336)") from None
        if height < 1 or width < 1:
            raise UserError(f"--input-vision-shape '{text}': sizes must be >= 1 pixel")
        if height * width > MAX_PIXELS:
            raise UserError(f"--input-vision-shape {height},{width} has {height * width} pixels, more than an image "
                            f"may have ({MAX_PIXELS}); the model resizes images far smaller: give a smaller size")
        shapes.append((height, width))
    return shapes
