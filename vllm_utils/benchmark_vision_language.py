"""Command line: `--demo` (images + prompts in, generated text out) and `--perf` (synthetic requests of
exact length, timed). Flags -> configuration -> bench/; nothing else lives here."""
import argparse
import os
import sys

from vllm_utils.errors import UserError, one_line

DEFAULT_PROMPT = "Describe the picture."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m vllm_utils.benchmark_vision_language",
                                description="Validate (--demo) and benchmark (--perf) a vision-language model.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--demo", action="store_true", help="generate text for images and prompts")
    mode.add_argument("--perf", action="store_true", help="time synthetic requests of exact length")
    p.add_argument("--model-type", default="llava", help="model family (default: llava)")
    p.add_argument("--model", default=None,
                   help="model folder (Hugging Face layout); --demo without it builds a tiny random LLaVA")
    p.add_argument("--device", default=None, help="cpu, cuda or gcu (default: cuda if present, else cpu)")
    p.add_argument("--input-image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--prompt", action="append", default=[], help=f"prompt text (repeatable; default: '{DEFAULT_PROMPT}')")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the model's)")
    p.add_argument("--input-len", type=int, default=1024, help="--perf: prompt tokens, image positions included")
    p.add_argument("--output-len", type=int, default=None,
                   help="tokens to generate (default: 64 for --demo, 128 for --perf)")
    p.add_argument("--num-prompts", type=int, default=1, help="--perf: requests in the timed run")
    p.add_argument("--batch-size", type=int, default=None,
                   help="most requests running at once (default: the number of requests, at most 256)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    p.add_argument("--enforce-eager", action="store_true", help="do not capture graphs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="--demo: 0 is greedy")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    p.add_argument("--num-iters", type=int, default=1, help="--perf: timed repetitions")
    p.add_argument("--backend", default="engine", choices=["engine", "hf"],
                   help="engine: ours; hf: the same workload through HF transformers' generate, for comparison")
    p.add_argument("--output-json", default=None, help="--perf: also write settings, metrics and environment here")
    return p.parse_args(argv)


def engine_args(args: argparse.Namespace) -> dict:
    from vllm_utils.platforms import default_device

    return dict(
        model_type=args.model_type,
        device=args.device or default_device(),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        max_num_seqs=args.batch_size,
        num_kv_blocks=args.num_kv_blocks,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        seed=args.seed,
        load_format=args.load_format,
    )


def pair_images_and_prompts(images: list[str], prompts: list[str]) -> list[tuple[str, str]]:
    prompts = prompts or [DEFAULT_PROMPT]
    if len(prompts) == 1:
        prompts = prompts * len(images)
    elif len(images) == 1:
        images = images * len(prompts)
    if len(images) != len(prompts):
        raise UserError(f"{len(images)} --input-image and {len(prompts)} --prompt given; pass one prompt, "
                        f"one image, or as many of each")
    return list(zip(images, prompts))


def make_llm(args: argparse.Namespace):
    """Our engine, or HF transformers behind the same interface (`--backend hf`)."""
    if args.backend == "hf":
        from vllm_utils.bench.hf_backend import HFGenerate

        return HFGenerate(args.model, **engine_args(args))
    from vllm_utils.llm import LLM

    return LLM(args.model, **engine_args(args))


def run_demo(args: argparse.Namespace) -> None:
    from vllm_utils.config import DEFAULT_MAX_NUM_SEQS
    from vllm_utils.multimodal.image import load_image
    from vllm_utils.sampling_params import SamplingParams

    if args.model is None:
        from vllm_utils.bench.tiny_model import default_demo_assets

        args.model, default_image, built = default_demo_assets()
        print(f"No --model given: {'built' if built else 'using'} a tiny LLaVA with RANDOM weights at {args.model} "
              f"(its text is gibberish by design); pass --model PATH for a real checkpoint.", file=sys.stderr)
        if not args.input_image:
            args.input_image = [default_image]
            print(f"No --input-image given: using the generated picture {default_image}.", file=sys.stderr)
    if not args.input_image:
        raise UserError("--demo needs --input-image IMAGE (repeatable)")
    pairs = pair_images_and_prompts(args.input_image, args.prompt)
    images = {path: load_image(path) for path, _ in pairs}
    if args.batch_size is None:
        args.batch_size = min(len(pairs), DEFAULT_MAX_NUM_SEQS)
    llm = make_llm(args)
    processor = llm.engine.processor
    requests = [{"prompt": processor.chat_prompt(text), "multi_modal_data": {"image": images[path]}}
                for path, text in pairs]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len or 64, seed=args.seed)
    for output in llm.generate(requests, params):
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")


def quiet_libraries() -> None:
    """Our own progress bars and errors only: no advisory warnings from transformers."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    import torch

    try:
        from vllm_utils.models.registry import check_model_type

        check_model_type(args.model_type)
        if args.demo:
            run_demo(args)
        else:
            from vllm_utils.bench.perf import run_perf

            run_perf(args, make_llm)
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
