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


def _device_module(kind: str, flag: str) -> types.ModuleType | None:
    """torch.<kind>, after importing the kind's plugin where it has one."""
    plugin = DEVICE_PLUGINS.get(kind)
    if plugin is not None:
        try:
            importlib.import_module(plugin)
        except ImportError:
            raise UserError(f"{flag} {kind}: its PyTorch plugin '{plugin}' is not installed; install the vendor's "
                            f"plugin or use {flag} cpu") from None
    module = getattr(torch, kind, None)
    return module if hasattr(module, "is_available") else None


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """`flag`: the option the name came from, for the messages."""
    kind = name.split(":")[0]
    if kind == "cpu":
        return torch.device(name)
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} cuda: PyTorch sees no CUDA GPU here; use {flag} cpu or a CUDA build of torch")
    module = _device_module(kind, flag)
    if module is None:
        raise UserError(f"unknown device '{name}' ({flag}): use cpu, cuda, gcu or another device a PyTorch plugin "
                        f"registers")
    if not module.is_available():
        plugin = DEVICE_PLUGINS.get(kind)
        raise UserError(f"{flag} {kind}: " + (f"plugin '{plugin}' is installed but " if plugin else "PyTorch ")
                        + f"sees no {kind} device")
    return torch.device(name)


_PLATFORMS: dict[str, Platform] = {}


def platform_for(device: torch.device) -> Platform:
    """The process's one platform object for the device's kind, built on first use (a CPU one settles torch's
    thread count)."""
    if device.type not in _PLATFORMS:
        _PLATFORMS[device.type] = _new_platform(device.type)
    return _PLATFORMS[device.type]


def _new_platform(kind: str) -> Platform:
    if kind == "cpu":
        from vllm_utils.platforms.cpu import CpuPlatform

        return CpuPlatform()
    if kind == "cuda":
        from vllm_utils.platforms.cuda import CudaPlatform

        return CudaPlatform()
    return Platform(kind)
