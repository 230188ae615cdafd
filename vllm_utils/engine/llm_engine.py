"""The engine loop: requests in, one scheduled step at a time, finished sequences out."""
import time
from dataclasses import dataclass

import torch
from PIL import Image

from vllm_utils.config import EngineConfig, ResolvedConfig
from vllm_utils.engine.block_manager import BlockManager
from vllm_utils.engine.model_runner import ModelRunner
from vllm_utils.engine.prefix_cache import PrefixCache, item_hashes, items_key
from vllm_utils.engine.resolve import resolve
from vllm_utils.engine.scheduler import Scheduler
from vllm_utils.engine.sequence import Sequence
from vllm_utils.engine.tensor_parallel import rank_device, start_workers
from vllm_utils.errors import UserError
from vllm_utils.models.registry import family
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.multimodal.processor import ProcessorAdapter
from vllm_utils.platforms import platform_for
from vllm_utils.sampling_params import SamplingParams


@dataclass
class EngineStats:
    """Where the engine's time went, by kind of step."""

    prefill_steps: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    peak_blocks_used: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache at admission, and found there
    prefix_cache_hits: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig | ResolvedConfig, model_type: str | None = None,
                 processor: ProcessorAdapter | None = None) -> None:
        """`processor`: the family's adapter of this folder, where the caller has built it already."""
        self.config = config if isinstance(config, ResolvedConfig) else resolve(config, model_type)
        config = self.config.engine
        self.device, self.dtype, self.max_model_len = self.config.device, self.config.dtype, self.config.max_model_len
        # before the (slow) weights, so that a folder without tokenizer files fails at once
        self.processor = processor or family(self.config.model_type).processor(
            self.config.folder, self.config.hf_config, allow_missing=config.load_format == "dummy",
            processor_kwargs=config.mm_processor_kwargs)
        torch.manual_seed(config.seed)
        if config.tensor_parallel_size > 1:
            workers = start_workers(self.config)
            try:
                with workers.watch():
                    self.runner = ModelRunner(self.config, rank_device(self.config, 0), control_group=workers.group)
            except BaseException:  # no worker or group outlives a failed start
                workers.close()
                platform_for(self.device).configure_rank(self.device, 1)
                raise
            self.runner.workers = workers
        else:
            self.runner = ModelRunner(self.config, self.device)
        self.platform = self.runner.platform
        model = self.runner.model  # an image's positions attending to each other both ways are never split
        whole_runs = set(model.mm_token_ids) if getattr(model, "bidirectional_mm", False) else None
        cache = PrefixCache(self.runner.num_blocks, config.block_size, model.mm_token_ids) \
            if self.config.prefix_caching and not self.runner.state_layers else None
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, self.runner.num_state_slots, cache)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                   self.max_model_len, self.processor.eos_token_ids, self._stop_string,
                                   whole_runs)
        self.runner.eos_token_ids = self.processor.eos_token_ids
        self.reset_stats()

    def add_request(self, prompt: str | None, images: list[Image.Image], params: SamplingParams,
                    prompt_token_ids: list[int] | None = None, mm_inputs: MultiModalInputs | None = None,
                    continuation_token_ids: list[int] | None = None, videos: list | None = None) -> list[Sequence]:
        """A raw prompt (with one placeholder per image and per video) or ready token ids and multimodal tensors;
        `params.n` sequences of it (the prompt processed once). `continuation_token_ids` are appended to the prompt
        as text, whatever their ids (teacher forcing: with `prompt_logprobs`, their log-probs given all before
        them)."""
        self._check_params(params)
        if prompt_token_ids is None:
            prompt_token_ids, mm_inputs = self.processor.process(prompt, images, videos)
        else:  # ready tensors: they, not any pictures beside them, are what the model sees and the caches key
            self._check_mm_positions(prompt_token_ids, mm_inputs)
            images, videos = [], None
        text_from = len(prompt_token_ids)
        prompt_token_ids = list(prompt_token_ids) + list(continuation_token_ids or [])
        if len(prompt_token_ids) >= self.max_model_len:
            raise UserError(f"the prompt is {len(prompt_token_ids)} tokens (image positions included), which leaves "
                            f"no room to generate within --max-model-len {self.max_model_len}; shorten the prompt "
                            f"or raise --max-model-len")
        room = self.max_model_len - len(prompt_token_ids)
        longest = room if params.max_tokens is None else min(params.max_tokens, room)
        seqs = [Sequence(prompt_token_ids, params, mm_inputs, prompt, text_from, index, longest)
                for index in range(params.n)]
        if mm_inputs and self.block_manager.cache is not None:
            hashes = item_hashes(self.processor.item_positions(mm_inputs), mm_inputs, images, videos)
            key = items_key(hashes)
            for seq in seqs:
                seq.mm_hashes, seq.mm_key = hashes, key
        for seq in seqs:
            self.scheduler.add(seq)
        return seqs

    def _check_params(self, params: SamplingParams) -> None:
        vocab = self.config.hf_config.text_config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise UserError(f"stop_token_ids {params.stop_token_ids} holds an id beyond the vocabulary ({vocab} tokens)")
        self._check_logprobs(params)

    def _check_logprobs(self, params: SamplingParams) -> None:
        limit = self.config.engine.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is not None and limit != -1 and (asked == -1 or asked > limit):
                what = "the whole vocabulary" if asked == -1 else asked
                raise UserError(f"{name} asks for {what} per position, more than max_logprobs ({limit}); ask for "
                                f"fewer, or raise LLM(max_logprobs=...) (-1: no limit)")

    def _stop_string(self, seq: Sequence) -> str | None:
        """The stop string the newest token completed, if any (its index kept on the sequence), as vLLM finds them:
        in the text that token changed (a byte token can turn the characters before it into a whole one), never
        within the first min_tokens tokens' text."""
        params = seq.params
        if not params.stop:
            return None
        text = self.processor.decode(seq.output_token_ids, params.skip_special_tokens)
        previous, seq.text = seq.text, text
        if seq.num_output_tokens <= params.min_tokens:
            return None
        stable = next((i for i, (a, b) in enumerate(zip(previous, text)) if a != b), min(len(previous), len(text)))
        found = [(text.find(s, max(0, stable - len(s) + 1)), s) for s in params.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return None
        seq.stop_index, stop = min(found)
        return stop

    def _check_mm_positions(self, token_ids: list[int], mm_inputs: MultiModalInputs | None) -> None:
        """Ready token ids hold exactly the positions their items take."""
        marked = sum(t in self.runner.model.mm_token_ids for t in token_ids)
        needed = sum(self.processor.item_positions(mm_inputs)) if mm_inputs else 0
        if marked != needed:
            raise UserError(f"prompt_token_ids hold {marked} multimodal placeholder positions but mm_inputs' items "
                            f"take {needed}; expand each item's placeholder to its positions (processor.process "
                            f"does it)")

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers, if any (otherwise done when this process exits), and hands back what
        the engine took of the platform (on CPUs, every thread: the team that followed the load is gone)."""
        if self.runner.workers is not None:
            self.runner.workers.close()
            self.runner.workers = None
            self.platform.configure_rank(self.device, 1)  # alone again: e.g. on CPUs, every thread the ranks shared
        self.platform.release()

    def reset_prefix_cache(self) -> bool:
        if self.scheduler.has_unfinished():
            return False
        if self.block_manager.cache is not None:
            self.block_manager.cache.evict(self.block_manager.num_blocks)
        self.runner.clear_encoder_cache()
        return True

    def reset_stats(self) -> None:
        self.stats = EngineStats()
        self.scheduler.prefix_queries = self.scheduler.prefix_hits = 0

    def abort(self, seqs: list[Sequence]) -> None:
        """Drops requests, waiting or running (their blocks freed, their multimodal embeddings forgotten)."""
        for seq in seqs:
            if seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
            elif seq in self.scheduler.running:
                self.scheduler.running.remove(seq)
            self.block_manager.free(seq)
            self.runner.mm_cache.pop(seq.seq_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """Runs one prefill or decode step; returns the sequences that finished in it."""
        start = time.perf_counter()
        step = self.scheduler.schedule()
        if not step.seqs:
            raise RuntimeError("scheduler found nothing to run although requests are pending")
        token_ids, logprobs = self.runner.run(step)  # returns host ints: the step is done
        elapsed = time.perf_counter() - start
        stats = self.stats
        if step.is_prefill:
            stats.prefill_steps += 1
            stats.prefill_tokens += sum(step.num_tokens)
            stats.prefill_seconds += elapsed
        else:
            stats.decode_steps += 1
            stats.decode_tokens += len(step.seqs)
            stats.decode_seconds += elapsed
        stats.peak_blocks_used = max(stats.peak_blocks_used, self.block_manager.num_used)
        stats.prefix_cache_queries, stats.prefix_cache_hits = self.scheduler.prefix_queries, self.scheduler.prefix_hits
        finished = self.scheduler.postprocess(step, token_ids, logprobs)
        for seq in finished:
            seq.mm_inputs = None
        return finished
