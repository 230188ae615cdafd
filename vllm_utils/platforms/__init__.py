"""One platform object per kind of device: `resolve_device` turns a device name into a usable torch.device (or one
clear error), `platform_for` gives its platform."""
import importlib
import types

import torch

from vllm_utils.errors import UserError
from vllm_utils.platforms.interface import Platform

# Out-of-tree devices and the PyTorch plugin module that registers them.
DEVICE_PLUGINS = {"gcu": "torch_gcu"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_module(kind: str) -> types.ModuleType | None:
    """torch.<kind>, after importing the kind's plugin where it has one."""
    plugin = DEVICE_PLUGINS.get(kind)
    if plugin is not None:
        try:
            importlib.import_module(plugin)
        except ImportError:
            raise UserError(f"--device {kind}: its PyTorch plugin '{plugin}' is not installed; install the vendor's "
                            f"plugin or use --device cpu") from None
    module = getattr(torch, kind, None)
    return module if hasattr(module, "is_available") else None


def resolve_device(name: str) -> torch.device:
    kind = name.split(":")[0]
    if kind == "cpu":
        return torch.device(name)
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu or a CUDA build of torch")
    module = _device_module(kind)
    if module is None:
        raise UserError(f"unknown device '{name}': use cpu, cuda, gcu or another device a PyTorch plugin registers")
    if not module.is_available():
        plugin = DEVICE_PLUGINS.get(kind)
        raise UserError(f"--device {kind}: " + (f"plugin '{plugin}' is installed but " if plugin else "PyTorch ")
                        + f"sees no {kind} device")
    return torch.device(name)


def platform_for(device: torch.device) -> Platform:
    if device.type == "cpu":
        from vllm_utils.platforms.cpu import CpuPlatform

        return CpuPlatform()
    if device.type == "cuda":
        from vllm_utils.platforms.cuda import CudaPlatform

        return CudaPlatform()
    return Platform(device.type)
