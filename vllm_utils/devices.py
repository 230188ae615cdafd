"""Turning a device name into a usable torch.device, with one clear error when it cannot be."""
import importlib

import torch

from vllm_utils.errors import UserError

# Out-of-tree devices and the PyTorch plugin module that registers them.
DEVICE_PLUGINS = {"gcu": "torch_gcu"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str) -> torch.device:
    kind = name.split(":")[0]
    if kind == "cpu":
        return torch.device(name)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu or a CUDA build of torch")
        return torch.device(name)
    if kind in DEVICE_PLUGINS:
        plugin = DEVICE_PLUGINS[kind]
        try:
            importlib.import_module(plugin)
        except ImportError:
            raise UserError(
                f"--device {kind}: its PyTorch plugin '{plugin}' is not installed; install the vendor's "
                f"plugin or use --device cpu"
            ) from None
        module = getattr(torch, kind, None)
        if module is None or not module.is_available():
            raise UserError(f"--device {kind}: plugin '{plugin}' is installed but sees no {kind} device")
        return torch.device(name)
    raise UserError(f"unknown device '{name}': use cpu, cuda or gcu")


def pinned_for(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` in host memory that `device` copies from asynchronously: pinned for CUDA (a copy from pageable
    memory makes the host wait for the GPU's queue first)."""
    return t.pin_memory() if device.type == "cuda" else t


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, without waiting for the device."""
    return pinned_for(t, device).to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and module is not None and hasattr(module, "synchronize"):
        module.synchronize()


def advise_huge_pages(tensors: "list[torch.Tensor]", min_bytes: int = 4 << 20) -> int:
    """Asks Linux to back these CPU tensors with 2 MB pages (MADV_HUGEPAGE), which streams weights faster
    (fewer TLB misses). Call it before the memory is first written. Returns the bytes advised."""
    import ctypes
    import sys

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
