"""Configurations the package carries, so `--model NAME --load-format dummy` works without a download."""
import os

_HERE = os.path.join(os.path.dirname(__file__), "configs")
BUNDLED = {"llava-hf/llava-1.5-7b-hf": "llava-1.5-7b-hf"}


def bundled_config_dir(model: str) -> str | None:
    """The packaged folder for a known hub name, unless a local folder of that name exists."""
    if model in BUNDLED and not os.path.isdir(model):
        return os.path.join(_HERE, BUNDLED[model])
    return None
