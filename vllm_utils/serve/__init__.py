"""An OpenAI-compatible HTTP server on our engine (`python3 -m vllm_utils.serve`): FastAPI routes (`app.py`) over
one engine loop in a thread (`async_engine.py`), the API's shapes (`protocol.py`), Prometheus metrics
(`metrics.py`). Needs the `serve` extra: pip install 'vllm_utils[serve]'."""
import importlib.util

from vllm_utils.errors import UserError

SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}


def require(packages: dict[str, str], what: str) -> None:
    """One line naming the missing packages and the extra that installs them."""
    missing = [name for module, name in packages.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}: pip install 'vllm_utils[serve]'")
