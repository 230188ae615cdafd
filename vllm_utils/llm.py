"""vLLM-style offline API: LLM(model=...).generate(prompts, SamplingParams(...))."""
from dataclasses import dataclass

from PIL import Image

from vllm_utils.config import EngineConfig, ResolvedConfig
from vllm_utils.engine.llm_engine import LLMEngine
from vllm_utils.engine.sequence import Sequence, SequenceTimes
from vllm_utils.errors import UserError
from vllm_utils.multimodal.processor import ProcessorAdapter
from vllm_utils.progress import GenerationProgress
from vllm_utils.sampling_params import SamplingParams

PromptInput = str | dict


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    times: SequenceTimes
    num_preemptions: int
    # with SamplingParams.prompt_logprobs: per prompt token, {token: log-prob} (the token's and the most likely
    # ones'); None for the first token
    prompt_logprobs: list[dict[int, float] | None] | None = None


def multi_modal_items(prompt: dict) -> tuple[list[Image.Image], list]:
    """(images, videos) of a prompt's multi_modal_data: "image" a PIL image or a list of them; "video" one video
    (a VideoClip, a [frames, H, W, 3] uint8 array, or a list of PIL frames) or a list of them."""
    data = prompt.get("multi_modal_data") or {}
    images = data.get("image", [])
    images = images if isinstance(images, list) else [images]
    if not all(isinstance(i, Image.Image) for i in images):
        raise UserError("multi_modal_data['image'] must be a PIL image or a list of them")
    videos = data.get("video", [])
    single = not isinstance(videos, list) or (videos and isinstance(videos[0], Image.Image))
    return images, [videos] if single else videos


def per_prompt(params: SamplingParams | list[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if isinstance(params, list):
        if len(params) != count:
            raise UserError(f"{len(params)} SamplingParams for {count} prompts: give one for all, or one per prompt")
        return params
    return [params or SamplingParams()] * count


class LLM:
    def __init__(self, model: str | ResolvedConfig, model_type: str | None = None,
                 processor: ProcessorAdapter | None = None, **engine_args) -> None:
        """`model`: a model folder (with EngineConfig's fields as keywords), or a configuration already
        resolved (and, optionally, the family's processor adapter already built for it)."""
        config = model if isinstance(model, ResolvedConfig) else EngineConfig(model=model, **engine_args)
        self.engine = LLMEngine(config, model_type, processor)

    def generate(self, prompts: PromptInput | list[PromptInput],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Each prompt is a string, or {"prompt": str, "multi_modal_data": {"image": PIL image or list, "video": a
        video or list (see `multi_modal_items`)}},
        or {"prompt_token_ids": [...], "mm_inputs": {"pixel_values": tensor, ...}} (already processed: each
        image placeholder expanded to its positions). A dict may also hold "continuation_token_ids": tokens
        appended to the prompt as text (teacher forcing; see `LLMEngine.add_request`). `sampling_params`: one for
        every prompt, or one per prompt (as vLLM takes them). Outputs come back in input order."""
        prompts = prompts if isinstance(prompts, list) else [prompts]
        params = per_prompt(sampling_params, len(prompts))
        seqs = []
        try:
            for p, ps in zip(prompts, params):
                seqs.append(self._add(p, ps))
        except Exception:
            self.engine.abort(seqs)  # all or nothing: no half-added batch left in the queue
            raise
        try:
            with GenerationProgress(seqs, disable=not use_tqdm) as progress:  # generated tokens, tokens/s, prompts
                while self.engine.has_unfinished():
                    progress.step(self.engine.step())
        finally:
            self.engine.platform.idle()  # e.g. the CPU's whole thread team back for the code that follows
        return [self._output(s) for s in seqs]

    def _add(self, prompt: PromptInput, params: SamplingParams) -> Sequence:
        if isinstance(prompt, str):
            return self.engine.add_request(prompt, [], params)
        images, videos = multi_modal_items(prompt)
        return self.engine.add_request(prompt.get("prompt"), images, params,
                                       prompt.get("prompt_token_ids"), prompt.get("mm_inputs"),
                                       prompt.get("continuation_token_ids"), videos)

    def _output(self, seq: Sequence) -> RequestOutput:
        out = CompletionOutput(self.engine.processor.decode(seq.output_token_ids), seq.output_token_ids,
                               seq.logprobs if seq.params.logprobs else None, seq.finish_reason)
        return RequestOutput(seq.prompt, seq.token_ids[: seq.num_prompt_tokens], [out], seq.times, seq.num_preemptions,
                             seq.prompt_logprobs)
