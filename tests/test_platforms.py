"""Platform objects: an out-of-tree device (a stand-in for a vendor plugin such as torch_gcu) budgets the KV cache
from its own memory query, not from the host's RAM as the CPU does."""
import types

import pytest
import torch

from vllm_utils import LLM
from vllm_utils.config import EngineConfig
from vllm_utils.engine import model_runner
from vllm_utils.errors import UserError
from vllm_utils.platforms import resolve_device
from vllm_utils.platforms.cpu import CpuPlatform
from vllm_utils.platforms.interface import GiB, Platform


def stand_in_module(free: int, total: int) -> types.SimpleNamespace:
    """What a vendor's plugin registers as torch.<device>, reduced to the calls a platform makes."""
    return types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, synchronize=lambda device: None,
                                 mem_get_info=lambda device: (free, total))


def test_an_out_of_tree_device_budgets_its_own_memory():
    config = EngineConfig("unused", memory_fraction=0.9)
    platform = Platform("gcu", module=stand_in_module(free=10 * GiB, total=16 * GiB))
    reserve = 16 * GiB * 0.1 + GiB  # what the fraction leaves out, and room for activations
    assert platform.kv_cache_budget(torch.device("cpu"), config, 1) == int(10 * GiB - reserve)
    assert CpuPlatform().kv_cache_budget(torch.device("cpu"), config, 1) != int(10 * GiB - reserve)


def test_a_device_without_a_memory_query_asks_for_num_kv_blocks():
    platform = Platform("gcu", module=types.SimpleNamespace(is_available=lambda: True))
    with pytest.raises(UserError, match="--num-kv-blocks"):
        platform.kv_cache_budget(torch.device("cpu"), EngineConfig("unused"), 1)


class StandInPlatform(Platform):
    """An out-of-tree platform whose tensors live on the CPU, so the whole engine runs here."""

    def __init__(self, free: int) -> None:
        super().__init__("gcu", module=stand_in_module(free=free, total=2 * free))

    def rank_device(self, device: torch.device, rank: int) -> torch.device:
        return device


def test_the_engine_sizes_its_cache_from_the_platform_it_runs_on(tiny_llava, monkeypatch):
    from vllm_utils.engine.kv_cache import bytes_per_block

    free = 3 * GiB // 2
    monkeypatch.setattr(model_runner, "platform_for", lambda device: StandInPlatform(free))
    llm = LLM(tiny_llava, device="cpu", dtype="float32", max_model_len=256, max_num_seqs=100_000)
    runner = llm.engine.runner
    budget = StandInPlatform(free).kv_cache_budget(runner.device, llm.engine.config.engine, 0)
    per_block = bytes_per_block(runner.attention_layers, runner.block_size, runner.dtype)
    assert runner.num_blocks == budget // per_block - 1  # one block is the graphs' scratch


def test_unknown_device_kinds_are_refused_by_name():
    with pytest.raises(UserError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")


def test_the_cpu_budget_counts_the_page_cache_the_kernel_gives_back(tmp_path):
    from vllm_utils.platforms.cpu import available_ram

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         2000000 kB\nMemAvailable:   20000000 kB\n")
    assert available_ram(str(meminfo)) == 20000000 * 1024  # not MemFree: a busy page cache is not used memory
    assert available_ram(str(tmp_path / "missing")) > 0  # elsewhere: the free pages
