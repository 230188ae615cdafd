"""What the tiny checkpoint builders share: renaming saved tensors into the key layouts found on the hub."""
import os
from typing import Callable


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
