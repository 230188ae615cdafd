"""`--acc`: a dataset's questions through the backend, each reply scored as the dataset's evaluation scores it,
the batch size at a time, with a running score; with `--reference hf` each batch also through HF transformers, for
the agreement figures. A sample that fails (an unreadable picture, an over-long prompt) is recorded and the run
goes on."""
import json
import random
from dataclasses import dataclass

from vllm_utils.errors import UserError
from vllm_utils.modes.acc.agreement import Agreement, agreement, as_record, overall
from vllm_utils.modes.acc.sample import VIDEO_FIX, Sample
from vllm_utils.modes.acc.scorers import score
from vllm_utils.modes.acc.summary import acc_info
from vllm_utils.modes.backends import Backend, open_reference
from vllm_utils.modes.plan import Plan
from vllm_utils.progress import progress_bar
from vllm_utils.sampling_params import SamplingParams


@dataclass
class Result:
    sample: Sample
    prompt: str | None = None
    reply: str | None = None
    token_ids: list[int] | None = None
    score: float | None = None
    parsed: str | None = None
    measures: dict | None = None  # a metric's several figures (OCR)
    error: str | None = None
    agreement: Agreement | None = None

    def record(self) -> dict:
        s = self.sample
        return {"id": s.id, "subject": s.subject, "metric": s.metric, "prompt": self.prompt, "answer": self.reply,
                "reference": s.references if len(s.references) > 1 else s.references[0], "parsed": self.parsed,
                "score": self.score, **({"measures": self.measures} if self.measures else {}), "error": self.error}


@dataclass(frozen=True)
class AccResult:
    info: dict  # the figures of ***Acc Info***
    records: list[dict]  # per sample, as --save-output writes them
    failures: list[str]  # per failed sample, why
    agreement: dict | None  # --reference hf: {"overall": ..., "per_sample": [...]}


def prepare(sample: Sample, processor, max_model_len: int, videos: dict | None = None) -> tuple[str, dict]:
    """The chat prompt (images or videos before the text) and the request as our engine and the HF reference take
    it. `videos`: the sample's clips by path (the questions of one video share its frames)."""
    images = sample.load_images()
    clips = [videos[path] for path in sample.videos] if sample.videos else []
    for clip in clips:
        if isinstance(clip, Exception):
            raise clip
    prompt = processor.chat_prompt(sample.text, num_images=len(images), num_videos=len(clips))
    ids, mm_inputs = processor.process(prompt, images, clips or None)
    if len(ids) >= max_model_len:
        raise UserError(f"the prompt is {len(ids)} tokens, which leaves no room within --max-model-len {max_model_len}")
    return prompt, {"prompt_token_ids": ids, "mm_inputs": mm_inputs}


def run(plan: Plan, backend: Backend) -> AccResult:
    """Generates and scores the batch size of samples at a time; each record goes to --save-output as soon as its
    batch is scored (and, with --reference hf, compared)."""
    spec, samples = plan.spec, plan.inputs.samples
    reference = open_reference(plan) if spec.reference is not None else None
    try:
        save_file = open(spec.save_output, "x", encoding="utf-8") if spec.save_output else None
    except FileExistsError:
        raise UserError(f"--save-output '{spec.save_output}' was written meanwhile by another run; it is never "
                        f"overwritten") from None
    try:
        results = _run_samples(plan, backend, reference, samples, save_file)
    finally:
        if save_file:
            save_file.close()
    figures = None
    if reference is not None:
        per_sample = [r.agreement for r in results]
        figures = {"overall": overall(per_sample),
                   "per_sample": [{"id": r.sample.id, **as_record(r.agreement)} for r in results]}
    failures = [f"sample {r.sample.id} (row {r.sample.row}) failed: {r.error}" for r in results if r.error]
    info = acc_info(spec.dataset, results, figures)
    stats = getattr(backend, "stats", None)  # a backend that keeps none reports no hit rate
    if stats is not None and stats.prefix_cache_queries:  # prompt tokens a later question on an image found computed
        info["prefix_cache_hit_rate"] = stats.prefix_cache_hit_rate
    return AccResult(info, [r.record() for r in results], failures, figures)


def _run_samples(plan: Plan, backend: Backend, reference, samples: list[Sample], save_file) -> list[Result]:
    batch_size = plan.config.max_num_seqs
    output_lens = {id(s): n for s, n in zip(samples, plan.inputs.output_lens)}
    results: list[Result] = []
    scored: list[float] = []
    videos: dict = {}
    with progress_bar(total=len(samples), desc="Scoring", unit="sample") as bar:
        for start in range(0, len(samples), batch_size):
            chunk = [Result(s) for s in samples[start : start + batch_size]]
            videos = _load_videos(plan, chunk, videos)
            ready = []
            for r in chunk:
                try:
                    r.prompt, request = prepare(r.sample, plan.processor, plan.config.max_model_len, videos)
                    ready.append((r, request))
                except Exception as e:  # a bad image or an over-long prompt fails that sample only
                    r.error = _why(e)
            params = [SamplingParams(temperature=0, max_tokens=output_lens[id(r.sample)]) for r, _ in ready]
            outputs = backend.generate([request for _, request in ready], params, use_tqdm=False) if ready else []
            for (r, _), out in zip(ready, outputs):
                r.reply, r.token_ids = out.outputs[0].text, out.outputs[0].token_ids
                rng = random.Random(f"{plan.spec.engine.seed}/{r.sample.id}")  # MMMU's pick, reproducible
                r.score, r.parsed, r.measures = score(r.sample.metric, r.reply, r.sample.references,
                                                      r.sample.choices, rng)
                scored.append(r.score)
            if reference is not None:
                _compare(backend, reference, chunk, dict((id(r), q) for r, q in ready), output_lens)
            for r in chunk:
                if save_file:
                    save_file.write(json.dumps(r.record(), ensure_ascii=False) + "\n")
                    save_file.flush()
            results.extend(chunk)
            bar.set_postfix_str(f"score {sum(scored) / len(scored):.4f}" if scored else "score n/a", refresh=False)
            bar.update(len(chunk))
    return results


def _load_videos(plan: Plan, chunk: list[Result], previous: dict) -> dict:
    """The frames of each video of the batch, or the error its samples fail with: decoded once for all the
    questions of a video (those of the previous batch's videos are kept)."""
    from vllm_utils.multimodal.video import load_video

    clips: dict = {}
    for path in {path: None for r in chunk for path in r.sample.videos}:
        if path in previous:
            clips[path] = previous[path]
            continue
        try:
            clips[path] = load_video(path, plan.spec.num_frames, at_most=plan.spec.fewer_frames, fix=VIDEO_FIX)
        except Exception as e:  # raised again by each sample of this video
            clips[path] = e
    return clips


def _compare(backend: Backend, reference, chunk: list[Result], requests: dict, output_lens: dict) -> None:
    """The agreement of each sample of the batch, on the very requests our engine ran (no second processing)."""
    ran = [r for r in chunk if r.error is None]
    figures = agreement(backend, reference, [requests[id(r)] for r in ran], [r.token_ids for r in ran],
                        [output_lens[id(r.sample)] for r in ran], use_tqdm=False)
    for r, a in zip(ran, figures):
        r.agreement = a
    for r in chunk:
        if r.error is not None:
            r.agreement = Agreement(error="the sample failed on this engine")


def _why(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"
