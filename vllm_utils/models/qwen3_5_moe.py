"""Qwen3.5-MoE (HF `Qwen3_5MoeForConditionalGeneration`, e.g. Qwen/Qwen3.5-35B-A3B): Qwen3.5 (`qwen3_5.py`: the
vision tower, Gated DeltaNet and gated full-attention layers, positions, key layout) whose every decoder layer's
MLP is Qwen3-Next's sparse block: a softmax top-k router renormalised, gated experts (`layers/moe.py`), plus a dense
shared expert whose output is scaled per token by sigmoid(`shared_expert_gate`(x)). The experts come fused
(`experts.gate_up_proj` [experts, 2 * inter, hidden], `experts.down_proj` [experts, hidden, inter], as transformers
writes them, or each expert transposed) or one tensor per expert (`experts.<e>.gate_proj.weight`, ...)."""
from types import SimpleNamespace

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.qwen3_5 import Qwen3_5TextConfig

from vllm_utils.distributed import all_reduce
from vllm_utils.errors import UserError
from vllm_utils.layers.linear import LinearBase
from vllm_utils.layers.moe import SparseMoeBlock, route
from vllm_utils.models.llama import PACKED_MODULES, LlamaMLP
from vllm_utils.models.qwen3_5 import (Qwen3_5DecoderLayer, Qwen3_5ForConditionalGeneration, Qwen3_5TextModel,
                                       text_spec)
from vllm_utils.models.qwen3_vl_moe import expert_key, packed_expert_modules
from vllm_utils.models.text_backbones import DecoderSpec, refuse

# the text config's fields that only the experts read (the rest is a Qwen3.5 text config); the router's aux-loss
# settings change training only
_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
               "mlp_only_layers", "router_aux_loss_coef", "output_router_logits")
# fields of other MoE decoders (Qwen3-Next's, DeepSeek's) that transformers' Qwen3.5-MoE does not read: refused
# where set to anything but what it does regardless
_OTHER_MOE_FIELDS = ("n_shared_experts", "num_shared_experts", "first_k_dense_replace", "moe_layer_freq",
                     "topk_group", "n_group", "routed_scaling_factor", "scoring_func", "topk_method")


def check_moe_text(text: PretrainedConfig) -> None:
    """Refuses, by name, the experts' settings transformers' Qwen3_5MoeTextModel would run differently."""
    if text.model_type != "qwen3_5_moe_text":
        raise UserError(f"text_config.model_type '{text.model_type}' is not supported (supported: "
                        f"qwen3_5_moe_text)")
    for field in _OTHER_MOE_FIELDS:
        if getattr(text, field, None) not in (None, 0, [], ()):
            raise refuse(field, getattr(text, field), "Qwen3.5-MoE has no such experts' setting")
    if getattr(text, "mlp_only_layers", None):  # the hub's files write []
        raise refuse("mlp_only_layers", text.mlp_only_layers, "transformers' Qwen3.5-MoE puts experts in every layer")
    if getattr(text, "decoder_sparse_step", 1) != 1:
        raise refuse("decoder_sparse_step", text.decoder_sparse_step,
                     "transformers' Qwen3.5-MoE puts experts in every layer")
    if getattr(text, "norm_topk_prob", True) is not True:
        raise refuse("norm_topk_prob", text.norm_topk_prob, "transformers' Qwen3.5-MoE router always renormalises")
    if getattr(text, "attn_output_gate", True) is not True:
        raise refuse("attn_output_gate", text.attn_output_gate, "transformers' Qwen3.5 always gates the attention")
    if text.num_experts < 1:
        raise refuse("num_experts", text.num_experts, "at least one expert")
    if not 1 <= text.num_experts_per_tok <= text.num_experts:
        raise refuse("num_experts_per_tok", text.num_experts_per_tok, f"1 to num_experts ({text.num_experts})")
    for field in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(text, field) < 1:
            raise refuse(field, getattr(text, field), "a positive width")


def dense_view(text: PretrainedConfig) -> Qwen3_5TextConfig:
    """The MoE text config without its experts: a Qwen3.5 text config, which `qwen3_5.text_spec` checks as it
    checks Qwen3.5's (layer types, RoPE, activation, heads)."""
    check_moe_text(text)
    values = {k: v for k, v in text.to_dict().items() if k not in _MOE_FIELDS + ("model_type", "transformers_version")}
    return Qwen3_5TextConfig(**values)


def moe_text_spec(text: PretrainedConfig) -> tuple[DecoderSpec, int]:
    return text_spec(dense_view(text))


class SharedExpertMoeBlock(SparseMoeBlock):
    """Qwen3-Next's sparse block: the routed experts plus a shared expert (a dense gated MLP, split across ranks
    as any) scaled by sigmoid(shared_expert_gate(x)) per token (the gate replicated on every rank). The two
    partial outputs are summed before one all-reduce."""

    def __init__(self, config: PretrainedConfig, spec: DecoderSpec) -> None:
        super().__init__(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                         config.moe_intermediate_size, spec.hidden_act, renormalize=True)
        self.shared_expert = LlamaMLP(SimpleNamespace(hidden_size=config.hidden_size,
                                                      intermediate_size=config.shared_expert_intermediate_size), spec)
        self.shared_expert_gate = LinearBase(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.shared_expert
        shared = mlp.down_proj.run(mlp.act(mlp.gate_up_proj(x)), None)  # this rank's partial: no bias, no reduction
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        routed = self.experts.run(x, weights, ids)
        return all_reduce(routed + torch.sigmoid(self.shared_expert_gate(x)) * shared)


class Qwen3_5MoeDecoderLayer(Qwen3_5DecoderLayer):
    """Qwen3.5's decoder layer with the sparse block as its MLP."""

    @staticmethod
    def make_mlp(config: PretrainedConfig, spec: DecoderSpec) -> nn.Module:
        return SharedExpertMoeBlock(config, spec)


class Qwen3_5MoeTextModel(Qwen3_5TextModel):
    """Qwen3.5's decoder on layers with experts."""

    layer_class = Qwen3_5MoeDecoderLayer
    config_spec = staticmethod(moe_text_spec)


class Qwen3_5MoeForConditionalGeneration(Qwen3_5ForConditionalGeneration):
    text_model = Qwen3_5MoeTextModel

    @staticmethod
    def check_text_config(text: PretrainedConfig) -> None:
        moe_text_spec(text)

    @classmethod
    def tensor_parallel_widths(cls, config: PretrainedConfig) -> dict[str, int]:
        text = config.text_config
        widths = super().tensor_parallel_widths(SimpleNamespace(vision_config=config.vision_config,
                                                                text_config=dense_view(text)))
        del widths["the MLP width"]  # no dense MLP: the experts' and the shared expert's widths instead
        return {**widths, "the experts' intermediate width": text.moe_intermediate_size,
                "the shared expert's width": text.shared_expert_intermediate_size}

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.packed_modules = {**PACKED_MODULES, **packed_expert_modules(config.text_config.num_experts)}

    def checkpoint_key(self, key: str) -> str | None:
        """Qwen3.5's key layout (`mtp.*` unused); the experts' fused tensors to our `w13`/`w2`, one expert's to
        the name of its shard in `packed_modules`."""
        key = super().checkpoint_key(key)
        return None if key is None else expert_key(key)
