"""What the engine needs to know about a kind of device, in one object: memory for the KV cache, the distributed
backend, graph support, synchronisation, host-to-device copies, peak memory, and which kernels its layers use.
`Platform` itself serves any PyTorch device that follows torch.cuda's module API (an out-of-tree plugin such as
Enflame's `torch_gcu` registers `torch.gcu`); `cpu.py` and `cuda.py` refine it."""
import types

import torch
from torch import nn

from vllm_utils.attention.backend import AttentionBackend
from vllm_utils.attention.torch_backend import TorchPagedAttention
from vllm_utils.config import EngineConfig
from vllm_utils.errors import UserError

GiB = 1 << 30


class Platform:
    dist_backend: str | None = None  # torch.distributed backend for tensor parallelism; None: not supported
    supports_graphs = False  # graph mode's captured steps
    attention_backends = ("torch",)

    def __init__(self, device_type: str, module: types.ModuleType | None = None) -> None:
        self.device_type = device_type
        self.module = module if module is not None else getattr(torch, device_type, None)

    # ---- devices ---------------------------------------------------------------------------------
    def max_ranks(self) -> int | None:
        """How many tensor-parallel ranks this machine can host (one per device); None: any number."""
        return self.module.device_count() if hasattr(self.module, "device_count") else 1

    def rank_device(self, device: torch.device, rank: int) -> torch.device:
        """The device tensor-parallel rank `rank` computes on."""
        return torch.device(self.device_type, rank)

    def configure_rank(self, device: torch.device, size: int) -> None:
        """Called in each tensor-parallel process before it joins the group."""
        if hasattr(self.module, "set_device"):
            self.module.set_device(device)

    def compute_threads(self) -> int | None:
        """The host threads the model computes on, where the host computes it (the CPU); None elsewhere."""
        return None

    def device_name(self, device: torch.device) -> str:
        getter = getattr(self.module, "get_device_name", None)
        return getter(device) if getter else device.type

    # ---- memory ----------------------------------------------------------------------------------
    def kv_cache_budget(self, device: torch.device, config: EngineConfig, one_sequence_bytes: int) -> int:
        """Bytes the KV cache may take: what `memory_fraction` of the device's memory leaves free after the
        weights, less a reserve for activations and graphs."""
        mem_get_info = getattr(self.module, "mem_get_info", None)
        if mem_get_info is None:
            raise UserError(f"the {self.device_type} plugin reports no free memory (torch.{self.device_type}."
                            f"mem_get_info); size the KV cache with --num-kv-blocks")
        free, total = mem_get_info(device)
        reserve = total * (1 - config.memory_fraction) + GiB
        return max(0, int(free - reserve))

    def peak_memory_bytes(self, device: torch.device) -> int:
        getter = getattr(self.module, "max_memory_allocated", None)
        return getter(device) if getter else 0

    def reset_peak_memory(self, device: torch.device) -> None:
        reset = getattr(self.module, "reset_peak_memory_stats", None)
        if reset:
            reset(device)

    def prepare_for_weights(self, model: nn.Module) -> None:
        """Called after the model's tensors are allocated and before the weights are written into them."""

    # ---- execution -------------------------------------------------------------------------------
    def synchronize(self, device: torch.device) -> None:
        if hasattr(self.module, "synchronize"):
            self.module.synchronize(device)

    def host_staging(self, t: torch.Tensor) -> torch.Tensor:
        """`t` in host memory that the device copies from without making the host wait."""
        return t

    def to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.host_staging(t).to(device, non_blocking=True)

    def resolve_dtype(self, dtype: torch.dtype, explicit: bool) -> torch.dtype:
        """The dtype the model runs in here, for the one asked (`explicit`: by the user, not the checkpoint)."""
        return dtype

    # ---- kernels ---------------------------------------------------------------------------------
    def attention_backend(self, name: str) -> AttentionBackend:
        """The paged-attention backend `name` ("auto": this device's best)."""
        if name not in ("auto", *self.attention_backends):
            raise UserError(f"attention backend '{name}' is not available on {self.device_type}; use one of "
                            f"{', '.join(self.attention_backends)}")
        return TorchPagedAttention()

    def before_step(self) -> None:
        """Called before each engine step; a platform that adapts to the machine's load decides here."""

    def idle(self) -> None:
        """The engine has no requests left; a platform that adapted to the load while they ran resets here."""

    def release(self) -> None:
        """The engine is done: what it set up on this platform (which outlives it) goes."""

    def choose_kernels(self, model: nn.Module, config: EngineConfig, prompt_only: list[tuple[nn.Module, int]]) -> None:
        """Gives the model's ops their device implementations (`Op.impl`), once, after loading. `prompt_only`:
        modules that never run in a decode step, each with the typical row count of its products."""
