"""`--acc`: a dataset's questions through the model, each reply scored as the dataset's evaluation scores it,
`--batch-size` at a time, with a running score; optionally the same prompts through an HF reference."""
import argparse
import json
import random
import sys
from dataclasses import dataclass

from vllm_utils.bench.acc.bundled import dataset_path
from vllm_utils.bench.acc.readers import read_dataset
from vllm_utils.bench.acc.sample import Sample
from vllm_utils.bench.acc.scorers import score
from vllm_utils.bench.acc.summary import acc_info, print_summary
from vllm_utils.bench.report import flatten
from vllm_utils.errors import UserError
from vllm_utils.progress import progress_bar
from vllm_utils.sampling_params import SamplingParams

# new tokens per reply when --output-len is not given, as lmms-eval's task configs allow
DEFAULT_OUTPUT_LEN = {"rouge": 1024, "choice": 32, "vqa": 16, "anls": 32, "open": 32}


@dataclass
class Result:
    sample: Sample
    prompt: str | None = None
    reply: str | None = None
    token_ids: list[int] | None = None
    score: float | None = None
    parsed: str | None = None
    error: str | None = None

    def record(self) -> dict:
        s = self.sample
        return {"id": s.id, "subject": s.subject, "metric": s.metric, "prompt": self.prompt, "answer": self.reply,
                "reference": s.references if len(s.references) > 1 else s.references[0], "parsed": self.parsed,
                "score": self.score, "error": self.error}


def read_samples(args: argparse.Namespace) -> list[Sample]:
    limit = args.num_prompts if "num_prompts" in args.explicit else None
    return read_dataset(dataset_path(args.dataset), args.dataset_format, args.dataset_split, limit)


def prepare(sample: Sample, processor, max_model_len: int) -> tuple[str, dict]:
    """The chat prompt (images before the text) and the request as our engine and the HF reference take it."""
    images = sample.load_images()
    prompt = processor.chat_prompt(sample.text, num_images=len(images))
    ids, mm_inputs = processor.process(prompt, images)
    if len(ids) >= max_model_len:
        raise UserError(f"the prompt is {len(ids)} tokens, which leaves no room within --max-model-len {max_model_len}")
    return prompt, {"prompt_token_ids": ids, "mm_inputs": mm_inputs}


def run_samples(llm, samples: list[Sample], args: argparse.Namespace, save) -> list[Result]:
    """Generates and scores `--batch-size` samples at a time; a sample that fails is recorded and skipped."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=args.output_len)
    results: list[Result] = []
    scored: list[float] = []
    with progress_bar(total=len(samples), desc="Scoring", unit="sample") as bar:
        for start in range(0, len(samples), args.batch_size):
            chunk = [Result(s) for s in samples[start : start + args.batch_size]]
            ready = []
            for r in chunk:
                try:
                    r.prompt, request = prepare(r.sample, engine.processor, engine.max_model_len)
                    ready.append((r, request))
                except Exception as e:  # a bad image or an over-long prompt fails that sample only
                    r.error = _why(e)
            outputs = llm.generate([request for _, request in ready], params, use_tqdm=False) if ready else []
            for (r, _), out in zip(ready, outputs):
                r.reply, r.token_ids = out.outputs[0].text, out.outputs[0].token_ids
                rng = random.Random(f"{args.seed}/{r.sample.id}")  # MMMU's random pick, reproducible per sample
                r.score, r.parsed = score(r.sample.metric, r.reply, r.sample.references, r.sample.choices, rng)
                scored.append(r.score)
            for r in chunk:
                save(r.record())
            results.extend(chunk)
            bar.set_postfix_str(f"score {sum(scored) / len(scored):.4f}" if scored else "score n/a", refresh=False)
            bar.update(len(chunk))
    return results


def _why(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"


def run_acc(args: argparse.Namespace, resolve_config, make_llm, save_reports, environment) -> None:
    from vllm_utils.bench.preflight import check_reads_text
    from vllm_utils.config import DEFAULT_MAX_NUM_SEQS

    samples = read_samples(args)  # bad input is reported before the model loads
    args.output_len = args.output_len or max(DEFAULT_OUTPUT_LEN[s.metric] for s in samples)
    args.batch_size = args.batch_size or min(len(samples), DEFAULT_MAX_NUM_SEQS)
    config = resolve_config(args)
    check_reads_text(args, config, "--acc")
    llm = make_llm(args, config)
    save_file = open(args.save_output, "w", encoding="utf-8") if args.save_output else None
    try:
        def save(record: dict) -> None:
            if save_file:
                save_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                save_file.flush()  # every scored sample is on disk as soon as it is scored

        results = run_samples(llm, samples, args, save)
    finally:
        if save_file:
            save_file.close()
    for r in results:
        if r.error:
            print(f"sample {r.sample.id} (row {r.sample.row}) failed: {r.error}", file=sys.stderr)
    agreement = None
    if args.reference:
        agreement = reference_figures(llm, args, results)
    info = acc_info(args, results, agreement)
    print_summary(info, agreement)
    settings = acc_settings(args, llm.engine)
    save_reports({**settings, **flatten(info)}, args.output_json,
                 lambda: {"settings": settings, "acc_info": info, "samples": [r.record() for r in results],
                          "agreement": agreement, "environment": environment(llm.engine.device)})
    if results and all(r.error for r in results):  # a run that scored nothing is no result, whatever it wrote down
        raise UserError(f"every sample failed ({len(results)} of {len(results)}; the reasons are above), so "
                        f"nothing was scored")


def reference_figures(llm, args: argparse.Namespace, results: list[Result]) -> dict:
    from vllm_utils.bench.acc.agreement import agreement, as_record, overall
    from vllm_utils.hf_reference import HFReference
    from vllm_utils.progress import phase

    with phase(f"Loading the HF reference ({args.reference_dtype} on {args.reference_device})", "Loading"):
        reference = HFReference(args.model, args.reference_dtype, args.reference_device, args.model_type,
                                hf_processor=False)
    processor, max_len = llm.engine.processor, llm.engine.max_model_len
    makers = [lambda s=r.sample: prepare(s, processor, max_len)[1] for r in results]
    ours = [r.token_ids if r.error is None else None for r in results]
    per_sample = agreement(llm, reference, makers, ours, args.output_len)
    return {"overall": overall(per_sample),
            "per_sample": [{"id": r.sample.id, **as_record(a)} for r, a in zip(results, per_sample)]}


def acc_settings(args: argparse.Namespace, engine) -> dict[str, object]:
    return {
        "mode": "acc", "model": args.model, "model_type": engine.config.model_type, "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."), "dataset": args.dataset,
        "dataset_format": args.dataset_format or "auto", "num_prompts": args.num_prompts if "num_prompts" in
        args.explicit else "all", "batch_size": args.batch_size, "output_len": args.output_len,
        "max_model_len": engine.max_model_len, "seed": args.seed, "reference": args.reference or "none",
    }
