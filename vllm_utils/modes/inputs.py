"""Each mode's requests, built once by the plan before the weights load: --demo's pictures or videos with their
prompts (rendered and processed), --perf's synthetic requests (the warm-up's and every timed run's), --acc's
samples (their pictures are read per batch, so that a bad one fails that sample only)."""
from dataclasses import dataclass

from vllm_utils.config import ResolvedConfig
from vllm_utils.errors import UserError
from vllm_utils.modes.acc.bundled import dataset_path
from vllm_utils.modes.acc.readers import read_dataset
from vllm_utils.modes.acc.sample import Sample
from vllm_utils.modes.spec import ACC_OUTPUT_LEN, AccSpec, DemoSpec, PerfSpec
from vllm_utils.modes.synthetic import SyntheticRequest, check_input_len, request_images, request_items, \
    synthetic_requests
from vllm_utils.multimodal.processor import ProcessorAdapter


@dataclass(frozen=True)
class DemoInputs:
    requests: list[dict]  # the prompt's text, token ids and tensors, as LLM.generate takes them
    labels: list[str]  # what each request carried, as its output line names it


@dataclass(frozen=True)
class PerfInputs:
    warm_up: list[SyntheticRequest]
    runs: list[list[SyntheticRequest]]  # one list of --num-prompts requests per timed run
    vision: str  # what the multimodal positions hold: "image" or "video"
    synthetic_video: bool  # a black video of --num-frames frames


@dataclass(frozen=True)
class AccInputs:
    samples: list[Sample]
    output_lens: list[int]  # new tokens of each sample's reply
    output_len: int | str  # as the settings record it: --output-len, or "per metric"


# ---- --demo -------------------------------------------------------------------------------------------------
def demo_pairs(spec: DemoSpec, default_image: str | None) -> list[tuple[tuple[str, ...], str]]:
    """Requests as (inputs, prompt): each video (after every image given) with every prompt; else each
    `mm_per_prompt` consecutive images with one prompt (one prompt for every group, one group for every prompt, or
    as many of each)."""
    if spec.videos:
        return [((*spec.images, video), text) for video in spec.videos for text in spec.prompts]
    images = list(spec.images) or ([default_image] if default_image else [])
    if not images:
        raise UserError("--demo needs --input-image IMAGE (repeatable) or --input-video VIDEO")
    per_prompt = spec.mm_per_prompt
    if not spec.images and per_prompt > 1:
        raise UserError(f"--mm-per-prompt {per_prompt} puts {per_prompt} images in each prompt, and no --input-image "
                        f"was given (the default picture is one): give --input-image {per_prompt} times")
    if len(images) % per_prompt:
        raise UserError(f"{len(images)} --input-image do not split into groups of --mm-per-prompt {per_prompt}; "
                        f"pass a multiple of {per_prompt} images")
    groups = [tuple(images[i : i + per_prompt]) for i in range(0, len(images), per_prompt)]
    prompts = list(spec.prompts)
    if len(prompts) == 1:
        prompts = prompts * len(groups)
    elif len(groups) == 1:
        groups = groups * len(prompts)
    if len(groups) != len(prompts):
        raise UserError(f"{len(groups)} image group(s) of --mm-per-prompt {per_prompt} and {len(prompts)} --prompt "
                        f"given; pass one prompt, one group, or as many of each")
    return list(zip(groups, prompts))


def demo_inputs(spec: DemoSpec, config: ResolvedConfig, processor: ProcessorAdapter, default_image: str | None,
                notes: list[str]) -> DemoInputs:
    """A prompt holding the image placeholder is rendered as given; otherwise the chat template places the
    pictures (or the video) before it."""
    from vllm_utils.multimodal.image import load_image

    pairs = demo_pairs(spec, default_image)
    if spec.videos:
        check_takes_video(processor, config)
        from vllm_utils.multimodal.video import load_video

        videos = {path: load_video(path, spec.num_frames, at_most=spec.fewer_frames) for path in spec.videos}
        pictures = [load_image(path) for path in spec.images]
        requests = [_processed(processor, processor.chat_prompt(text, num_images=len(pictures), num_videos=1),
                               pictures, [videos[paths[-1]]]) for paths, text in pairs]
        shown = f"Image: {', '.join(spec.images)!r}, " if spec.images else ""
        return DemoInputs(_within(requests, config), [f"{shown}Video: {paths[-1]!r}" for paths, _ in pairs])

    if not spec.images:
        notes.append(f"No --input-image given: using the generated picture {default_image}.")
    placeholder = processor.image_token  # the folder's, e.g. Qwen2-VL's <|image_pad|>
    check_prompt_placeholders([text for _, text in pairs], spec.mm_per_prompt, placeholder)
    images = {path: load_image(path) for paths, _ in pairs for path in paths}
    requests = []
    for paths, text in pairs:
        prompt = processor.chat_prompt(text, num_images=0 if placeholder in text else len(paths))
        requests.append(_processed(processor, prompt, [images[p] for p in paths]))
    return DemoInputs(_within(requests, config), [f"Image: {', '.join(paths)!r}" for paths, _ in pairs])


def _processed(processor: ProcessorAdapter, prompt: str, images: list, videos: list | None = None) -> dict:
    ids, mm_inputs = processor.process(prompt, images, videos)
    return {"prompt": prompt, "prompt_token_ids": ids, "mm_inputs": mm_inputs}


def _within(requests: list[dict], config: ResolvedConfig) -> list[dict]:
    for request in requests:
        length = len(request["prompt_token_ids"])
        if length >= config.max_model_len:
            raise UserError(f"the prompt is {length} tokens (image positions included), which leaves no room to "
                            f"generate within --max-model-len {config.max_model_len}; shorten the prompt or raise "
                            f"--max-model-len")
    return requests


def check_prompt_placeholders(prompts: list[str], per_prompt: int, placeholder: str) -> None:
    """Each prompt has `per_prompt` images; its text holds a placeholder for each, or none."""
    for prompt in prompts:
        count = prompt.count(placeholder)
        if count not in (0, per_prompt):
            raise UserError(f"--prompt {prompt!r} holds {count} {placeholder} placeholder(s) for its {per_prompt} "
                            f"image(s); leave them out (the images are placed before the text) or put exactly "
                            f"{per_prompt}, where the images belong")


def check_takes_video(processor: ProcessorAdapter, config: ResolvedConfig,
                      given: str = "--input-video/--num-frames", instead: str = "give images") -> None:
    if processor.video_token is None:
        from vllm_utils.models.registry import video_families

        raise UserError(f"{given}: {config.model_type} models take no video; use a video model "
                        f"({', '.join(video_families())}) or {instead}")


# ---- --perf -------------------------------------------------------------------------------------------------
def perf_inputs(spec: PerfSpec, config: ResolvedConfig, processor: ProcessorAdapter) -> PerfInputs:
    """Every request of the run, each exactly --input-len tokens: the one warm-up request and --num-iters runs of
    --num-prompts (each run its own random text)."""
    video = perf_video(spec, config, processor)
    if video is None:
        from vllm_utils.multimodal.image import load_image

        files = [load_image(path) for path in spec.images]
        images = request_images(processor, files, list(spec.vision_shapes), spec.mm_per_prompt)
    else:
        images = []
    items = request_items(processor, images, video)  # processed once, shared by every request
    check_input_len(spec.input_len, items.positions, items.fixed, "video" if video is not None else "images")
    if spec.input_len + spec.output_len > config.max_model_len:
        raise UserError(f"--input-len {spec.input_len} + --output-len {spec.output_len} exceeds the max model "
                        f"length {config.max_model_len}; raise --max-model-len or shorten the request")
    seed, length = spec.engine.seed, spec.input_len
    warm_up = synthetic_requests(processor, length, 1, images, seed=seed + 10_000, video=video, items=items)
    runs = [synthetic_requests(processor, length, spec.num_prompts, images, seed=seed + i, video=video, items=items)
            for i in range(spec.num_iters)]
    return PerfInputs(warm_up, runs, "video" if video is not None else "image",
                      synthetic_video=video is not None and spec.video is None)


def perf_video(spec: PerfSpec, config: ResolvedConfig, processor: ProcessorAdapter):
    """The video of every request: the file's frames, or with --num-frames alone black frames of
    --input-vision-shape (or the processor's size); None for image requests."""
    if spec.num_frames is None:
        return None
    check_takes_video(processor, config)
    from vllm_utils.multimodal.video import black_video, load_video

    if spec.video is not None:
        return load_video(spec.video, spec.num_frames, at_most=spec.fewer_frames)
    height, width = spec.vision_shapes[0] if spec.vision_shapes else processor.image_size[::-1]
    return black_video(spec.num_frames, height, width)


# ---- --acc --------------------------------------------------------------------------------------------------
def read_samples(spec: AccSpec) -> list[Sample]:
    return read_dataset(dataset_path(spec.dataset), spec.dataset_format, spec.dataset_split, spec.limit,
                        spec.video_dir, spec.image_dir)


def acc_inputs(spec: AccSpec, config: ResolvedConfig, processor: ProcessorAdapter, samples: list[Sample],
               notes: list[str]) -> AccInputs:
    """New tokens per reply: --output-len, else what the sample's metric allows. A dataset of videos needs a video
    model."""
    if not spec.dataset_given:
        notes.append(f"No --dataset given: scoring the bundled {spec.dataset}.")
    if any(s.videos for s in samples):
        check_takes_video(processor, config, f"--dataset '{spec.dataset}' holds videos", "a dataset of images")
    elif not spec.fewer_frames:
        raise UserError(f"--num-frames samples the videos of a dataset, and --dataset '{spec.dataset}' has none: "
                        f"drop --num-frames")
    lens = [spec.output_len or ACC_OUTPUT_LEN[s.metric] for s in samples]
    return AccInputs(samples, lens, spec.output_len or "per metric")
