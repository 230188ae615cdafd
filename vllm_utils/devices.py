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


def synchronize(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and module is not None and hasattr(module, "synchronize"):
        module.synchronize()
