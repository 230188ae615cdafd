"""What the tiny checkpoint builders share: random weights scaled so that greedy tokens vary, renaming saved tensors
into the key layouts found on the hub, and the processor's JSON files."""
import json
import os
from typing import Callable

import torch


def scale_weights(model: torch.nn.Module, tied: bool, tables: tuple[str, ...] = ()) -> None:
    """transformers' init is tiny. Token embeddings get unit entries (so that the token, not the layers' output,
    leads the residual stream and greedy tokens vary), other matrices unit-variance outputs (logits far from ties),
    biases and norm scales move off their defaults (so that loading them matters), and the parameters named by
    `tables` (position tables, weights transformers starts at zero) get entries of 0.5. With tied embeddings a
    token's own embedding in the last hidden state makes it its own best successor; final norm scales of random
    sign break that."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or (tied and name.endswith("language_model.norm.weight")):
                p.normal_(0, 1.0)
            elif tables and name.endswith(tables):
                p.normal_(0, 0.5)
            elif p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def update_json(path: str, values: dict) -> None:
    """A JSON file with `values` set in it."""
    with open(path) as f:
        data = json.load(f)
    write_json(path, {**data, **values})


def rewrite_keys(folder: str, prefixes: dict[str, str], canonical: Callable[[str], str]) -> None:
    """Renames the saved tensors into one of the key layouts found on the hub: each `canonical` name's prefix to
    what `prefixes` maps it to."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    renamed = {}
    for key, value in load_file(path).items():
        key = canonical(key)
        prefix = next(p for p in prefixes if key.startswith(p))
        renamed[prefixes[prefix] + key[len(prefix):]] = value.contiguous()
    save_file(renamed, path, metadata={"format": "pt"})
