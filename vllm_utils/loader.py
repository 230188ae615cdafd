"""Checkpoint tensors -> model parameters: safetensors (one file or sharded with an index), every key
layout the model's `checkpoint_key` knows, or random ("dummy") weights."""
import glob
import json
import os
from functools import partial

import torch
from safetensors import safe_open
from torch import nn

from vllm_utils.progress import progress_bar
from vllm_utils.errors import UserError


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise UserError(f"'{folder}' lacks weight shard {missing[0]} named in its index; download it again, "
                            f"or use --load-format dummy for random weights")
        return [os.path.join(folder, s) for s in shards]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise UserError(f"'{folder}' holds no *.safetensors weights; convert the checkpoint to safetensors, "
                        f"or use --load-format dummy for random weights")
    return files


def resolve_target(model: nn.Module, key: str) -> tuple[str, object] | None:
    """(parameter name, shard id) for one of our canonical keys, mapping unfused names to fused ones."""
    name = model.checkpoint_key(key)
    if name is None:
        return None
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in model.packed_modules:
            fused, shard = model.packed_modules[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return name, None


def _shards(model: nn.Module) -> dict[str, list]:
    """Our fused module name -> the shard ids of the checkpoint tensors it is made of."""
    shards: dict[str, list] = {}
    for fused, shard in model.packed_modules.values():
        shards.setdefault(fused, []).append(shard)
    return shards


def _module_of(name: str) -> str:
    """The name of the module holding parameter `name` within its parent ("" for the model's own)."""
    return name.rpartition(".")[0].rpartition(".")[2]


def targets_filled(model: nn.Module, name: str, shard: object) -> list[tuple[str, object]]:
    """What loading one checkpoint tensor fills: its shard, or every shard when it is already fused."""
    shards = _shards(model).get(_module_of(name))
    return [(name, s) for s in shards] if shard is None and shards else [(name, shard)]


def expected_targets(model: nn.Module) -> set[tuple[str, object]]:
    shards = _shards(model)
    expected = set()
    for name, _ in model.named_parameters():  # tied parameters appear once, under their first name
        for shard in shards.get(_module_of(name), [None]):
            expected.add((name, shard))
    return expected


def untie_what_the_checkpoint_holds_apart(model: nn.Module, files: list[str]) -> list[tuple]:
    """A parameter the model shares under several names (the LM head tied to the embeddings, as the config says)
    gets one of its own for each further name the checkpoint holds a tensor of, as transformers unties them when
    the checkpoint holds both with different values. Returns (module, attribute, shared parameter) of each, for
    `retie_equal`."""
    held = set()
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            held.update(target[0] for target in map(partial(resolve_target, model), f.keys()) if target)
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    untied = []
    for names in names_of.values():
        for name in [n for n in names if n in held][1:]:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            shared = getattr(module, attr)
            own = nn.Parameter(torch.empty_like(shared), requires_grad=False)
            own.__dict__.update(shared.__dict__)  # its weight_loader
            setattr(module, attr, own)
            untied.append((module, attr, shared))
    return untied


def retie_equal(untied: list[tuple]) -> None:
    """Shares again what the checkpoint held twice with equal values, as transformers keeps those tied."""
    for module, attr, shared in untied:
        if torch.equal(getattr(module, attr), shared):
            setattr(module, attr, shared)


def load_weights(model: nn.Module, folder: str, show_progress: bool = True) -> None:
    files = safetensors_files(folder)
    untied = untie_what_the_checkpoint_holds_apart(model, files)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[tuple[str, object]] = set()
    bar = progress_bar(total=sum(os.path.getsize(p) for p in files), desc="Loading weights", unit="B",
                       unit_scale=True, unit_divisor=1024, disable=not show_progress)
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                target = resolve_target(model, key)
                if target is None:
                    continue
                name, shard = target
                if name not in params:
                    raise UserError(f"checkpoint tensor '{key}' matches no parameter of the model: "
                                    f"is '{folder}' really this model type?")
                param = params[name]
                tensor = f.get_tensor(key)
                getattr(param, "weight_loader", _copy)(param, tensor.to(param.dtype), shard)
                loaded.update(targets_filled(model, name, shard))
                bar.update(tensor.nbytes)
    bar.close()
    missing = sorted(expected_targets(model) - loaded, key=str)
    if missing:
        name, shard = missing[0]
        shown = name if shard is None else f"{name} (shard {shard})"
        raise UserError(f"checkpoint in '{folder}' lacks tensor '{shown}' ({len(missing)} missing in all); "
                        f"the download is incomplete or the folder holds another model")
    retie_equal(untied)


def _copy(param: nn.Parameter, tensor: torch.Tensor, shard: object) -> None:
    param.data.copy_(tensor)


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of a realistic scale, drawn on the parameters' own device, for benchmarking
    without the real checkpoint. Norm scales are one and biases of norms zero."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            continue
        if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
            param.data.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.data.uniform_(-0.02, 0.02, generator=generators[param.device])
