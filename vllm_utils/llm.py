"""vLLM-style offline API: LLM(model=...).generate(prompts, SamplingParams(...))."""
from itertools import count

import numpy as np
from PIL import Image

from vllm_utils.chat import parse_messages
from vllm_utils.config import ResolvedConfig
from vllm_utils.engine_args import engine_config
from vllm_utils.engine.llm_engine import LLMEngine
from vllm_utils.engine.sequence import Sequence
from vllm_utils.errors import UserError
from vllm_utils.multimodal.processor import ProcessorAdapter
from vllm_utils.outputs import CompletionOutput, Logprob, RequestOutput
from vllm_utils.platforms import default_device
from vllm_utils.progress import GenerationProgress
from vllm_utils.sampling_params import SamplingParams, generation_defaults

PromptInput = str | dict


def multi_modal_items(prompt: dict) -> tuple[list[Image.Image], list]:
    """(images, videos) of a prompt's multi_modal_data: "image" a PIL image or an [H, W, 3] uint8 array, or a list
    of them; "video" one video (a VideoClip, a [frames, H, W, 3] uint8 array, a list of PIL frames, or vLLM's
    (frames, {"fps": ...}) pair) or a list of them."""
    data = prompt.get("multi_modal_data") or {}
    images = data.get("image", [])
    images = [_picture(i) for i in (images if isinstance(images, list) else [images])]
    videos = data.get("video", [])
    single = not isinstance(videos, list) or (videos and isinstance(videos[0], Image.Image))
    return images, [_video(v) for v in ([videos] if single else videos)]


def _picture(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return Image.fromarray(image)
    raise UserError("multi_modal_data['image'] must be a PIL image or an [H, W, 3] uint8 array, or a list of them")


def _video(video):
    """vLLM's (frames, metadata) pair -> a clip at its frame rate; any other form as it is."""
    if isinstance(video, tuple) and len(video) == 2 and isinstance(video[1], dict):
        from vllm_utils.multimodal.video import VideoClip

        frames, metadata = np.asarray(video[0]), video[1]
        if "fps" not in metadata:
            return frames
        total = int(metadata.get("total_num_frames", len(frames)))
        return VideoClip(frames, float(metadata["fps"]), total)
    return video


def per_prompt(params: SamplingParams | list[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if isinstance(params, list):
        if len(params) != count:
            raise UserError(f"{len(params)} SamplingParams for {count} prompts: give one for all, or one per prompt")
        return params
    return [params or SamplingParams()] * count


class LLM:
    def __init__(self, model: str | ResolvedConfig, model_type: str | None = None,
                 processor: ProcessorAdapter | None = None, **engine_args) -> None:
        """`model`: a model folder, a hub name whose snapshot is in the local Hugging Face cache (nothing is
        downloaded), or a configuration already resolved (and, optionally, the family's processor adapter already
        built for it). Keywords: vLLM's engine arguments (`dtype`, `max_model_len`, `tensor_parallel_size`,
        `gpu_memory_utilization`, `seed`, `limit_mm_per_prompt`, ...; see `engine_args.py`) and this engine's
        `EngineConfig` fields; `device` defaults to CUDA where there is one, else the CPU."""
        options: dict = {}
        if isinstance(model, ResolvedConfig):
            config = model
        else:
            engine_args.setdefault("device", default_device())
            config, options = engine_config(model, engine_args)
        self.limits = {kind: limit["count"] if isinstance(limit, dict) else limit  # vLLM's two spellings
                       for kind, limit in (options.get("limit_mm_per_prompt") or {}).items()}
        self.media_root = options.get("allowed_local_media_path")
        self.engine = LLMEngine(config, model_type, processor)
        self.request_ids = count()
        self.default_params = generation_defaults(self.engine.processor.generation_config) \
            if options.get("generation_config", "auto") == "auto" else SamplingParams()

    def get_default_sampling_params(self) -> SamplingParams:
        """What `sampling_params=None` means: vLLM's defaults, overridden where the model's generation_config.json
        sets temperature, top_p, top_k, repetition_penalty or max_new_tokens (LLM(generation_config="vllm"): not)."""
        return self.default_params.clone()

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block no request holds, as vLLM's; False (nothing forgotten) while requests run."""
        return self.engine.reset_prefix_cache()

    def get_tokenizer(self):
        return self.engine.processor.tokenizer

    def generate(self, prompts: PromptInput | list[PromptInput],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        """Each prompt is a string, or {"prompt": str, "multi_modal_data": {"image": PIL image or list, "video": a
        video or list (see `multi_modal_items`)}},
        or {"prompt_token_ids": [...], "mm_inputs": {"pixel_values": tensor, ...}} (already processed: each
        image placeholder expanded to its positions). A dict may also hold "continuation_token_ids": tokens
        appended to the prompt as text (teacher forcing; see `LLMEngine.add_request`). `sampling_params`: one for
        every prompt, or one per prompt (as vLLM takes them). Outputs come back in input order, each holding its
        prompt's `n` completions."""
        if lora_request is not None:
            raise UserError("LoRA adapters are not supported here: leave lora_request at None")
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        params = per_prompt(sampling_params or self.get_default_sampling_params(), len(prompts))
        requests: list[list[Sequence]] = []
        try:
            for p, ps in zip(prompts, params):
                requests.append(self._add(p, ps))
        except Exception:
            self.engine.abort([s for seqs in requests for s in seqs])  # all or nothing: no half-added batch left
            raise
        seqs = [s for group in requests for s in group]
        try:
            with GenerationProgress(seqs, disable=not use_tqdm) as progress:  # generated tokens, tokens/s, prompts
                while self.engine.has_unfinished():
                    progress.step(self.engine.step())
        except BaseException:  # an error or Ctrl-C: this call's requests go, so the next call starts clean
            self.engine.abort([s for s in seqs if s.finish_reason is None])
            raise
        finally:
            self.engine.platform.idle()  # e.g. the CPU's whole thread team back for the code that follows
        return [self._output(group) for group in requests]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             lora_request=None, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, each rendered by the model's chat template with its
        pictures and videos in place (content parts: see `chat.py`), then generated as `generate` does."""
        if not messages:
            raise UserError("chat() needs a conversation: a list of {'role', 'content'} messages")
        conversations = messages if isinstance(messages[0], list) else [messages]
        prompts = []
        for conversation in conversations:
            rendered, images, videos = parse_messages(conversation, self.media_root)
            text = self.engine.processor.render_chat(rendered, add_generation_prompt and not continue_final_message,
                                                     chat_template, continue_final_message,
                                                     **(chat_template_kwargs or {}))
            prompts.append({"prompt": text, "multi_modal_data": {"image": images, "video": videos}})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _add(self, prompt: PromptInput, params: SamplingParams) -> list[Sequence]:
        if isinstance(prompt, str):
            return self.engine.add_request(prompt, [], params)
        images, videos = multi_modal_items(prompt)
        for kind, items in (("image", images), ("video", videos)):
            if kind in self.limits and len(items) > self.limits[kind]:
                raise UserError(f"a prompt holds {len(items)} {kind}s, more than limit_mm_per_prompt['{kind}'] = "
                                f"{self.limits[kind]}")
        return self.engine.add_request(prompt.get("prompt"), images, params,
                                       prompt.get("prompt_token_ids"), prompt.get("mm_inputs"),
                                       prompt.get("continuation_token_ids"), videos)

    def _output(self, seqs: list[Sequence]) -> RequestOutput:
        first = seqs[0]
        return RequestOutput(str(next(self.request_ids)), first.prompt, first.token_ids[: first.num_prompt_tokens],
                             self._logprobs(first.prompt_logprobs), [self._completion(s) for s in seqs], True,
                             first.times, sum(s.num_preemptions for s in seqs), first.num_cached_tokens)

    def _completion(self, seq: Sequence) -> CompletionOutput:
        params, ids = seq.params, seq.output_token_ids
        # the token that ended the output (a stop token, EOS) leaves the text unless asked to stay, as in vLLM
        ended = seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str)
        kept = ids[:-1] if ended and not params.include_stop_str_in_output else ids
        text = self.engine.processor.decode(kept, params.skip_special_tokens) if params.detokenize else ""
        if isinstance(seq.stop_reason, str):  # the stop string ends the text (vLLM keeps it only if asked)
            index = seq.stop_index
            text = text[: index + len(seq.stop_reason)] if params.include_stop_str_in_output else text[:index]
        logprobs = self._logprobs(seq.logprobs, params.detokenize) if params.logprobs is not None else None
        cumulative = sum(d[t].logprob for d, t in zip(logprobs, ids)) if logprobs is not None else None
        return CompletionOutput(seq.index, text, ids, cumulative, logprobs, seq.finish_reason, seq.stop_reason)

    def _logprobs(self, entries: list[dict | None] | None,
                  detokenize: bool = True) -> list[dict[int, Logprob] | None] | None:
        """{token: (log-prob, rank)} per position -> vLLM's {token: Logprob} with each token's text."""
        if entries is None:
            return None
        tokenizer = self.engine.processor.tokenizer
        decode = (lambda t: tokenizer.decode([t])) if tokenizer is not None and detokenize else (lambda t: None)
        return [None if e is None else {t: Logprob(lp, rank, decode(t)) for t, (lp, rank) in e.items()}
                for e in entries]
