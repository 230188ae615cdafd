"""`--demo --reference hf`: the demo's requests also through the HF reference, and the agreement figures."""
import argparse
import json

from vllm_utils.bench.acc.agreement import agreement, overall
from vllm_utils.hf_reference import HFReference
from vllm_utils.llm import multi_modal_items
from vllm_utils.progress import phase


def demo_agreement(llm, args: argparse.Namespace, requests: list[dict], outputs: list, max_tokens: int) -> None:
    """--demo --reference hf: the agreement figures of each request, then overall, as --acc prints them."""
    processor = llm.engine.processor
    with phase(f"Loading the HF reference ({args.reference_dtype} on {args.reference_device})", "Loading"):
        reference = HFReference(args.model, args.reference_dtype, args.reference_device, args.model_type,
                                hf_processor=False)
    processed = [dict(zip(("prompt_token_ids", "mm_inputs"), processor.process(r["prompt"], *multi_modal_items(r))))
                 for r in requests]
    results = agreement(llm, reference, processed, [o.outputs[0].token_ids for o in outputs], max_tokens)
    for i, a in enumerate(results):
        print(f"Reference agreement {i}: exact match {a.exact_match}, first divergence {a.first_divergence}, "
              f"top-1 {a.top1_agreement}, mean |dlogprob| {a.mean_abs_dlogprob}, max |dlogprob| {a.max_abs_dlogprob}"
              + (f", error {a.error}" if a.error else ""))
    print("***Reference Agreement***")
    print(json.dumps(overall(results), indent=4))
