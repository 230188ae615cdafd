"""The paged KV cache: how many blocks the platform's memory budget allows, and the one tensor that holds them."""
import torch

from vllm_utils.attention.layer import PagedAttention
from vllm_utils.config import ResolvedConfig
from vllm_utils.errors import UserError
from vllm_utils.notes import note_once
from vllm_utils.platforms.interface import GiB, Platform


def bytes_per_block(layers: list[PagedAttention], block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * layers[0].num_kv_heads * layers[0].head_dim * dtype.itemsize
    return per_token * block_size * len(layers)


def plan_kv_blocks(config: ResolvedConfig, platform: Platform, device: torch.device, layers: list[PagedAttention],
                   control_group: "torch.distributed.ProcessGroup | None" = None, state_bytes: int = 0) -> int:
    """--num-kv-blocks, else as many as the batch can fill within the platform's budget less `state_bytes` (the
    linear-attention layers' states, allocated next; at tensor parallelism the smallest of every rank's); at least
    one whole sequence's, or a one-line error."""
    block_size, max_len = config.engine.block_size, config.max_model_len
    per_block = bytes_per_block(layers, block_size, config.dtype)
    blocks_per_seq = -(-max_len // block_size)
    if config.engine.num_kv_blocks is not None:
        num = config.engine.num_kv_blocks
    else:
        wanted = blocks_per_seq * config.max_num_seqs
        budget = platform.kv_cache_budget(device, config.engine, (blocks_per_seq + 1) * per_block + state_bytes)
        budget -= state_bytes
        num = min(wanted, budget // per_block - 1)  # -1: the scratch block
        if control_group is not None:  # every rank must hold the same blocks: take the smallest
            count = torch.tensor([num])
            torch.distributed.all_reduce(count, torch.distributed.ReduceOp.MIN, group=control_group)
            num = int(count)
    if num < blocks_per_seq:
        raise UserError(
            f"the KV cache ({num} blocks, {num * per_block / GiB:.2f} GiB) cannot hold one sequence of "
            f"--max-model-len {max_len} ({blocks_per_seq} blocks of {block_size}); lower --max-model-len, free "
            f"memory, or give the cache exactly one sequence's room with --num-kv-blocks {blocks_per_seq}")
    return num


def plan_state_slots(config: ResolvedConfig, platform: Platform, device: torch.device, layers: list[PagedAttention],
                     per_sequence: int, control_group: "torch.distributed.ProcessGroup | None" = None) -> int:
    """Sequences whose recurrent state (`per_sequence` bytes each: the linear-attention layers') is held at once:
    --batch-size, or as many as half the platform's budget holds (at least one; at tensor parallelism the smallest of
    every rank's). 0 for models without such a state."""
    if not per_sequence:
        return 0
    one_sequence_kv = (-(-config.max_model_len // config.engine.block_size) + 1) * bytes_per_block(
        layers, config.engine.block_size, config.dtype)
    budget = platform.kv_cache_budget(device, config.engine, one_sequence_kv + per_sequence)
    slots = max(1, min(config.max_num_seqs, budget // 2 // per_sequence))
    if control_group is not None:
        count = torch.tensor([slots])
        torch.distributed.all_reduce(count, torch.distributed.ReduceOp.MIN, group=control_group)
        slots = int(count)
    if slots < config.max_num_seqs:
        note_once(f"the recurrent state takes {per_sequence / 2**20:.1f} MiB a sequence and half the cache budget "
                  f"holds {slots} of them: at most {slots} requests run at once (--batch-size {config.max_num_seqs})")
    return slots


def allocate_kv_cache(layers: list[PagedAttention], num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """One tensor [K/V, layer, block, slot, head, dim], each layer given its views. One block more than the block
    manager hands out: scratch space for padded graph rows."""
    layer = layers[0]
    shape = (2, len(layers), num_blocks + 1, block_size, layer.num_kv_heads, layer.head_dim)
    cache = torch.zeros(shape, dtype=dtype, device=device)
    for i, attn in enumerate(layers):
        attn.k_cache, attn.v_cache = cache[0, i], cache[1, i]
    return cache
