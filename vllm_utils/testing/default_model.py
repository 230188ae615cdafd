"""The default model of each family: a tiny random checkpoint (and a generated picture), built on first use and
cached, so that every mode runs with no checkpoint at hand. Its text is gibberish by design."""
import importlib
import os
import shutil
from dataclasses import dataclass

from vllm_utils.testing.images import make_demo_image


@dataclass(frozen=True)
class DefaultModel:
    folder: str
    image: str  # a generated picture
    built: bool  # built by this call (else read from the cache)


def cache_dir(model_type: str) -> str:
    root = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(root, "vllm_utils", f"tiny-{model_type}-demo-v1")


def default_model(model_type: str = "llava") -> DefaultModel:
    """The family's tiny model, from the cache or built into it (whole or not at all: built aside, then renamed)."""
    from vllm_utils.models.registry import family

    folder = cache_dir(model_type)
    model, image = os.path.join(folder, "model"), os.path.join(folder, "demo.png")
    if os.path.isfile(os.path.join(model, "model.safetensors")) and os.path.isfile(image):
        return DefaultModel(model, image, built=False)
    module, function = family(model_type).tiny_builder.split(":")
    tmp = folder + f".tmp{os.getpid()}"
    getattr(importlib.import_module(module), function)(os.path.join(tmp, "model"))
    make_demo_image(os.path.join(tmp, "demo.png"))
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return DefaultModel(model, image, built=True)
