"""Automatic prefix caching: a second question on the same image starts after the cached blocks of the first (its
image encoded no more), the same tokens with another picture miss from that picture on, and every output equals
HF's and a run without the cache: under chunked prefill, preemption and eviction, with multimodal RoPE and with an
image attending to itself both ways."""
import pytest
from PIL import Image

from vllm_utils import LLM, SamplingParams
from vllm_utils.engine.block_manager import BlockManager
from vllm_utils.engine.prefix_cache import PrefixCache
from vllm_utils.engine.sequence import Sequence
from vllm_utils.errors import UserError

from conftest import HFReference
from test_matches_hf import request

TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
# a shared lead after the image: the block that holds the image's end holds no question yet
LEAD = "Look closely at every part of this picture, its colours, shapes and any writing, before you answer. "
BARE = ["Describe the picture.", "What is the colour of the largest object in this picture?",
        "Is there any writing anywhere in the image? Answer yes or no."]
QUESTIONS = [LEAD + q for q in BARE]


def engine(folder: str, **kwargs) -> LLM:
    return LLM(folder, device="cpu", dtype="float32", max_model_len=kwargs.pop("max_model_len", 512), **kwargs)


def count_encodes(llm: LLM) -> list[int]:
    """How many pictures each encoder call took (the vision tower's work)."""
    calls, encode = [], llm.engine.runner.model.encode_mm

    def counting(mm_inputs):
        calls.append(len(mm_inputs["pixel_values"]))
        return encode(mm_inputs)

    llm.engine.runner.model.encode_mm = counting
    return calls


def first_mm_position(llm: LLM, output) -> int:
    mm = set(llm.engine.runner.model.mm_token_ids)
    return next(p for p, t in enumerate(output.prompt_token_ids) if t in mm)


def last_mm_position(llm: LLM, output) -> int:
    mm = set(llm.engine.runner.model.mm_token_ids)
    return max(p for p, t in enumerate(output.prompt_token_ids) if t in mm)


def test_a_second_question_on_the_same_image_reuses_its_blocks(tiny_llava, hf_reference, images):
    llm = engine(tiny_llava)
    encodes = count_encodes(llm)
    reqs = [request(llm, q, images[:1]) for q in QUESTIONS]
    first = llm.generate(reqs[:1], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and encodes == [1]
    later = llm.generate(reqs[1:], GREEDY, use_tqdm=False)
    for req, out in zip(reqs, [first] + later):
        assert out.outputs[0].token_ids == hf_reference.greedy(req, TOKENS, ignore_eos=True)
    for out in later:  # the cached prefix holds the whole image: no encoder call, only the new question computed
        assert out.num_cached_tokens > last_mm_position(llm, out)
        assert out.num_cached_tokens % llm.engine.block_manager.block_size == 0
    assert encodes == [1]
    stats = llm.engine.stats
    assert stats.prefix_cache_hits == sum(o.num_cached_tokens for o in later)
    assert 0 < stats.prefix_cache_hit_rate < 1
    assert llm.reset_prefix_cache()  # forgotten: the next ask computes its whole prompt
    assert llm.generate(reqs[1:2], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0 and encodes == [1, 1]


def test_questions_in_one_batch_share_the_blocks_the_first_computes_in_the_same_step(tiny_llava, hf_reference, images):
    llm = engine(tiny_llava)
    encodes = count_encodes(llm)
    reqs = [request(llm, q, images[:1]) for q in QUESTIONS] + [request(llm, QUESTIONS[0], images[1:])]
    outs = llm.generate(reqs, GREEDY, use_tqdm=False)
    assert outs[0].num_cached_tokens == 0 and all(o.num_cached_tokens > last_mm_position(llm, o) for o in outs[1:3])
    assert outs[3].num_cached_tokens <= first_mm_position(llm, outs[3])  # another picture
    assert encodes == [2]  # one step, the two pictures once each
    for req, out in zip(reqs, outs):
        assert out.outputs[0].token_ids == hf_reference.greedy(req, TOKENS, ignore_eos=True)
    llm.engine.reset_stats()  # n outputs of a new prompt: the second and third start after the first's blocks
    fresh = request(llm, BARE[2], images[1:])
    out = llm.generate([fresh], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=4), use_tqdm=False)[0]
    block = llm.engine.block_manager.block_size
    shared = (len(out.prompt_token_ids) - 1) // block * block
    assert llm.engine.stats.prefix_cache_hits == out.num_cached_tokens + 2 * shared > 2 * out.num_cached_tokens


def inside_the_picture(llm: LLM, reqs: list[dict]) -> tuple[int, int, int, int]:
    """(block size, the picture's first position, the position after it, the first two prompts' shared blocks' end):
    a block size with which those shared blocks end inside the picture (its end shares a block with the first token
    where the two questions differ)."""
    processor = llm.engine.processor
    ids = [processor.process(r["prompt"], r["multi_modal_data"]["image"])[0] for r in reqs[:2]]
    mm = set(llm.engine.runner.model.mm_token_ids)
    start = next(p for p, t in enumerate(ids[0]) if t in mm)
    end = max(p for p, t in enumerate(ids[0]) if t in mm) + 1
    differ = next(p for p, (a, b) in enumerate(zip(*ids)) if a != b)
    block = next(b for b in (4, 8, 16, 32, 64) if start < differ // b * b < end)
    return block, start, end, differ // block * block


def test_a_cached_prefix_ending_inside_the_picture_takes_its_embeddings_from_the_encoder_cache(tiny_llava, hf_reference,
                                                                                               images):
    """As `--acc` asks: the picture's last positions share a block with each question. The later questions start
    inside the picture and take the rest of its embeddings from the encoder cache: one encoder call in all."""
    first = engine(tiny_llava)
    reqs = [request(first, q, images[:1]) for q in BARE]
    llm = engine(tiny_llava, block_size=inside_the_picture(first, reqs)[0])
    encodes = count_encodes(llm)
    outs = [llm.generate([r], GREEDY, use_tqdm=False)[0] for r in reqs]
    for out in outs[1:]:
        assert first_mm_position(llm, out) < out.num_cached_tokens <= last_mm_position(llm, out)
    assert encodes == [1]
    for req, out in zip(reqs, outs):
        assert out.outputs[0].token_ids == hf_reference.greedy(req, TOKENS, ignore_eos=True)
    assert llm.reset_prefix_cache()  # forgotten with the blocks: in one batch, the picture is encoded once
    batch = llm.generate(reqs, GREEDY, use_tqdm=False)
    assert encodes == [1, 1] and [o.outputs[0].token_ids for o in batch] == [o.outputs[0].token_ids for o in outs]
    assert all(o.num_cached_tokens > first_mm_position(llm, o) for o in batch[1:])


def test_the_encoder_cache_keeps_its_budget_and_the_newest_entry():
    from vllm_utils.engine.encoder_cache import EncoderCache
    import torch

    cache = EncoderCache(budget_rows=10)
    cache.put(b"a", torch.zeros(4, 2))
    cache.put(b"b", torch.zeros(4, 2))
    cache.get(b"a")  # used: "b" is now the oldest
    cache.put(b"c", torch.zeros(4, 2))
    assert list(cache.entries) == [b"a", b"c"] and cache.rows == 8
    cache.put(b"d", torch.zeros(12, 2))  # larger than the budget: kept alone
    assert list(cache.entries) == [b"d"] and cache.rows == 12


def test_tensor_parallel_ranks_take_the_same_embeddings_from_their_encoder_caches(tiny_llava, images):
    first = engine(tiny_llava)
    reqs = [request(first, q, images[:1]) for q in BARE[:2]]
    block = inside_the_picture(first, reqs)[0]
    single = [engine(tiny_llava, block_size=block, enable_prefix_caching=False).generate([r], GREEDY, use_tqdm=False)
              [0].outputs[0].token_ids for r in reqs]
    parallel = engine(tiny_llava, block_size=block, tensor_parallel_size=2)
    try:
        encodes = count_encodes(parallel)
        outs = [parallel.generate([r], GREEDY, use_tqdm=False)[0] for r in reqs]
    finally:
        parallel.engine.shutdown()
    assert outs[1].num_cached_tokens > first_mm_position(parallel, outs[1]) and encodes == [1]
    assert [o.outputs[0].token_ids for o in outs] == single


def test_a_chats_next_turn_starts_after_the_blocks_of_its_history(tiny_llava):
    """The next prompt of a chat holds the last one and its reply: it starts after every full block they filled,
    the reply's included."""
    llm = engine(tiny_llava)
    reply = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)  # more than a block
    first = llm.generate([LEAD * 2 + BARE[0]], reply, use_tqdm=False)[0]
    history = first.prompt_token_ids + first.outputs[0].token_ids
    follow_up = llm.get_tokenizer()(" And what else?", add_special_tokens=False)["input_ids"]
    req = {"prompt_token_ids": history + follow_up}
    out = llm.generate([req], GREEDY, use_tqdm=False)[0]
    block = llm.engine.block_manager.block_size
    computed = len(history) - 1  # the reply's last token was never fed back
    assert out.num_cached_tokens == computed // block * block > len(first.prompt_token_ids) // block * block
    assert out.outputs[0].token_ids == engine(tiny_llava, enable_prefix_caching=False).generate(
        [req], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_the_same_tokens_with_another_picture_miss_from_the_picture_on(tiny_llava, hf_reference, images):
    llm = engine(tiny_llava)
    system = "You are a careful assistant who describes pictures truthfully, briefly and in plain words. "

    def ask(image: Image.Image) -> dict:
        return {"prompt": system + llm.engine.processor.chat_prompt(QUESTIONS[0], 1), "multi_modal_data": {"image": [image]}}

    ours = llm.generate([ask(images[0])], GREEDY, use_tqdm=False)
    req = ask(images[1].resize(images[0].size))  # the same placeholder tokens, other pixels
    out = llm.generate([req], GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == ours[0].prompt_token_ids
    assert 0 < out.num_cached_tokens <= first_mm_position(llm, out)  # the text before the picture is shared
    assert out.outputs[0].token_ids == hf_reference.greedy(req, TOKENS, ignore_eos=True)
    assert out.outputs[0].token_ids != ours[0].outputs[0].token_ids  # the picture changes the answer


def test_ready_token_ids_and_tensors_are_keyed_by_their_tensors(tiny_llava, images):
    """Without the raw pictures (prompt_token_ids + mm_inputs), the items' tensors are what is hashed."""
    llm = engine(tiny_llava)
    adapter = llm.engine.processor
    prompt = adapter.chat_prompt(QUESTIONS[0], 1)
    ids, mm_inputs = adapter.process(prompt, images[:1])
    other_ids, other_inputs = adapter.process(prompt, [images[1].resize(images[0].size)])
    assert ids == other_ids
    ready = [{"prompt_token_ids": ids, "mm_inputs": mm_inputs}, {"prompt_token_ids": ids, "mm_inputs": other_inputs},
             {"prompt_token_ids": ids, "mm_inputs": {k: v.clone() for k, v in mm_inputs.items()}}]
    outs = [llm.generate([r], GREEDY, use_tqdm=False)[0] for r in ready]
    start = first_mm_position(llm, outs[0])
    assert outs[1].num_cached_tokens <= start < outs[2].num_cached_tokens
    assert outs[2].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_chunks_preemption_and_eviction_give_the_tokens_without_the_cache(tiny_llava, hf_reference, images):
    """A cache too small for every request at once: prompts are cut into chunks, running requests preempted, cached
    blocks evicted; the tokens stay HF's, and every block comes back."""
    kwargs = dict(block_size=4, num_kv_blocks=64, max_num_seqs=4, max_model_len=192, max_num_batched_tokens=40)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    llm = engine(tiny_llava, **kwargs)
    reqs = [request(llm, q, [images[i % 2]]) for i, q in enumerate(QUESTIONS * 2)]
    outputs = llm.generate(reqs, params, use_tqdm=False)
    engine_ = llm.engine
    assert engine_.scheduler.num_preemptions > 0 and engine_.stats.prefix_cache_hits > 0
    assert engine_.block_manager.num_free == 64 and not engine_.runner.mm_cache
    again = llm.generate(reqs, params, use_tqdm=False)  # now mostly from the cache, evicting as it goes
    assert sum(o.num_cached_tokens for o in again) > sum(o.num_cached_tokens for o in outputs)
    assert engine_.block_manager.num_free == 64
    for req, out, out2 in zip(reqs, outputs, again):
        expected = hf_reference.greedy(req, 30, ignore_eos=True)
        assert out.outputs[0].token_ids == expected and out2.outputs[0].token_ids == expected


def test_prompt_logprobs_are_computed_whole_after_a_cached_prefix(tiny_llava, images):
    llm = engine(tiny_llava)
    req = request(llm, QUESTIONS[0], images[:1])
    llm.generate([req], GREEDY, use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    out = llm.generate([req], params, use_tqdm=False)[0]
    fresh = engine(llm.engine.config.folder, enable_prefix_caching=False).generate([req], params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for ours, theirs in zip(out.prompt_logprobs[1:], fresh.prompt_logprobs[1:]):
        assert ours.keys() == theirs.keys()
        assert all(abs(ours[t].logprob - theirs[t].logprob) < 1e-5 for t in ours)


def test_turned_off_nothing_is_shared(tiny_llava, images):
    llm = engine(tiny_llava, enable_prefix_caching=False)
    reqs = [request(llm, q, images[:1]) for q in QUESTIONS[:2]]
    outs = [llm.generate([r], GREEDY, use_tqdm=False)[0] for r in reqs]
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    assert llm.engine.block_manager.cache is None and llm.engine.stats.prefix_cache_queries == 0


def test_multimodal_rope_positions_after_a_cached_prefix(tiny_qwen, images):
    """Qwen2-VL: the rows of a prompt's positions come from its whole prompt, also when it starts after a cached
    prefix."""
    reference = HFReference(tiny_qwen)
    llm = engine(tiny_qwen, max_model_len=1024)
    reqs = [request(llm, q, images[:1]) for q in QUESTIONS[:2]]
    outs = [llm.generate([r], GREEDY, use_tqdm=False)[0] for r in reqs]
    assert outs[1].num_cached_tokens > last_mm_position(llm, outs[1])
    for req, out in zip(reqs, outs):
        assert out.outputs[0].token_ids == reference.greedy(req, TOKENS, ignore_eos=True)


def test_a_cached_prefix_may_end_inside_an_image_that_attends_both_ways(tmp_path, images):
    """Gemma 3: an image's positions see each other both ways. With a block that holds the image's end and the first
    token where two questions differ, the second prompt's cached blocks end inside its image: their keys and values
    were computed with the image whole, and the rest of the image is computed seeing them."""
    from vllm_utils.testing.tiny_gemma3 import VARIED_SEED, build_tiny_gemma3

    folder = build_tiny_gemma3(str(tmp_path / "gemma3"), seed=VARIED_SEED)
    first = engine(folder, max_model_len=1024, num_kv_blocks=64)
    reqs = [request(first, q, images[:1]) for q in BARE[:2]]
    block, start, end, shared = inside_the_picture(first, reqs)
    llm = engine(folder, max_model_len=1024, block_size=block)
    outs = [llm.generate([r], GREEDY, use_tqdm=False)[0] for r in reqs]
    assert start < outs[1].num_cached_tokens == shared < end
    reference = HFReference(folder)
    for req, out in zip(reqs, outs):
        assert out.outputs[0].token_ids == reference.greedy(req, TOKENS, ignore_eos=True)


def test_models_with_a_recurrent_state_leave_it_off(tmp_path):
    from vllm_utils.testing.tiny_qwen3_5 import build_tiny_qwen3_5

    folder = build_tiny_qwen3_5(str(tmp_path / "qwen3_5"))
    assert engine(folder).engine.block_manager.cache is None
    with pytest.raises(UserError, match="prefix caching is not supported for models with linear-attention layers"):
        engine(folder, enable_prefix_caching=True)
    from test_cli import cli, error_lines

    run = cli("--demo", f"--model={folder}", "--device=cpu", "--enable-prefix-caching", "--output-len=2")
    assert run.returncode != 0 and len(error_lines(run)) == 1 and "Traceback" not in run.stderr
    assert "linear-attention" in error_lines(run)[0] and "Loading" not in run.stderr  # before the weights


def test_cached_blocks_are_shared_counted_and_evicted_oldest_first():
    cache = PrefixCache(num_blocks=8, block_size=4, mm_token_ids=[])
    blocks = BlockManager(8, 4, prefix_cache=cache)
    params = SamplingParams(max_tokens=1)
    a = Sequence(list(range(13)), params)  # 3 full blocks and one token
    blocks.allocate(a, blocks.cached_prefix(a, len(a) - 1))
    blocks.cache_computed(a, 13)
    b = Sequence(list(range(12)) + [99, 98], params)
    hits = blocks.cached_prefix(b, len(b) - 1)
    assert hits == a.block_table[:3]
    blocks.allocate(b, hits)
    assert b.num_computed == 12 and list(blocks.ref_counts[hits]) == [2, 2, 2]
    blocks.free(a)
    blocks.free(b)
    assert blocks.num_free == 8 and list(cache.evictable) == hits[::-1]  # a sequence's last blocks go first
    c = Sequence(list(range(100, 128)), params)  # seven new blocks: the five uncached and the two oldest cached
    blocks.allocate(c, blocks.cached_prefix(c, len(c) - 1))
    assert list(cache.evictable) == hits[:1] and blocks.num_free == 1
    d = Sequence(list(range(5)), params)
    assert blocks.cached_prefix(d, len(d) - 1) == hits[:1]


def test_acc_with_several_questions_per_image_gives_the_outputs_without_the_cache(tiny_llava, tmp_path):
    """--acc: the second question on each picture finds the first's blocks; every reply is the one without the
    cache, and the settings and figures say which ran."""
    import json
    import os
    import shutil

    from vllm_utils.modes.acc.bundled import ACC_SAMPLES

    from test_cli import cli

    images = os.path.join(os.path.dirname(ACC_SAMPLES["sample-jsonl"]), "images")
    shutil.copytree(images, tmp_path / "images")
    rows = [{"id": f"{name}-{i}", "image": f"images/{name}.png", "question": LEAD + q, "answer": "a"}
            for name in ("red_circle", "blue_square") for i, q in enumerate(BARE)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for flag in ("--enable-prefix-caching", "--no-enable-prefix-caching"):
        out = tmp_path / flag.strip("-")
        out.mkdir()
        run = cli("--acc", f"--model={tiny_llava}", "--device=cpu", "--dtype=float32", f"--dataset={tmp_path / 'd.jsonl'}",
                  "--output-len=8", "--batch-size=4", flag, f"--save-output={out / 'o.jsonl'}",
                  f"--output-json={out / 'acc.json'}", cwd=str(out))
        assert run.returncode == 0, run.stderr
        runs[flag] = ([json.loads(line)["answer"] for line in (out / "o.jsonl").read_text().splitlines()],
                      json.loads((out / "acc.json").read_text()))
    (with_cache, document), (without, plain) = runs.values()
    assert with_cache == without and len(set(with_cache)) > 1
    assert 0 < document["acc_info"]["prefix_cache_hit_rate"] < 1  # two of each picture's three questions hit
    assert "prefix_cache_hit_rate" not in plain["acc_info"]
    assert document["settings"]["enable_prefix_caching"] is True and plain["settings"]["enable_prefix_caching"] is False


def test_synthetic_perf_requests_share_no_block(tiny_llava):
    """--perf's requests of one run start differently (a token of their own after BOS), so none is a cache hit, and
    each request's picture is encoded for it although all carry the same one: whole-prompt figures."""
    from vllm_utils.modes.synthetic import synthetic_requests

    llm = engine(tiny_llava)
    encodes = count_encodes(llm)
    processor = llm.engine.processor
    count = min(2000, len(processor.text_token_ids()))  # drawn freely, some of 2000 leads would repeat
    requests = synthetic_requests(processor, 40, count, None, seed=3)
    assert len({tuple(r.prompt_token_ids[:2]) for r in requests}) == count
    outs = llm.generate([r.as_prompt() for r in requests[:64]], SamplingParams(max_tokens=1), use_tqdm=False)
    assert llm.engine.stats.prefix_cache_hits == 0 and all(o.num_cached_tokens == 0 for o in outs)
    assert sum(encodes) == 64  # the same black picture in each, encoded for each
