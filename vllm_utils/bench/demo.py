"""`--demo`: images and prompts in, generated text out (and, with `--reference hf`, agreement with HF)."""
import argparse
import sys

from vllm_utils.errors import UserError

DEFAULT_PROMPT = "Describe the picture."
DEFAULT_VIDEO_PROMPT = "Describe the video."


def pair_images_and_prompts(images: list[str], prompts: list[str],
                            per_prompt: int = 1) -> list[tuple[tuple[str, ...], str]]:
    """Requests as (image paths, prompt): each `per_prompt` consecutive images with one prompt."""
    if len(images) % per_prompt:
        raise UserError(f"{len(images)} --input-image do not split into groups of --mm-per-prompt {per_prompt}; "
                        f"pass a multiple of {per_prompt} images")
    groups = [tuple(images[i : i + per_prompt]) for i in range(0, len(images), per_prompt)]
    prompts = prompts or [DEFAULT_PROMPT]
    if len(prompts) == 1:
        prompts = prompts * len(groups)
    elif len(groups) == 1:
        groups = groups * len(prompts)
    if len(groups) != len(prompts):
        raise UserError(f"{len(groups)} image group(s) of --mm-per-prompt {per_prompt} and {len(prompts)} --prompt "
                        f"given; pass one prompt, one group, or as many of each")
    return list(zip(groups, prompts))


def use_default_demo_model(args: argparse.Namespace, with_image: bool = True) -> None:
    from vllm_utils.bench.tiny_model import default_demo_assets

    args.model, default_image, built = default_demo_assets()
    print(f"No --model given: {'built' if built else 'using'} a tiny LLaVA with RANDOM weights at {args.model} "
          f"(its text is gibberish by design); pass --model PATH for a real checkpoint.", file=sys.stderr)
    if with_image and not args.input_image:
        args.input_image = [default_image]
        print(f"No --input-image given: using the generated picture {default_image}.", file=sys.stderr)


def demo_requests(processor, pairs: list[tuple[str, str]], images: dict) -> list[dict]:
    """A prompt holding the image placeholder is rendered as given; otherwise the image goes before it."""
    requests = []
    for paths, text in pairs:
        holds_image = processor.image_token in text
        prompt = processor.chat_prompt(text, num_images=0 if holds_image else len(paths))
        requests.append({"prompt": prompt, "multi_modal_data": {"image": [images[p] for p in paths]}})
    return requests


def run_demo(args: argparse.Namespace, resolve_config, make_llm) -> None:
    """`resolve_config(args)` and `make_llm(args, config)` as for --perf."""
    from vllm_utils.bench.preflight import check_prompt_placeholders, check_reads_text
    from vllm_utils.multimodal.image import load_image

    if args.input_video:
        return run_video_demo(args, resolve_config, make_llm)
    if args.model is None:
        use_default_demo_model(args)
    if not args.input_image:
        raise UserError("--demo needs --input-image IMAGE (repeatable) or --input-video VIDEO")
    pairs = pair_images_and_prompts(args.input_image, args.prompt, args.mm_per_prompt)
    config = resolve_config(args)
    placeholder = check_reads_text(args, config, "--demo").image_token  # the folder's, e.g. Qwen2-VL's <|image_pad|>
    check_prompt_placeholders([text for _, text in pairs], args.mm_per_prompt, placeholder)
    images = {path: load_image(path) for paths, _ in pairs for path in paths}
    set_batch_size(args, len(pairs))
    llm = make_llm(args, config)
    requests = demo_requests(llm.engine.processor, pairs, images)
    generate_and_print(llm, args, requests, [f"Image: {', '.join(paths)!r}" for paths, _ in pairs])


def run_video_demo(args: argparse.Namespace, resolve_config, make_llm) -> None:
    """One request per video and prompt: the video before the prompt's text, as the chat template places it."""
    from vllm_utils.bench.preflight import check_reads_text, check_takes_video
    from vllm_utils.multimodal.video import DEFAULT_NUM_FRAMES, load_video

    if args.model is None:
        raise UserError("--input-video needs a video model: pass --model with a Qwen2-VL or Qwen2.5-VL folder")
    config = resolve_config(args)
    check_takes_video(args, config)
    check_reads_text(args, config, "--demo")
    videos = {path: load_video(path, args.num_frames or DEFAULT_NUM_FRAMES) for path in args.input_video}
    pairs = [(path, text) for path in args.input_video for text in (args.prompt or [DEFAULT_VIDEO_PROMPT])]
    set_batch_size(args, len(pairs))
    llm = make_llm(args, config)
    processor = llm.engine.processor
    requests = [{"prompt": processor.chat_prompt(text, num_images=0, num_videos=1),
                 "multi_modal_data": {"video": videos[path]}} for path, text in pairs]
    generate_and_print(llm, args, requests, [f"Video: {path!r}" for path, _ in pairs])


def set_batch_size(args: argparse.Namespace, requests: int) -> None:
    from vllm_utils.config import DEFAULT_MAX_NUM_SEQS

    if args.batch_size is None:
        args.batch_size = min(requests, DEFAULT_MAX_NUM_SEQS)


def generate_and_print(llm, args: argparse.Namespace, requests: list[dict], inputs: list[str]) -> None:
    """Each request's prompt, text and inputs (`inputs`: what each one carried), then --reference's figures."""
    from vllm_utils.sampling_params import SamplingParams

    max_tokens = 64 if args.output_len is None else args.output_len
    params = SamplingParams(temperature=args.temperature, max_tokens=max_tokens)
    outputs = generate_seeded(llm, requests, params, args.seed)
    for given, output in zip(inputs, outputs):
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}, {given}")
    if args.reference:
        from vllm_utils.bench.acc.demo import demo_agreement

        demo_agreement(llm, args, requests, outputs, max_tokens)


def generate_seeded(llm, requests: list[dict], params, seed: int) -> list:
    """As in vLLM, --seed seeds one global generator that every request draws from: identical requests
    sample differently, and the same command gives the same text."""
    import torch

    torch.manual_seed(seed)
    return llm.generate(requests, params)
