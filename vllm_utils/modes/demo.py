"""`--demo`: the plan's requests (pictures or a video with a prompt) through the backend, greedy or sampled, and with
`--reference hf` how well our engine agrees with HF transformers on them."""
from dataclasses import dataclass

import torch

from vllm_utils.outputs import RequestOutput
from vllm_utils.modes.acc.agreement import Agreement, agreement, overall
from vllm_utils.modes.backends import Backend, open_reference
from vllm_utils.modes.plan import Plan
from vllm_utils.sampling_params import SamplingParams


@dataclass(frozen=True)
class DemoResult:
    outputs: list[RequestOutput]
    labels: list[str]  # what each request carried
    agreement: list[Agreement] | None  # --reference hf: per request
    agreement_overall: dict | None


def run(plan: Plan, backend: Backend) -> DemoResult:
    """As in vLLM, --seed seeds one global generator that every request draws from: identical requests sample
    differently, and the same command gives the same text."""
    spec, requests = plan.spec, plan.inputs.requests
    params = SamplingParams(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                            max_tokens=spec.output_len)
    torch.manual_seed(spec.engine.seed)
    outputs = backend.generate(requests, params)
    if spec.reference is None:
        return DemoResult(outputs, plan.inputs.labels, None, None)
    reference = open_reference(plan)
    figures = agreement(backend, reference, requests, [o.outputs[0].token_ids for o in outputs], spec.output_len)
    return DemoResult(outputs, plan.inputs.labels, figures, overall(figures))
