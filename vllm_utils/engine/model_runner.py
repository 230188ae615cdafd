"""Builds the model on its device with its kernels, its KV cache (engine/kv_cache.py) and graphs, and runs each
scheduled step: the step's inputs (engine/step_inputs.py), the multimodal encoder, the model, the sampler."""
import time

import torch
from transformers import PretrainedConfig

from vllm_utils.attention.layer import PagedAttention
from vllm_utils.attention.metadata import AttentionMetadata
from vllm_utils.config import ResolvedConfig
from vllm_utils.engine.cuda_graphs import DecodeGraphs, PrefillGraphs, VisionGraphs
from vllm_utils.engine.encoder_cache import ENCODER_CACHE_ROWS, EncoderCache
from vllm_utils.engine.prompt_logprobs import kept_rows, prompt_logprobs
from vllm_utils.engine.scheduler import ScheduledStep
from vllm_utils.engine.sequence import Sequence
from vllm_utils.engine.kv_cache import allocate_kv_cache, plan_kv_blocks, plan_state_slots
from vllm_utils.engine.step_inputs import PrefillInputs, StepInputs, prepare_step
from vllm_utils.layers.op import Op
from vllm_utils.distributed import tp_rank
from vllm_utils.layers.sampler import sample
from vllm_utils.loader import init_dummy_weights, load_weights
from vllm_utils.models.interface import VisionLanguageModel
from vllm_utils.models.registry import family
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.notes import note_once
from vllm_utils.platforms import platform_for
from vllm_utils.platforms.interface import GiB, Platform

PREFILL_GRAPH_TOKENS = 1024  # longer prompts prefill eagerly: their launches are small next to their compute


def build_model(hf_config: PretrainedConfig, cls: type[VisionLanguageModel], device: torch.device,
                dtype: torch.dtype) -> VisionLanguageModel:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(hf_config).eval()
    finally:
        torch.set_default_dtype(default)


class ModelRunner:
    def __init__(self, config: ResolvedConfig, device: torch.device,
                 control_group: "torch.distributed.ProcessGroup | None" = None) -> None:
        self.config, self.device, self.dtype = config, device, config.dtype
        self.control_group = control_group
        self.block_size = config.engine.block_size
        self.platform = platform_for(device)
        self.model = build_model(config.hf_config, family(config.model_type).model, device, config.dtype)
        self.platform.prepare_for_weights(self.model)  # before the weights are written
        if config.engine.load_format == "dummy":
            init_dummy_weights(self.model, config.engine.seed)
        else:
            load_weights(self.model, config.folder, show_progress=tp_rank() == 0)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        # linear attention: a recurrent state per sequence that may run, beside the KV cache and in its budget
        self.state_layers = [m for m in self.model.modules() if hasattr(m, "allocate_state")]
        per_sequence = sum(m.state_bytes(self.dtype) for m in self.state_layers)
        self.num_state_slots = plan_state_slots(config, self.platform, device, self.attention_layers, per_sequence,
                                                control_group)
        self.state_bytes = self.num_state_slots * per_sequence
        self.choose_kernels(self.platform)
        self.num_blocks = plan_kv_blocks(config, self.platform, device, self.attention_layers, control_group,
                                         self.state_bytes)
        self.kv_cache = allocate_kv_cache(self.attention_layers, self.num_blocks, self.block_size, self.dtype, device)
        for layer in self.state_layers:
            layer.allocate_state(self.num_state_slots, self.dtype, device)
        self.graphs: DecodeGraphs | None = None
        self.vision_graphs: VisionGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        if not config.engine.enforce_eager:
            if self.platform.supports_graphs and self.state_layers:  # the graphs' steps carry no state slots
                note_once("models with linear attention run eagerly (no CUDA graphs yet)")
            elif self.platform.supports_graphs:
                self.build_graphs()
            elif device.type != "cpu":  # on CPUs eager is what everyone expects: no note
                note_once(f"graph mode needs CUDA graphs; running eagerly on {device.type}")
        self.workers = None  # rank 0 of a tensor-parallel group: the channel to the other ranks
        self.eos_token_ids: list[int] = []  # what min_tokens holds back with the stop tokens (the engine sets it)
        self.mm_cache: dict[int, torch.Tensor] = {}  # sequence id -> its multimodal embeddings, mid-prefill
        # with prefix caching: recent prompts' embeddings by their items' hash, for prompts whose cached prefix ends
        # inside an item (a budget of one step's tokens, as vLLM's, at most ENCODER_CACHE_ROWS: it is not in the
        # KV budget)
        self.encoder_cache = EncoderCache(min(config.max_num_batched_tokens, ENCODER_CACHE_ROWS)) \
            if config.prefix_caching else None
        self.encoder_cache_cleared = False

    def choose_kernels(self, platform: Platform) -> None:
        """Gives every op `platform`'s implementation and every attention layer its backend (tests pass another
        platform's, e.g. CUDA's Triton kernels interpreted on CPU tensors)."""
        for module in self.model.modules():
            if isinstance(module, Op):
                module.impl = None
        platform.choose_kernels(self.model, self.config.engine, self.model.prompt_only_modules())
        self.backend = platform.attention_backend(self.config.engine.attention_backend)
        for layer in self.attention_layers:
            layer.backend = self.backend

    def build_graphs(self, capture: bool = True) -> None:
        """Graph mode's static, padded steps, captured as CUDA graphs (`capture=False`: run eagerly, for tests)."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0] if capture else 0
        max_len = self.config.max_model_len
        max_batch = min(self.config.max_num_seqs, self.config.engine.max_graph_batch)
        scratch = self.num_blocks  # the cache's extra block
        self.graphs = DecodeGraphs(self.model, max_batch, -(-max_len // self.block_size), scratch,
                                   self.block_size, self.platform, self.device, capture)
        item = self.model.static_mm_item()
        if capture and item is not None:  # the vision graphs have no padding: nothing to test without capture
            self.vision_graphs = VisionGraphs(self.model, item, self.dtype, self.device)
        if self.model.position_rows == 1:  # prompts whose positions have several rows run eagerly
            hidden = self.config.hf_config.text_config.hidden_size
            self.prefill_graphs = PrefillGraphs(self.model, min(max_len, PREFILL_GRAPH_TOKENS),
                                                scratch * self.block_size, hidden, self.dtype, self.platform,
                                                self.device, capture)
        if capture and tp_rank() == 0:
            used = (free_before - torch.cuda.mem_get_info(self.device)[0]) / GiB
            note_once(f"CUDA graphs captured in {time.perf_counter() - start:.1f} s, using {used:.2f} GiB "
                      f"(--enforce-eager skips them)")

    # ---- one step ---------------------------------------------------------------------------------
    # A step is prepared on the host from the scheduled sequences (rank 0), then executed by every
    # tensor-parallel rank from those host tensors alone.
    def prepare(self, step: ScheduledStep) -> StepInputs:
        inputs = prepare_step(step, self.model, self.block_size, self.backend.reads_runs,
                              () if self.encoder_cache is None else self.encoder_cache)
        if isinstance(inputs, PrefillInputs) and self.encoder_cache_cleared:
            inputs.clear_encoder_cache, self.encoder_cache_cleared = True, False
        return inputs

    def clear_encoder_cache(self) -> None:
        """Forgets every kept embedding, here now and on the other ranks with the next prefill."""
        if self.encoder_cache is not None:
            self.encoder_cache.clear()
            self.encoder_cache_cleared = True

    def _encode_mm(self, mm_inputs: MultiModalInputs) -> torch.Tensor:
        on_device = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                     for k, v in mm_inputs.items()}
        encode = self.vision_graphs.encode if self.vision_graphs is not None else self.model.encode_mm
        return encode(on_device)

    def _step_mm_embeds(self, inputs: PrefillInputs) -> torch.Tensor | None:
        """The multimodal embeddings of this step's multimodal positions, in order. A sequence's items are encoded
        at its first step (or taken from the encoder cache) and kept until its prompt is done (its later chunks read
        them)."""
        if inputs.clear_encoder_cache:
            self.encoder_cache.clear()
        if inputs.mm_new:
            encoding = [new for new in inputs.mm_new if new.encode]
            fresh = self._encode_mm(inputs.mm_inputs).split([new.rows for new in encoding]) if encoding else ()
            by_key = {new.key: e for new, e in zip(encoding, fresh) if new.key is not None}  # the first of a key
            for new, e in zip(encoding, fresh):
                self.mm_cache[new.seq_id] = e
            for new in inputs.mm_new:
                if not new.encode:  # an earlier sequence of this step brings its items, or the encoder cache has them
                    reused = by_key.get(new.key)
                    self.mm_cache[new.seq_id] = reused if reused is not None else self.encoder_cache.get(new.key)
            for key, e in by_key.items():
                self.encoder_cache.put(key, e)
        rows, start = [], 0
        for seq_id, n, offset, done in zip(inputs.seq_ids, inputs.seq_lens, inputs.mm_offsets, inputs.samples):
            count = int(inputs.mm_mask[start : start + n].sum())
            if count:
                rows.append(self.mm_cache[seq_id][offset : offset + count])
            if done:
                self.mm_cache.pop(seq_id, None)
            start += n
        return torch.cat(rows) if rows else None

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the next token of each sequence that samples this step (and their argmax when a graph
        computed it); a prefill with `all_rows` gives every row `kept_rows` keeps."""
        if isinstance(inputs, PrefillInputs):
            mm_embeds = self._step_mm_embeds(inputs)
            graphs = self.prefill_graphs
            whole_prompt = len(inputs.seq_lens) == 1 and inputs.cached_lens[0] == 0 and inputs.samples[0] \
                and not inputs.all_rows and inputs.key_ends is None  # the graphs' attention is causal
            if graphs is not None and whole_prompt and inputs.seq_lens[0] <= graphs.max_tokens:
                return graphs.run(inputs, mm_embeds)
            ids, positions, slots = (t.to(self.device) for t in (inputs.token_ids, inputs.positions, inputs.slots))
            tables = None if inputs.block_tables is None else inputs.block_tables.to(self.device)
            meta = AttentionMetadata(True, slots, seq_lens=inputs.seq_lens, block_tables=tables,
                                     cached_lens=inputs.cached_lens if tables is not None else None,
                                     key_ends=None if inputs.key_ends is None else inputs.key_ends.to(self.device))
            if inputs.state_slots is not None:
                fresh = [s for s, cached in zip(inputs.state_slots, inputs.cached_lens) if cached == 0]
                meta.state_slots = torch.tensor(inputs.state_slots, device=self.device)
                meta.fresh_slots = torch.tensor(fresh, dtype=torch.long, device=self.device) if fresh else None
            rows = kept_rows(inputs.seq_lens, inputs.all_rows, inputs.samples)[0]
            keep = torch.tensor(rows or [sum(inputs.seq_lens) - 1], device=self.device)  # a chunk alone: any row
            hidden = self.model(ids, positions, meta, mm_embeds, inputs.mm_mask.to(self.device), keep=keep)
            return self.model.compute_logits(hidden)[: len(rows)], None
        if self.graphs is not None and inputs.block_tables.shape[0] <= self.graphs.max_batch:
            return self.graphs.run(inputs)
        rows = torch.stack([inputs.token_ids, inputs.positions, inputs.slots, inputs.context_lens])
        ids, positions, slots, context_lens = self.platform.to_device(rows, self.device)  # one copy
        tables = self.platform.to_device(inputs.block_tables, self.device)
        meta = AttentionMetadata(False, slots, block_tables=tables, context_lens=context_lens,
                                 run_starts=inputs.run_starts)
        if inputs.state_slots is not None:
            meta.state_slots = torch.tensor(inputs.state_slots, device=self.device)
        return self.model.compute_logits(self.model(ids, positions, meta)), None

    def run(self, step: ScheduledStep) -> tuple[list[int], list[dict | None] | None]:
        """The next token of each sequence that samples this step (see ScheduledStep.samples), in order."""
        self.platform.before_step()
        inputs = self.prepare(step)
        if self.workers is None:
            logits, greedy = self.execute(inputs)
        else:
            with self.workers.watch():
                self.workers.send(inputs)
                logits, greedy = self.execute(inputs)
        if isinstance(inputs, PrefillInputs) and inputs.all_rows:
            logits = self._store_prompt_logprobs(step.seqs, inputs, logits)
        seqs = [seq for seq, samples in zip(step.seqs, step.samples()) if samples]
        if not seqs:
            return [], None
        params = [s.params for s in seqs]
        shaped = [p.penalized or p.min_tokens > s.num_output_tokens for p, s in zip(params, seqs)]
        histories = [(s.token_ids[: s.num_prompt_tokens], s.output_token_ids) if shape else ([], s.output_token_ids)
                     for s, shape in zip(seqs, shaped)] if any(shaped) else None
        return sample(logits, params, [s.generator for s in seqs], histories, self.eos_token_ids, greedy)

    @staticmethod
    def _store_prompt_logprobs(seqs: list[Sequence], inputs: PrefillInputs, logits: torch.Tensor) -> torch.Tensor:
        """Adds this step's prompt log-probs to the sequences that asked (entry 0, for the first token, is None);
        returns the rows of the sequences that sample, to sample from."""
        _, last, first = kept_rows(inputs.seq_lens, inputs.all_rows, inputs.samples)
        for seq, every, row, start, n in zip(seqs, inputs.all_rows, first, inputs.cached_lens, inputs.seq_lens):
            if not every:
                continue
            if start == 0:
                seq.prompt_logprobs = [None]
            targets = seq.token_ids[start + 1 : min(start + n + 1, seq.num_prompt_tokens)]
            seq.prompt_logprobs += prompt_logprobs(logits[row : row + len(targets)], targets,
                                                   seq.params.prompt_logprobs)
        return logits[torch.tensor(last, dtype=torch.long, device=logits.device)]
