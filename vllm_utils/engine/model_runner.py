"""Builds the model on its device, owns the paged KV cache, turns scheduled sequences into tensors,
runs the model and samples."""
import os
import sys
import time
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from vllm_utils.attention.backend import AttentionMetadata, get_backend
from vllm_utils.config import EngineConfig
from vllm_utils.devices import advise_huge_pages, to_device
from vllm_utils.engine.cuda_graphs import DecodeGraphs, PrefillGraphs, VisionGraphs
from vllm_utils.engine.sequence import Sequence
from vllm_utils.errors import UserError
from vllm_utils.layers.attention import PagedAttention
from vllm_utils.layers import cpu_kernels
from vllm_utils.layers.linear import enable_cpu_gemv, pack_for_onednn
from vllm_utils.layers.parallel import tp_rank
from vllm_utils.layers.sampler import sample
from vllm_utils.loader import init_dummy_weights, load_weights

GiB = 1 << 30
PREFILL_GRAPH_TOKENS = 1024  # longer prompts prefill eagerly: their launches are small next to their compute


@dataclass
class PrefillInputs:
    rows: torch.Tensor  # [3, tokens]: token ids, positions, cache slots of the packed prompts
    seq_lens: list[int]
    image_mask: torch.Tensor  # [tokens] bool: positions that take image features
    pixel_values: torch.Tensor | None  # every image of the batch, in prompt order


@dataclass
class DecodeInputs:
    rows: torch.Tensor  # [4, seqs]: last token ids, positions, cache slots, context lengths
    tables: torch.Tensor  # [seqs, width] int32 block tables padded with 0
    run_starts: list[int] | None = None  # see AttentionMetadata.run_starts


StepInputs = PrefillInputs | DecodeInputs
_said: set[str] = set()


def _say_once(message: str) -> None:
    """A note on stderr, once per process, from rank 0 only (every rank would say the same)."""
    if message not in _said and tp_rank() == 0:
        _said.add(message)
        print(f"note: {message}", file=sys.stderr)


def build_model(hf_config: PretrainedConfig, cls: type, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(hf_config).eval()
    finally:
        torch.set_default_dtype(default)


def _run_start(blocks: list[int]) -> int:
    """The first block if `blocks` is one ascending run, else -1."""
    first = blocks[0]
    return first if blocks[-1] - first == len(blocks) - 1 and blocks == list(range(first, first + len(blocks))) else -1


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config: PretrainedConfig, cls: type[torch.nn.Module],
                 device: torch.device, dtype: torch.dtype, max_model_len: int,
                 control_group: "torch.distributed.ProcessGroup | None" = None) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        self.control_group = control_group
        self.block_size = config.block_size
        self.model = build_model(hf_config, cls, device, dtype)
        advise_huge_pages(list(self.model.parameters()))  # before the weights are written
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_weights(self.model, config.model, show_progress=tp_rank() == 0)
        if device.type == "cpu" and dtype == torch.bfloat16:
            for module in getattr(self.model, "prompt_only_modules", list)():
                pack_for_onednn(module, getattr(self.model, "num_image_features", 1))
            if enable_cpu_gemv(self.model) == 0:
                why = cpu_kernels.unavailable_reason() or "no layer fits it"
                _say_once(f"the bf16 CPU decode kernel is off ({why}); linears use F.linear")
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.backend = get_backend(config.attention_backend, device)
        self.num_blocks = self._plan_kv_blocks(max_model_len)
        self._allocate_kv_cache()
        self.graphs: DecodeGraphs | None = None
        self.vision_graphs: VisionGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        if not config.enforce_eager:
            if device.type == "cuda":
                self.build_graphs(hf_config, max_model_len)
            else:
                _say_once(f"graph mode needs CUDA graphs; running eagerly on {device.type}")
        self.workers = None  # rank 0 of a tensor-parallel group: the channel to the other ranks

    def build_graphs(self, hf_config: PretrainedConfig, max_model_len: int, capture: bool = True) -> None:
        """Graph mode's static, padded steps, captured as CUDA graphs (`capture=False`: run eagerly, for tests)."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0] if capture else 0
        max_batch = min(self.config.max_num_seqs, self.config.max_graph_batch)
        scratch = self.num_blocks  # the cache's extra block
        self.graphs = DecodeGraphs(self.model, max_batch, -(-max_model_len // self.block_size), scratch,
                                   self.block_size, self.device, capture)
        if hasattr(self.model, "encode_images"):
            if capture:  # the vision tower's graphs have no padding: nothing to test without capture
                size = hf_config.vision_config.image_size
                self.vision_graphs = VisionGraphs(self.model, (hf_config.vision_config.num_channels, size, size),
                                                  self.dtype, self.device)
            self.prefill_graphs = PrefillGraphs(self.model, min(max_model_len, PREFILL_GRAPH_TOKENS),
                                                scratch * self.block_size, hf_config.text_config.hidden_size,
                                                self.dtype, self.device, capture)
        if capture and tp_rank() == 0:
            used = (free_before - torch.cuda.mem_get_info(self.device)[0]) / GiB
            print(f"note: CUDA graphs captured in {time.perf_counter() - start:.1f} s, using {used:.2f} GiB "
                  f"(--enforce-eager skips them)", file=sys.stderr)

    # ---- KV cache -------------------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * layer.num_kv_heads * layer.head_dim * self.dtype.itemsize
        return per_token * self.block_size * len(self.attention_layers)

    def _plan_kv_blocks(self, max_model_len: int) -> int:
        blocks_per_seq = -(-max_model_len // self.block_size)
        if self.config.num_kv_blocks is not None:
            num = self.config.num_kv_blocks
        else:
            wanted = blocks_per_seq * self.config.max_num_seqs
            one_sequence = (blocks_per_seq + 1) * self.kv_bytes_per_block
            num = min(wanted, self._kv_budget_bytes(one_sequence) // self.kv_bytes_per_block - 1)  # -1: scratch
            if self.control_group is not None:  # every rank must hold the same blocks: take the smallest
                count = torch.tensor([num])
                torch.distributed.all_reduce(count, torch.distributed.ReduceOp.MIN, group=self.control_group)
                num = int(count)
        if num < blocks_per_seq:
            have = num * self.kv_bytes_per_block / GiB
            raise UserError(
                f"the KV cache ({num} blocks, {have:.2f} GiB) cannot hold one sequence of --max-model-len "
                f"{max_model_len} ({blocks_per_seq} blocks of {self.block_size}); lower --max-model-len or "
                f"give the engine more memory"
            )
        return num

    def _kv_budget_bytes(self, one_sequence: int) -> int:
        """CUDA: what `memory_fraction` of the GPU leaves free after the weights. CPU: 4 GiB (as vLLM's CPU
        default), or one full-length sequence if that is more, and never more than half the free RAM."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = total * (1 - self.config.memory_fraction) + GiB  # activations, graphs, fragmentation
            return max(0, int(free - reserve))
        half_free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
        return min(half_free, max(4 * GiB, one_sequence))

    def _allocate_kv_cache(self) -> None:
        layer = self.attention_layers[0]
        # one block more than the block manager hands out: scratch space for padded graph rows
        shape = (2, len(self.attention_layers), self.num_blocks + 1, self.block_size, layer.num_kv_heads, layer.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.k_cache, attn.v_cache, attn.backend = self.kv_cache[0, i], self.kv_cache[1, i], self.backend

    # ---- one step ---------------------------------------------------------------------------------
    # A step is prepared on the host from the scheduled sequences (rank 0), then executed by every
    # tensor-parallel rank from those host tensors alone.
    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def prepare(self, seqs: list[Sequence], is_prefill: bool) -> StepInputs:
        return self._prepare_prefill(seqs) if is_prefill else self._prepare_decode(seqs)

    def _prepare_prefill(self, seqs: list[Sequence]) -> PrefillInputs:
        ids, positions, slots, lens, image_mask = [], [], [], [], []
        for seq in seqs:
            n = len(seq)
            ids.extend(seq.token_ids)
            positions.extend(range(n))
            slots.extend(self._slot(seq, p) for p in range(n))
            lens.append(n)
            # image positions are the prompt's placeholders; generated tokens never are, whatever their id
            image_mask.extend(t == self.model.image_token_index for t in seq.token_ids[: seq.num_prompt_tokens])
            image_mask.extend([False] * (n - seq.num_prompt_tokens))
        pixels = [s.pixel_values for s in seqs if s.pixel_values is not None]
        return PrefillInputs(torch.tensor([ids, positions, slots]), lens, torch.tensor(image_mask),
                             torch.cat(pixels) if pixels else None)

    def _prepare_decode(self, seqs: list[Sequence]) -> DecodeInputs:
        positions = [len(s) - 1 for s in seqs]
        rows = torch.tensor([[s.last_token for s in seqs], positions,
                             [self._slot(s, p) for s, p in zip(seqs, positions)], [len(s) for s in seqs]])
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)
        runs = [_run_start(s.block_table) for s in seqs] if self.backend.reads_runs else None
        return DecodeInputs(rows, tables, runs)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of each sequence's next token (and their argmax when a graph computed it)."""
        if isinstance(inputs, PrefillInputs):
            image_embeds = None
            if inputs.pixel_values is not None:
                pixels = inputs.pixel_values.to(self.device, self.dtype)
                encode = self.vision_graphs.encode if self.vision_graphs is not None else self.model.encode_images
                image_embeds = encode(pixels).flatten(0, 1)
            graphs = self.prefill_graphs
            if graphs is not None and len(inputs.seq_lens) == 1 and inputs.seq_lens[0] <= graphs.max_tokens:
                return graphs.run(inputs.rows, inputs.image_mask, image_embeds)
            rows = inputs.rows.to(self.device)
            meta = AttentionMetadata(True, rows[2], seq_lens=inputs.seq_lens)
            last = torch.tensor(inputs.seq_lens).cumsum(0).to(self.device) - 1
            hidden = self.model(rows[0], rows[1], meta, image_embeds, inputs.image_mask.to(self.device), keep=last)
            return self.model.compute_logits(hidden), None
        if self.graphs is not None and inputs.tables.shape[0] <= self.graphs.max_batch:
            return self.graphs.run(inputs.rows, inputs.tables)
        rows, tables = to_device(inputs.rows, self.device), to_device(inputs.tables, self.device)
        meta = AttentionMetadata(False, rows[2], block_tables=tables, context_lens=rows[3], run_starts=inputs.run_starts)
        return self.model.compute_logits(self.model(rows[0], rows[1], meta)), None

    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[int], list[float] | None]:
        inputs = self.prepare(seqs, is_prefill)
        if self.workers is None:
            logits, greedy = self.execute(inputs)
        else:
            with self.workers.watch():
                self.workers.send(inputs)
                logits, greedy = self.execute(inputs)
        want_logprobs = any(s.params.logprobs for s in seqs)
        return sample(logits, [s.params for s in seqs], [s.generator for s in seqs], want_logprobs, greedy)
