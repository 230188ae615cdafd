"""Token progress for `--backend hf`: HF's `generate` runs a whole batch in one call, so the bar counts
the batch's generated positions through a stopping criterion that never stops anything. Wraps the backend
from outside (its own per-batch prompt bar is turned off: it sat at 0/1 for the whole run)."""
import torch
from transformers import StoppingCriteria

from vllm_utils.bench.progress import progress_bar


class _CountTokens(StoppingCriteria):
    def __init__(self, bar) -> None:
        self.bar = bar

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.bar.update(input_ids.shape[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def add_token_progress(llm) -> None:
    """`llm`: an HFGenerate. Its prompt bar off, a token bar on each `model.generate` call."""
    model, generate = llm.engine.model, llm.engine.model.generate
    llm_generate = llm.generate

    def generate_with_progress(*args, **kwargs):
        rows, new = kwargs["input_ids"].shape[0], kwargs["max_new_tokens"]
        with progress_bar(total=rows * new, desc="Generating (HF)", unit="tok") as bar:
            kwargs["stopping_criteria"] = [*(kwargs.get("stopping_criteria") or []), _CountTokens(bar)]
            return generate(*args, **kwargs)

    def quiet_generate(prompts, sampling_params=None, use_tqdm: bool = True):
        return llm_generate(prompts, sampling_params, use_tqdm=False)

    model.generate = generate_with_progress
    llm.generate = quiet_generate
