"""NVIDIA GPUs: NCCL, CUDA graphs, pinned host staging, and Triton kernels where Triton is installed."""
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from vllm_utils.attention.backend import AttentionBackend
from vllm_utils.config import EngineConfig
from vllm_utils.errors import UserError
from vllm_utils.layers.activation import ActAndMul
from vllm_utils.layers.linear import LinearOp
from vllm_utils.layers.delta_rule import GatedDeltaRule
from vllm_utils.layers.moe import FusedMoE
from vllm_utils.layers.norm import RMSNorm
from vllm_utils.layers.op import Op
from vllm_utils.platforms.interface import Platform


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


class CudaPlatform(Platform):
    dist_backend = "nccl"
    supports_graphs = True
    attention_backends = ("torch", "triton")

    def __init__(self) -> None:
        super().__init__("cuda", torch.cuda)

    def host_staging(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory()  # a copy from pageable memory makes the host wait for the GPU's queue first

    def attention_backend(self, name: str) -> AttentionBackend:
        super().attention_backend(name)
        if name == "torch" or (name == "auto" and not has_triton()):
            return super().attention_backend("torch")
        if not has_triton():
            raise UserError("attention backend 'triton' needs the triton package; install it or use 'torch'")
        from vllm_utils.attention.triton_backend import TritonPagedAttention

        return TritonPagedAttention()

    def choose_kernels(self, model: nn.Module, config: EngineConfig, prompt_only: list[tuple[nn.Module, int]]) -> None:
        """Triton's fused add+RMSNorm and SiLU·up for 2-D inputs, and with `config.triton_gemv` a Triton GEMV for
        single-row products; a MoE layer's experts and the gated delta rule on Triton for decode steps; nothing without
        Triton."""
        if not has_triton():
            return
        from vllm_utils.kernels import triton_delta_rule, triton_fused, triton_gemv, triton_moe

        for module in model.modules():
            if not isinstance(module, Op):
                continue
            native = module.forward_native
            if isinstance(module, RMSNorm):
                module.impl = (lambda x, residual=None, m=module, native=native:
                               triton_fused.add_rmsnorm(x, m.weight, m.eps, residual) if x.dim() == 2
                               else native(x, residual))
            elif isinstance(module, ActAndMul) and module.name == "silu":
                module.impl = lambda x, native=native: triton_fused.silu_and_mul(x) if x.dim() == 2 else native(x)
            elif isinstance(module, LinearOp) and config.triton_gemv:
                module.impl = (lambda x, bias, w=module.weight:
                               triton_gemv.gemv(x, w, bias) if triton_gemv.supports(x, w) else F.linear(x, w, bias))
            elif isinstance(module, FusedMoE):  # the experts of the few rows of a decode step
                module.impl = (lambda x, weights, ids, m=module, native=native:
                               triton_moe.fused_moe(x, m.w13.weight, m.w2.weight, weights, ids)
                               if triton_moe.supports(x, ids, m.w13.weight, m.w2.weight, m.act)
                               else native(x, weights, ids))
            elif isinstance(module, GatedDeltaRule):  # decode steps: each state read and written once
                module.impl = (lambda q, k, v, g, beta, states, slots, seq_lens, native=native:
                               triton_delta_rule.recurrent_step_(q, k, v, g, beta, states, slots)
                               if seq_lens is None and triton_delta_rule.supports(q, k, v, states)
                               else native(q, k, v, g, beta, states, slots, seq_lens))
