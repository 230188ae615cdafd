"""The host CPU: KV cache in RAM, gloo for tensor parallelism, and in bf16 our C kernels (x86 with AVX512-BF16)
and oneDNN's packed weights for the layers they serve."""
import ctypes
import os
import resource
import sys

import torch
from torch import nn

from vllm_utils import threads
from vllm_utils.attention.backend import AttentionBackend
from vllm_utils.attention.cpu_backend import CpuPagedAttention
from vllm_utils.attention.encoder import EncoderAttention
from vllm_utils.attention.torch_backend import TorchPagedAttention
from vllm_utils.config import EngineConfig
from vllm_utils.kernels import cpu
from vllm_utils.kernels.cpu_linear import DecodeLinear, OneDnnLinear, PackedOneDnnLinear, can_pack_for_onednn
from vllm_utils.layers.activation import ACTIVATIONS, ActAndMul, Activation
from vllm_utils.layers.delta_rule import GatedDeltaRule
from vllm_utils.layers.linear import LinearOp
from vllm_utils.layers.moe import FusedMoE
from vllm_utils.layers.norm import RMSNorm
from vllm_utils.layers.op import Op
from vllm_utils.layers.rotary import RotaryEmbedding
from vllm_utils.notes import note_once
from vllm_utils.platforms.cpu_team import TeamFollower
from vllm_utils.platforms.interface import GiB, Platform


def available_ram(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of RAM new allocations can take: the kernel's MemAvailable (free pages and the page cache it can
    reclaim), else the free pages alone."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class CpuPlatform(Platform):
    dist_backend = "gloo"
    attention_backends = ("torch", "cpu")

    def __init__(self) -> None:
        super().__init__("cpu", module=None)
        self.team: TeamFollower | None = None  # set by choose_kernels where the team follows the load
        # torch imported before vllm_utils counts every core of the machine: no more than this process may use
        chosen = threads.system_choice().threads
        if torch.get_num_threads() > chosen:
            torch.set_num_threads(chosen)

    def max_ranks(self) -> int | None:
        return None  # the ranks share the cores

    def rank_device(self, device: torch.device, rank: int) -> torch.device:
        return device

    def configure_rank(self, device: torch.device, size: int) -> None:
        torch.set_num_threads(max(1, threads.system_choice().threads // size))  # the ranks share the cores

    def compute_threads(self) -> int:
        """Where the team follows the load, its full size."""
        return self.team.full if self.team is not None else torch.get_num_threads()

    def threads_line(self) -> str:
        """The threads, where their count comes from and how the team followed the load, for a report."""
        n = self.compute_threads()
        followed = self.team.summary() if self.team is not None else ""
        return f"CPU threads: {n} ({threads.describe(n)})" + (f"; {followed}" if followed else "")

    def device_name(self, device: torch.device) -> str:
        return cpu.cpu_model() or "cpu"

    def kv_cache_budget(self, device: torch.device, config: EngineConfig, one_sequence_bytes: int) -> int:
        """4 GiB (as vLLM's CPU default), or one full-length sequence if that is more, and never more than half
        the RAM available (free, or given back by the page cache when asked)."""
        return min(available_ram() // 2, max(4 * GiB, one_sequence_bytes))

    def peak_memory_bytes(self, device: torch.device) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak RSS

    def reset_peak_memory(self, device: torch.device) -> None:
        pass  # the kernel keeps a process's peak RSS; it cannot be reset

    def synchronize(self, device: torch.device) -> None:
        pass

    def resolve_dtype(self, dtype: torch.dtype, explicit: bool) -> torch.dtype:
        if dtype != torch.float16:
            return dtype
        # as vLLM's CPU backend does: fp16 matmuls run several times slower than bf16 on CPUs
        if explicit:
            note_once("float16 is slow on CPUs; using bfloat16 (same size); --dtype float32 for full precision")
        return torch.bfloat16

    def prepare_for_weights(self, model: nn.Module) -> None:
        advise_huge_pages(list(model.parameters()))

    def attention_backend(self, name: str) -> AttentionBackend:
        super().attention_backend(name)  # checks the name
        if name == "torch":
            return TorchPagedAttention(reads_runs=True)
        return CpuPagedAttention()

    def before_step(self) -> None:
        if self.team is not None:
            self.team.before_step()

    def idle(self) -> None:
        if self.team is not None:
            self.team.rest()

    def release(self) -> None:
        self.idle()
        self.team = None

    def choose_kernels(self, model: nn.Module, config: EngineConfig, prompt_only: list[tuple[nn.Module, int]]) -> None:
        """bf16 only (fp32 runs the native ops): linears of prompt-only modules on oneDNN's packed weights; the
        other linears on our decode kernel (chained so each reads ahead into the next) where it takes their
        weight, else on oneDNN; norms, RoPE, activations, encoder attention, the products of the experts a
        decode step chose and the delta rule's decode step on our kernels. Any dtype: the
        thread team follows the load (before each step), unless configured off or ranks share the cores."""
        self.release()  # an earlier engine's team, if any
        if config.cpu_follow_load and config.tensor_parallel_size == 1:
            self.team = TeamFollower(torch.get_num_threads(), torch.set_num_threads)
        params = [p for p in model.parameters() if p.numel()]
        if not params or params[0].dtype != torch.bfloat16:
            return
        use_kernels = config.cpu_kernels and not cpu.unavailable_reason()
        if config.cpu_kernels and not use_kernels:
            note_once(f"our bf16 CPU kernels are off ({cpu.unavailable_reason()}); using PyTorch ops")
        packed = set()
        if can_pack_for_onednn():
            for module, rows in prompt_only:
                for layer in module.modules():
                    if isinstance(layer, LinearOp):
                        layer.impl = PackedOneDnnLinear(layer.weight, rows)
                        packed.add(layer)
        linears = [m for m in model.modules() if isinstance(m, LinearOp) and m not in packed]
        decode = [m for m in linears if use_kernels and cpu.supports(m.weight)]
        for layer, after in zip(decode, decode[1:] + [None]):  # module order is the decode order of our models
            layer.impl = DecodeLinear(layer.weight, None if after is None else after.weight.data)
        for layer in linears:
            if layer.impl is None:
                layer.impl = OneDnnLinear(layer.weight)
        if not use_kernels:
            return
        for module in model.modules():
            if isinstance(module, Op) and not isinstance(module, LinearOp):
                module.impl = _kernel_for(module)


def _kernel_for(module: Op):
    """The C-kernel implementation of a non-linear op, falling back to its native form for inputs the kernel does
    not take; None where there is none."""
    native = module.forward_native
    if isinstance(module, RMSNorm):
        def rmsnorm(x, residual=None):
            if cpu.supports_rmsnorm(x, module.weight, residual):
                return cpu.rmsnorm(x, module.weight, module.eps, residual)
            return native(x, residual)
        return rmsnorm
    if isinstance(module, ActAndMul) and module.name == "silu":
        return lambda x: cpu.silu_mul(x) if x.dim() == 2 and cpu.supports_activation(x) else native(x)
    if isinstance(module, Activation) and module.name == "quick_gelu":
        return lambda x: cpu.quick_gelu(x) if cpu.supports_activation(x) else native(x)
    if isinstance(module, RotaryEmbedding):
        def rope(positions, q, k):
            index, cos, sin = module.tables(positions)
            if cpu.supports_rope(q, index, cos) and cpu.supports_rope(k, index, cos):
                cpu.rope_(q, index, cos, sin)
                cpu.rope_(k, index, cos, sin)
                return q, k
            return native(positions, q, k)
        return rope
    if isinstance(module, FusedMoE):  # the chosen experts' products on the decode kernel, for few rows
        def expert(x, index):
            w13, w2 = module.w13.weight[index], module.w2.weight[index]
            if x.shape[0] > cpu.max_rows() or not (cpu.supports(w13) and cpu.supports(w2)):
                return module.expert(x, index)
            gate_up = cpu.linear(x, w13)
            hidden = cpu.silu_mul(gate_up) if module.act == "silu" and cpu.supports_activation(gate_up) else \
                ACTIVATIONS[module.act](gate_up[:, : module.intermediate]) * gate_up[:, module.intermediate :]
            return cpu.linear(hidden, w2)
        return lambda x, weights, ids: module.forward_sparse(x, weights, ids, expert)
    if isinstance(module, GatedDeltaRule):  # decode steps: each state read and written once, in place
        def delta_rule(q, k, v, g, beta, states, slots, seq_lens):
            if seq_lens is None and cpu.supports_delta_rule(states):
                return cpu.delta_rule_step_(q, k, v, g, beta, states, slots)
            return native(q, k, v, g, beta, states, slots, seq_lens)
        return delta_rule
    if isinstance(module, EncoderAttention):
        def attention(q, k, v):
            if not cpu.supports_prefill_attention(q[0], k[0], v[0]):
                return native(q, k, v)
            return torch.stack([cpu.prefill_attention(q[i], k[i], v[i], module.scale, causal=False)
                                for i in range(q.shape[0])])
        return attention
    return None


def advise_huge_pages(tensors: list[torch.Tensor], min_bytes: int = 4 << 20) -> int:
    """Asks Linux to back these CPU tensors with 2 MB pages (MADV_HUGEPAGE), which streams weights faster
    (fewer TLB misses). Call it before the memory is first written. Returns the bytes advised."""
    if sys.platform != "linux":
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, advised = 4096, 0
    for t in tensors:
        size = t.numel() * t.element_size()
        if t.device.type != "cpu" or size < min_bytes:
            continue
        start = -(-t.data_ptr() // page) * page  # madvise wants page-aligned ranges
        end = (t.data_ptr() + size) // page * page
        if madvise(start, end - start, 14) == 0:  # 14: MADV_HUGEPAGE
            advised += end - start
    return advised
