"""Qwen3-VL-MoE (HF `Qwen3VLMoeForConditionalGeneration`, Qwen/Qwen3-VL-30B-A3B-Instruct): Qwen3-VL (`qwen3_vl.py`:
its vision tower, interleaved multimodal RoPE, DeepStack, positions, key layout) whose decoder layers carry a
sparse Mixture of Experts (`layers/moe.py`: softmax top-k router renormalised, gated experts) in place of the
dense MLP, except the layers `mlp_only_layers` names and those off every `decoder_sparse_step`-th. Checkpoints
hold the experts fused (`experts.gate_up_proj`, `experts.down_proj`: as transformers writes them, [experts,
2 * inter, hidden] and [experts, hidden, inter], or each expert transposed, as the hub's files hold them) or one
tensor per expert (`experts.<e>.gate_proj.weight`, ...)."""
import re
from types import SimpleNamespace

from torch import nn
from transformers import PretrainedConfig
from transformers.models.qwen3_vl import Qwen3VLTextConfig

from vllm_utils.errors import UserError
from vllm_utils.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from vllm_utils.layers.moe import SparseMoeBlock
from vllm_utils.models.llama import PACKED_MODULES, LlamaAttention, LlamaDecoderLayer, LlamaMLP, make_norm
from vllm_utils.models.qwen3_vl import (InterleavedMRotaryEmbedding, Qwen3VLForConditionalGeneration,
                                        Qwen3VLTextModel, text_spec)
from vllm_utils.models.qwen3_vl_vision import Qwen3VLVisionTransformer
from vllm_utils.models.text_backbones import DecoderSpec, refuse

# the text config's fields that only the experts read (the rest is a Qwen3-VL text config); the router's aux-loss
# settings change training only
_MOE_FIELDS = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
               "mlp_only_layers", "norm_topk_prob", "router_aux_loss_coef", "output_router_logits")
# fields of other MoE decoders whose meaning this one does not implement: refused where set
_OTHER_MOE_FIELDS = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts",
                     "first_k_dense_replace", "moe_layer_freq", "topk_group", "n_group", "routed_scaling_factor",
                     "scoring_func", "topk_method")
# one expert's tensor in a checkpoint that keeps them apart
_PER_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")


def check_moe_text(text: PretrainedConfig) -> None:
    """Refuses, by name, the experts' settings transformers' Qwen3VLMoeTextModel would run differently."""
    if text.model_type != "qwen3_vl_moe_text":
        raise UserError(f"text_config.model_type '{text.model_type}' is not supported (supported: "
                        f"qwen3_vl_moe_text)")
    for field in _OTHER_MOE_FIELDS:
        if getattr(text, field, None) not in (None, 0, [], ()):
            raise refuse(field, getattr(text, field), "Qwen3-VL-MoE has no such experts' setting")
    if getattr(text, "norm_topk_prob", True) is not True:  # transformers renormalises whatever the config says
        raise refuse("norm_topk_prob", text.norm_topk_prob, "transformers' Qwen3-VL-MoE router always renormalises")
    if text.num_experts > 0:
        if not 1 <= text.num_experts_per_tok <= text.num_experts:
            raise refuse("num_experts_per_tok", text.num_experts_per_tok, f"1 to num_experts ({text.num_experts})")
        if text.decoder_sparse_step < 1:
            raise refuse("decoder_sparse_step", text.decoder_sparse_step, "a positive step")


def dense_view(text: PretrainedConfig) -> Qwen3VLTextConfig:
    """The MoE text config without its experts: a dense Qwen3-VL text config, which `qwen3_vl.text_spec`
    checks as it checks Qwen3-VL's (RoPE, activation, head sizes)."""
    check_moe_text(text)
    values = {k: v for k, v in text.to_dict().items() if k not in _MOE_FIELDS + ("model_type", "transformers_version")}
    return Qwen3VLTextConfig(**values)


def moe_text_spec(text: PretrainedConfig) -> DecoderSpec:
    return text_spec(dense_view(text))


def is_sparse(text: PretrainedConfig, layer: int) -> bool:
    """Whether decoder layer `layer` carries the experts, as transformers' Qwen3VLMoeTextDecoderLayer decides."""
    return (layer not in text.mlp_only_layers and text.num_experts > 0
            and (layer + 1) % text.decoder_sparse_step == 0)


def packed_expert_modules(num_experts: int) -> dict[str, tuple[str, object]]:
    """Our names of one expert's checkpoint tensors (`checkpoint_key` writes them) -> the fused weight and shard."""
    packed: dict[str, tuple[str, object]] = {}
    for e in range(num_experts):
        packed.update({f"expert{e}_gate": ("w13", (e, 0)), f"expert{e}_up": ("w13", (e, 1)),
                       f"expert{e}_down": ("w2", e)})
    return packed


class Qwen3VLMoeDecoderLayer(LlamaDecoderLayer):
    """Qwen3's decoder layer whose MLP is the experts where `sparse` (its forward is Llama's)."""

    def __init__(self, config: PretrainedConfig, spec: DecoderSpec, rotary: InterleavedMRotaryEmbedding,
                 sparse: bool) -> None:
        nn.Module.__init__(self)
        self.input_layernorm = make_norm(config, spec)
        self.self_attn = LlamaAttention(config, spec, rotary, None)
        self.post_attention_layernorm = make_norm(config, spec)
        self.mlp = (SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                                   config.moe_intermediate_size, spec.hidden_act, renormalize=True)
                    if sparse else LlamaMLP(config, spec))


class Qwen3VLMoeTextModel(Qwen3VLTextModel):
    """Qwen3-VL's decoder (its forward: DeepStack after the first layers) on layers with experts."""

    def __init__(self, config: PretrainedConfig) -> None:
        nn.Module.__init__(self)
        spec = moe_text_spec(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary = InterleavedMRotaryEmbedding(spec.head_dim, config.max_position_embeddings, spec.rope,
                                             list(spec.mrope_sections))
        self.layers = nn.ModuleList(Qwen3VLMoeDecoderLayer(config, spec, rotary, is_sparse(config, i))
                                    for i in range(config.num_hidden_layers))
        self.norm = make_norm(config, spec)


def expert_key(key: str) -> str:
    """A checkpoint key with the experts' fused tensors renamed to our `w13`/`w2`, and one expert's to the name of
    its shard in `packed_expert_modules`; other keys unchanged."""
    fused = _FUSED.search(key)
    if fused:
        ours = "w13" if fused.group(1) == "gate_up_proj" else "w2"
        return key[:fused.start()] + f".mlp.experts.{ours}.weight"
    one = _PER_EXPERT.search(key)
    if one:
        return key[:one.start()] + f".mlp.experts.expert{one.group(1)}_{one.group(2)}.weight"
    return key


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    @staticmethod
    def check_config(config: PretrainedConfig) -> None:
        """Qwen3-VL's checks on the config seen without its experts, after the experts' own."""
        Qwen3VLForConditionalGeneration.check_config(SimpleNamespace(
            quantization_config=getattr(config, "quantization_config", None), vision_config=config.vision_config,
            text_config=dense_view(config.text_config)))

    @classmethod
    def tensor_parallel_widths(cls, config: PretrainedConfig) -> dict[str, int]:
        return {**super().tensor_parallel_widths(config),
                "the experts' intermediate width": config.text_config.moe_intermediate_size}

    def __init__(self, config: PretrainedConfig) -> None:
        nn.Module.__init__(self)
        self.check_config(config)
        text = config.text_config
        self.packed_modules = {**PACKED_MODULES, **packed_expert_modules(text.num_experts)}
        self.mm_token_ids = (config.image_token_id, config.video_token_id)
        self.merge = config.vision_config.spatial_merge_size
        self.hidden = text.hidden_size
        self.max_positions = text.max_position_embeddings
        self.visual = Qwen3VLVisionTransformer(config.vision_config)
        self.language_model = Qwen3VLMoeTextModel(text)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.language_model.embed_tokens.weight

    def checkpoint_key(self, key: str) -> str | None:
        """Qwen3-VL's key layout; the experts' fused tensors to our `w13`/`w2`, one expert's to the name of its
        shard in `packed_modules`."""
        key = super().checkpoint_key(key)
        return None if key is None else expert_key(key)
