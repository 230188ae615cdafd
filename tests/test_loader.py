"""The loader against the real LLaVA-1.5-7B key layout, and its errors."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_utils import LLM
from vllm_utils.config import load_hf_config
from vllm_utils.engine.model_runner import build_model
from vllm_utils.errors import UserError
from vllm_utils.loader import expected_targets, resolve_target
from vllm_utils.models.llava import LlavaForConditionalGeneration

from conftest import REAL_LLAVA, needs_shared


@needs_shared
def test_every_real_checkpoint_key_is_loaded_or_deliberately_skipped():
    config = load_hf_config(str(REAL_LLAVA))
    model = build_model(config, LlavaForConditionalGeneration, torch.device("meta"), torch.float16)
    params = dict(model.named_parameters())
    keys = json.loads((REAL_LLAVA / "model.safetensors.index.json").read_text())["weight_map"]
    targets, skipped = set(), []
    for key in keys:
        target = resolve_target(model, key)
        if target is None:
            skipped.append(key)
            continue
        assert target[0] in params, f"{key} -> {target[0]} is no parameter"
        targets.add(target)
    assert targets == expected_targets(model)  # nothing the model needs is missing from the checkpoint
    # what is skipped: vision layer 23 (after feature layer -2) and post_layernorm
    assert all(".encoder.layers.23." in k or "post_layernorm" in k for k in skipped)
    assert len(skipped) == 16 + 2
    assert model.num_image_features == 576


@needs_shared
def test_real_config_builds_7b_shapes_on_meta():
    config = load_hf_config(str(REAL_LLAVA))
    model = build_model(config, LlavaForConditionalGeneration, torch.device("meta"), torch.float16)
    total = sum(p.numel() for p in model.parameters())
    index = json.loads((REAL_LLAVA / "model.safetensors.index.json").read_text())
    # fp16 checkpoint bytes / 2 = parameters; ours lacks the skipped vision layer and post_layernorm
    skipped = 12_596_224 + 2 * 1024
    assert total == index["metadata"]["total_size"] // 2 - skipped


def test_missing_tensor_is_an_error_naming_it(tiny_llava, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_llava, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["language_model.model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"language_model\.layers\.1\.mlp\.down_proj\.weight"):
        LLM(str(folder), device="cpu", dtype="float32")


@pytest.mark.parametrize("head", ["another", "the same"])
def test_a_checkpoint_holding_its_own_lm_head_is_untied_as_hf_unties_it(tmp_path, images, head):
    """The config ties the LM head to the embeddings (DeepSeek-VL's, absent: transformers' default), but the
    checkpoint holds a different lm_head: transformers loads it apart, and so must we; an equal one stays shared."""
    from vllm_utils import SamplingParams
    from vllm_utils.hf_reference import HFReference
    from vllm_utils.testing.tiny_deepseek_vl import build_tiny_deepseek_vl

    folder = build_tiny_deepseek_vl(str(tmp_path / "model"), seed=6)
    path = f"{folder}/model.safetensors"
    tensors = load_file(path)
    assert "lm_head.weight" not in tensors  # tied: transformers saves the embeddings alone
    embeddings = tensors["model.language_model.embed_tokens.weight"]
    own = embeddings.flip(0) if head == "another" else embeddings.clone()
    tensors["lm_head.weight"] = own.contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=512)
    model = llm.engine.runner.model
    shared = model.lm_head.weight.data_ptr() == model.language_model.embed_tokens.weight.data_ptr()
    assert shared == (head == "the same") and torch.equal(model.lm_head.weight, own)
    req = {"prompt": llm.engine.processor.chat_prompt("describe the picture", 1), "multi_modal_data": {"image": [images[0]]}}
    ours = llm.generate(req, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert ours.outputs[0].token_ids == HFReference(folder).greedy(req, 12, ignore_eos=True)
