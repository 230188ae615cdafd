"""Tensor-parallel settings a user can get wrong (the TP=2 equality test is in test_matches_hf.py)."""
import pytest
import torch

from vllm_utils.config import load_hf_config
from vllm_utils.engine.tensor_parallel import check_tp_size
from vllm_utils.errors import UserError


def test_more_ranks_than_gpus_is_a_clear_error(tiny_llava, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="needs 2 GPUs but 1 are visible"):
        check_tp_size(load_hf_config(tiny_llava), 2, torch.device("cuda"))


def test_size_must_divide_heads(tiny_llava):
    with pytest.raises(UserError, match=r"does not divide the attention heads \(4\)"):
        check_tp_size(load_hf_config(tiny_llava), 8, torch.device("cpu"))
    check_tp_size(load_hf_config(tiny_llava), 2, torch.device("cpu"))  # 4 heads, 2 kv heads: fine
