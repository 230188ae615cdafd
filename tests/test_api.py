"""vLLM's offline API on our engine: LLM's arguments, SamplingParams' fields and their meanings (each checked against
HF transformers' logits processors where HF has one, and against vLLM's documented behaviour where it has none),
the outputs as vLLM shapes them, chat, hub names from the local Hugging Face cache."""
import base64
import io
import os
import shutil

import pytest
import torch
from PIL import Image

from vllm_utils import LLM, SamplingParams
from vllm_utils.errors import UserError


PROMPT = "Describe the picture in detail please."


@pytest.fixture(scope="module")
def llm(tiny_llava) -> LLM:
    return LLM(tiny_llava, device="cpu", dtype="float32", max_model_len=512)


def _request(llm: LLM, image: Image.Image, text: str = PROMPT) -> dict:
    return {"prompt": llm.engine.processor.chat_prompt(text), "multi_modal_data": {"image": image}}


def test_greedy_tokens_and_top_logprobs_equal_hfs(llm, hf_reference, images):
    """logprobs=5: at each position the 5 likeliest tokens and the chosen one, with HF's log-probs and ranks."""
    request = _request(llm, images[0])
    out = llm.generate(request, SamplingParams(temperature=0, max_tokens=12, logprobs=5, ignore_eos=True),
                       use_tqdm=False)[0]
    completion = out.outputs[0]
    with torch.inference_mode():  # HF's greedy run and the logits of each of its steps
        hf = hf_reference.model.generate(**hf_reference.inputs(request), max_new_tokens=12, do_sample=False,
                                         output_logits=True, return_dict_in_generate=True)
    assert completion.token_ids == hf.sequences[0, -12:].tolist()
    full = torch.cat(hf.logits).float().log_softmax(-1)
    for position, (entries, token) in enumerate(zip(completion.logprobs, completion.token_ids)):
        top = full[position].topk(5)
        assert set(entries) == set(top.indices.tolist()) | {token}
        for t, entry in entries.items():
            assert entry.logprob == pytest.approx(float(full[position, t]), abs=1e-4)
            assert entry.decoded_token == llm.get_tokenizer().decode([t])
        assert entries[token].rank == 1  # greedy: the likeliest
    assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in
                                                              zip(completion.logprobs, completion.token_ids)))


def test_outputs_have_vllms_fields(llm, images):
    out = llm.generate([_request(llm, images[0]), "Tell me a story."], SamplingParams(temperature=0, max_tokens=4),
                       use_tqdm=False)
    assert out[0].request_id != out[1].request_id and all(o.finished for o in out)
    completion = out[0].outputs[0]
    assert (completion.index, completion.logprobs, completion.cumulative_logprob) == (0, None, None)
    assert completion.finish_reason in ("stop", "length") and completion.finished()


def test_one_sampling_params_per_prompt(llm, images):
    reqs = [_request(llm, images[0]), _request(llm, images[1])]
    short, longer = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), \
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    outs = llm.generate(reqs, [short, longer], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 7]
    assert outs[1].outputs[0].token_ids == llm.generate(reqs[1], longer, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(UserError, match="3 SamplingParams for 2 prompts"):
        llm.generate(reqs, [short] * 3, use_tqdm=False)


def test_n_samples_each_with_its_own_seeded_generator(llm, images):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    first = llm.generate(_request(llm, images[0]), params, use_tqdm=False)[0]
    again = llm.generate(_request(llm, images[0]), params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    texts = [c.token_ids for c in first.outputs]
    assert texts == [c.token_ids for c in again.outputs], "a seeded request reproduces"
    assert len({tuple(t) for t in texts}) == 3, "each output is its own sample"
    alone = llm.generate(_request(llm, images[0]), SamplingParams(temperature=1.0, seed=7, max_tokens=10,
                                                                  ignore_eos=True), use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == texts[0]  # output 0 draws what n=1 draws


def test_stop_strings_end_the_output_and_leave_its_text(llm, images):
    """vLLM: the output stops at the token completing a stop string; the text ends before it (with
    include_stop_str_in_output, after it); finish_reason "stop", stop_reason the string."""
    request = _request(llm, images[0])
    full = llm.generate(request, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop.strip()) > 1
    cut = text.index(stop)
    out = llm.generate(request, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "@@@"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[:cut] and (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.token_ids == full.outputs[0].token_ids[: len(out.token_ids)] and len(out.token_ids) < 24
    kept = llm.generate(request, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop,
                                                include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: cut + len(stop)]


def test_stop_tokens_and_min_tokens_as_hf_generate(llm, hf_reference, images):
    """A stop token ends the output (kept in its tokens; stop_reason the id), but not before min_tokens: HF's
    generate with the same token as EOS and min_new_tokens gives the same tokens."""
    request = _request(llm, images[0])
    greedy = llm.generate(request, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    stop = greedy[1]
    out = llm.generate(request, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[: greedy.index(stop) + 1] and out.stop_reason == stop
    held = llm.generate(request, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop], min_tokens=4),
                        use_tqdm=False)[0].outputs[0]
    inputs = hf_reference.inputs(request)
    eos = hf_reference.processor.eos_token_id
    hf = hf_reference.model.generate(**inputs, max_new_tokens=10, min_new_tokens=4, do_sample=False,
                                     eos_token_id=[stop, eos])[0, inputs["input_ids"].shape[1]:].tolist()
    hf = hf[: next((i + 1 for i, t in enumerate(hf) if t in (stop, eos)), len(hf))]
    assert held.token_ids == hf and len(held.token_ids) > 2


def test_the_repetition_penalty_gives_hf_tokens(llm, hf_reference, images):
    request = _request(llm, images[1])
    ours = llm.generate(request, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8),
                        use_tqdm=False)[0].outputs[0].token_ids
    plain = llm.generate(request, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    inputs = hf_reference.inputs(request)
    hf = hf_reference.model.generate(**inputs, max_new_tokens=16, do_sample=False, repetition_penalty=1.8)
    assert ours == hf[0, inputs["input_ids"].shape[1]:].tolist() and ours != plain


def test_presence_and_frequency_penalties_change_greedy_outputs_where_tokens_repeat(llm, images):
    request = _request(llm, images[0])
    plain = llm.generate(request, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(plain)) < len(plain), "the plain output repeats a token"
    for field in ("presence_penalty", "frequency_penalty"):
        penalized = llm.generate(request, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                         **{field: 2.0}), use_tqdm=False)[0].outputs[0].token_ids
        assert penalized != plain and penalized[0] == plain[0], field  # the first token has nothing to penalize


@pytest.mark.parametrize("fields, words", [
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, "top_p must be a finite number in (0, 1]"),
    ({"top_k": -2}, "top_k must be an integer >= -1"),
    ({"n": 0}, "n must be an integer >= 1"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"min_tokens": 5, "max_tokens": 3}, "min_tokens (5) must not exceed max_tokens (3)"),
    ({"logprobs": -2}, "logprobs must be an integer >= -1"),
    ({"stop": 5}, "stop must be a string or a list of non-empty strings"),
    ({"stop_token_ids": 5}, "stop_token_ids must be a list of token ids"),
    ({"stop": ["."], "detokenize": False}, "stop strings are looked for in the text: they need detokenize=True"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ({"presence_penalty": 3.0}, "presence_penalty must be a finite number in [-2, 2]"),
    ({"stop": [""]}, "stop must be a string or a list of non-empty strings"),
    ({"best_of": 3}, "SamplingParams best_of=3 is not supported here"),
    ({"temprature": 0.5}, "SamplingParams has no field 'temprature'"),
])
def test_bad_sampling_params_are_one_line_at_construction(fields, words):
    with pytest.raises(UserError, match=None) as caught:
        SamplingParams(**fields)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_vllms_engine_arguments(tiny_llava, images):
    """Those that mean something here are taken, those that change nothing accepted, the others refused by name."""
    llm = LLM(model=tiny_llava, device="cpu", dtype="float32", max_model_len=256, gpu_memory_utilization=0.5,
              trust_remote_code=True, enable_prefix_caching=True, limit_mm_per_prompt={"image": 1}, seed=0,
              tokenizer=tiny_llava)
    assert llm.engine.config.engine.memory_fraction == 0.5 and llm.get_tokenizer() is llm.engine.processor.tokenizer
    two = {"prompt": llm.engine.processor.chat_prompt("Compare.", 2), "multi_modal_data": {"image": images}}
    with pytest.raises(UserError, match=r"holds 2 images, more than limit_mm_per_prompt\['image'\] = 1"):
        llm.generate(two, use_tqdm=False)
    with pytest.raises(UserError, match="LLM\\(quantization='awq'\\) is not supported here"):
        LLM(model=tiny_llava, quantization="awq")
    with pytest.raises(UserError, match="LLM\\(\\) has no engine argument 'max_modle_len'"):
        LLM(model=tiny_llava, max_modle_len=256)


def test_chat_renders_the_conversation_with_its_picture_as_hf_does(llm, hf_reference, images, tmp_path):
    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    expected = hf_reference.greedy({"prompt": hf_reference.chat_prompt("What is in this picture?"),
                                    "multi_modal_data": {"image": images[0]}}, 10, ignore_eos=True)
    assert out.outputs[0].token_ids == expected
    path = tmp_path / "picture.png"
    images[0].save(path)
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{path}"}},
                                          {"type": "text", "text": "What is in this picture?"}]}]
    with pytest.raises(UserError, match="allowed_local_media_path"):
        llm.chat(local, use_tqdm=False)
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]
    with pytest.raises(UserError, match="nothing is"):
        llm.chat(remote, use_tqdm=False)


def test_a_hub_name_loads_from_the_local_hugging_face_cache(tiny_llava, images, tmp_path, monkeypatch):
    """A snapshot `hf download` left in the cache (models--ORG--NAME/snapshots/REVISION) runs by its hub name; a
    name not there is one line (nothing is downloaded)."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--test-org--tiny-llava" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_llava, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    by_name = LLM("test-org/tiny-llava", device="cpu", dtype="float32", max_model_len=256)
    by_folder = LLM(tiny_llava, device="cpu", dtype="float32", max_model_len=256)
    request = {"prompt": by_name.engine.processor.chat_prompt(PROMPT), "multi_modal_data": {"image": images[0]}}
    assert by_name.generate(request, params, use_tqdm=False)[0].outputs[0].token_ids == \
        by_folder.generate(request, params, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(UserError, match="hf download test-org/absent") as caught:
        LLM("test-org/absent", device="cpu")
    assert "\n" not in str(caught.value) and not os.path.exists("test-org")
    with pytest.raises(UserError, match="not in the local cache, and nothing is downloaded") as caught:
        LLM("llava-hf/llava-1.5-7b-hf", device="cpu")
    assert "bundled" not in str(caught.value)


def test_vllms_spellings_of_defaults(tiny_llava):
    """top_k 0 and -1 are every token, logprobs True is 1, seed -1 is no seed (vLLM's); LLM(seed=None, device="auto",
    dtype=torch.float32) are taken."""
    assert SamplingParams(top_k=0).top_k == -1 and SamplingParams(logprobs=True).logprobs == 1
    assert SamplingParams(seed=-1).seed is None
    llm = LLM(tiny_llava, seed=None, device="auto", dtype=torch.float32, max_model_len=256)
    assert llm.engine.dtype == torch.float32


def test_a_failed_call_leaves_the_llm_usable(llm, images, monkeypatch):
    """An error (or Ctrl-C) in the middle of generate drops that call's requests: the next call starts clean."""
    request = _request(llm, images[0])
    with pytest.raises(UserError, match="more than max_logprobs"):
        llm.generate(request, SamplingParams(logprobs=100000), use_tqdm=False)
    step = llm.engine.step
    calls = []

    def failing_second_step():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", failing_second_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([request, request], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    monkeypatch.setattr(llm.engine, "step", step)
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_free == llm.engine.block_manager.num_blocks
    assert len(llm.generate(request, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids) == 3


def test_the_stop_token_leaves_the_text_unless_asked(llm, images):
    request = _request(llm, images[0])
    greedy = llm.generate(request, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    stop = greedy[2]
    tokenizer = llm.get_tokenizer()
    for include in (False, True):
        out = llm.generate(request, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop],
                                                   include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
        ids = out.token_ids if include else out.token_ids[:-1]
        assert out.token_ids[-1] == stop and out.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_stop_string_within_min_tokens_does_not_end_the_output(llm, images):
    """vLLM looks for stop strings only in text after the first min_tokens tokens; the text is cut where the stop
    string that ended the output starts."""
    request = _request(llm, images[0])
    full = llm.generate(request, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    early = tokenizer.decode(full.token_ids[:3], skip_special_tokens=True)
    stop = early[-2:]
    assert len(stop.strip()) == 2
    out = llm.generate(request, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                               min_tokens=3), use_tqdm=False)[0].outputs[0]
    text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
    if out.finish_reason == "stop":
        cut = text.index(stop, len(early) - len(stop) + 1)
        assert out.text == text[:cut] and len(out.token_ids) > 3
    else:
        assert out.text == full.text and stop not in full.text[len(early) - len(stop) + 1 :]


def test_generation_config_ends_and_defaults_as_vllm_takes_them(tiny_llava, images, tmp_path):
    """generation_config.json's EOS list ends replies, and its sampling values are the defaults of
    sampling_params=None (LLM(generation_config="vllm") keeps vLLM's own)."""
    import json

    folder = tmp_path / "model"
    shutil.copytree(tiny_llava, folder)
    probe = LLM(str(folder), device="cpu", dtype="float32", max_model_len=256)
    request = {"prompt": probe.engine.processor.chat_prompt(PROMPT), "multi_modal_data": {"image": images[0]}}
    greedy = probe.generate(request, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids
    end = greedy[3]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, end], "temperature": 0.0,
                                                               "max_new_tokens": 8}))
    llm = LLM(str(folder), device="cpu", dtype="float32", max_model_len=256)
    assert llm.get_default_sampling_params().temperature == 0
    out = llm.generate(request, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[: greedy.index(end) + 1] and out.finish_reason == "stop"
    plain = LLM(str(folder), device="cpu", dtype="float32", max_model_len=256, generation_config="vllm")
    assert plain.get_default_sampling_params().temperature == 1.0


def test_prompts_as_vllm_takes_them(llm, images):
    """A tuple of prompts, a picture as a uint8 array, lora_request=None; chat with a system turn and template
    arguments; an empty or malformed conversation is one line."""
    import numpy as np

    array = np.asarray(images[0].convert("RGB"))
    request = {"prompt": llm.engine.processor.chat_prompt(PROMPT), "multi_modal_data": {"image": array}}
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = llm.generate((request, _request(llm, images[0])), params, use_tqdm=False, lora_request=None)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there."}]
    assert llm.chat(messages, params, use_tqdm=False, chat_template_kwargs={})[0].outputs[0].token_ids
    with pytest.raises(UserError, match="needs a conversation"):
        llm.chat([], params, use_tqdm=False)
    with pytest.raises(UserError, match="content is a string or a list of parts"):
        llm.chat([{"role": "user", "content": None}], params, use_tqdm=False)
