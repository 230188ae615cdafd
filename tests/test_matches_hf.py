"""Our engine against HF transformers' LlavaForConditionalGeneration on the same tiny checkpoint."""
import pytest

from vllm_utils import LLM, SamplingParams

from conftest import HFReference, assert_bf16_close, chosen_logprobs, uncaptured_graph_mode

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def engine(folder: str, **kwargs) -> LLM:
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("max_model_len", 512)
    return LLM(folder, device="cpu", **kwargs)


def request(llm: LLM, text: str, images: list) -> dict:
    return {"prompt": llm.engine.processor.chat_prompt(text, len(images)), "multi_modal_data": {"image": images}}


def test_one_prompt_every_key_layout(tiny_llava_any_layout, images):
    hf = HFReference(tiny_llava_any_layout)
    llm = engine(tiny_llava_any_layout)
    req = request(llm, "Describe the picture.", images[:1])
    ours = llm.generate([req], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert ours == hf.greedy(req, GREEDY.max_tokens)
    assert len(ours) > 0


BATCH = [("Describe the picture.", [0]), ("What is in this image? Answer in one short sentence.", [1]),
         ("Compare the two pictures.", [0, 1]), ("Tell me a story without any picture at all.", [])]


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_batch_of_different_lengths_and_images(tiny_llava, hf_reference, images, block_size):
    llm = engine(tiny_llava, block_size=block_size)
    reqs = [request(llm, text, [images[i] for i in idx]) for text, idx in BATCH]
    outputs = llm.generate(reqs, GREEDY, use_tqdm=False)
    assert len({len(o.prompt_token_ids) for o in outputs}) == len(BATCH)
    for req, out, (_, idx) in zip(reqs, outputs, BATCH):
        assert out.outputs[0].token_ids == hf_reference.greedy(req, GREEDY.max_tokens)


def test_preemption_recomputes_the_same_tokens(tiny_llava, hf_reference, images):
    # 192 cache slots for four requests of ~100 tokens each: running requests must be preempted.
    llm = engine(tiny_llava, block_size=4, num_kv_blocks=48, max_num_seqs=4, max_model_len=192)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reqs = [request(llm, text, [images[i] for i in idx]) for text, idx in BATCH]
    outputs = llm.generate(reqs, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free == 48  # every block came back
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == hf_reference.greedy(req, 40, ignore_eos=True)


def test_alone_or_in_a_batch_gives_the_same_tokens(tiny_llava, images):
    llm = engine(tiny_llava)
    reqs = [request(llm, text, [images[i] for i in idx]) for text, idx in BATCH]
    batch = [o.outputs[0].token_ids for o in llm.generate(reqs, GREEDY, use_tqdm=False)]
    alone = [llm.generate([r], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for r in reqs]
    assert batch == alone


@pytest.mark.parametrize("cpu_kernels_on", [True, False], ids=["cpu-kernels", "pytorch-ops"])
def test_bf16_logprobs_close_to_hf_fp32(tiny_llava, hf_reference, images, cpu_kernels_on):
    from vllm_utils.kernels import cpu
    from vllm_utils.kernels.cpu_linear import DecodeLinear

    if cpu_kernels_on and cpu.unavailable_reason():
        pytest.skip(f"CPU kernels unavailable: {cpu.unavailable_reason()}")
    # off: what runs on CPUs without AVX512-BF16 or without a compiler
    llm = engine(tiny_llava, dtype="bfloat16", cpu_kernels=cpu_kernels_on)
    uses_kernels = any(isinstance(m.impl, DecodeLinear) for m in llm.engine.runner.model.modules()
                       if hasattr(m, "impl"))
    assert uses_kernels == cpu_kernels_on
    req = request(llm, "Describe the picture.", images[:1])
    out = llm.generate([req], SamplingParams(temperature=0, max_tokens=16, logprobs=0), use_tqdm=False)[0]
    assert_bf16_close(chosen_logprobs(out.outputs[0]), tiny_llava, req, out.outputs[0].token_ids, hf_reference)


def test_bf16_with_wide_heads_matches_hf_through_the_cpu_prefill_attention(tmp_path, images, monkeypatch):
    """Head widths of LLaVA-1.5 (64 in CLIP, 128 in Llama, here with grouped KV heads) take the C prefill
    attention on CPUs that have it; log-probs stay close to HF's fp32."""
    from conftest import real_tokenizer_dir
    from vllm_utils.testing.tiny_llava import build_tiny_llava
    from vllm_utils.kernels import cpu as cpu_kernels

    if cpu_kernels.unavailable_reason():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    folder = build_tiny_llava(str(tmp_path / "wide"), real_tokenizer_dir(), seed=10, image_size=112, hidden=256,
                              heads=2, kv_heads=1, vision_hidden=128, vision_heads=2)
    calls = []
    original = cpu_kernels.prefill_attention
    monkeypatch.setattr(cpu_kernels, "prefill_attention",
                        lambda q, *args, **kwargs: calls.append(q.shape) or original(q, *args, **kwargs))
    llm = engine(folder, dtype="bfloat16")
    req = request(llm, "Describe the picture.", images[:1])
    out = llm.generate([req], SamplingParams(temperature=0, max_tokens=16, logprobs=0), use_tqdm=False)[0]
    assert {shape[1:] for shape in calls} == {(2, 64), (2, 128)}  # the vision tower's and the decoder's
    assert len(set(HFReference(folder).greedy(req, 16, ignore_eos=True))) > 3, "the reference repeats itself"
    assert_bf16_close(chosen_logprobs(out.outputs[0]), folder, req, out.outputs[0].token_ids)


def test_tensor_parallel_2_on_cpu_gives_the_same_tokens(tiny_llava, images):
    outputs = {}
    for size in (1, 2):
        llm = engine(tiny_llava, tensor_parallel_size=size)
        reqs = [request(llm, text, [images[i] for i in idx]) for text, idx in BATCH]
        outputs[size] = [o.outputs[0].token_ids for o in llm.generate(reqs, GREEDY, use_tqdm=False)]
        llm.engine.shutdown()
    assert outputs[2] == outputs[1]
    assert all(len(t) > 0 for t in outputs[2])


def test_full_strategy_layer_list_and_llama3_rope_match_hf(tmp_path, images):
    """The other LLaVA variants the config allows: CLS kept, features from two layers, llama3 RoPE."""
    from conftest import real_tokenizer_dir
    from vllm_utils.testing.tiny_llava import build_tiny_llava

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    folder = build_tiny_llava(str(tmp_path / "variant"), real_tokenizer_dir(), seed=2, select_strategy="full",
                              vision_feature_layer=[-3, -1], rope_parameters=rope)
    hf = HFReference(folder)
    llm = engine(folder)
    assert llm.engine.runner.model.num_image_features == 17  # 16 patches + CLS
    req = request(llm, "Describe the picture.", images[:1])
    ours = llm.generate([req], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert ours == hf.greedy(req, GREEDY.max_tokens)


def test_padded_steps_of_graph_mode_give_hf_tokens(tiny_llava, hf_reference, images):
    """Decode per batch bucket (3 requests take the bucket of 4, with a padded row on the scratch block; one
    alone takes the bucket of 1) and the prefill of one prompt per length bucket (padded at its end, image
    features gathered from a static buffer); the CUDA graphs themselves are tested in test_cuda.py."""
    from vllm_utils.engine.cuda_graphs import prefill_buckets

    assert prefill_buckets(100) == [64, 128] and prefill_buckets(600)[-2:] == [512, 640]
    assert prefill_buckets(1024)[-1] == 1024 and prefill_buckets(8) == [64]
    llm = engine(tiny_llava, block_size=16, max_num_seqs=4)
    uncaptured_graph_mode(llm)
    runner = llm.engine.runner
    assert runner.graphs.buckets == [1, 2, 4] and runner.prefill_graphs.buckets[-1] == 512
    batches, prompts = [], []
    decode, prefill = runner.graphs.run, runner.prefill_graphs.run
    runner.graphs.run = lambda inputs: batches.append(len(inputs.token_ids)) or decode(inputs)
    runner.prefill_graphs.run = lambda inputs, *args: prompts.append(len(inputs.token_ids)) or prefill(inputs, *args)
    reqs = [request(llm, text, [images[i] for i in idx]) for text, idx in BATCH]
    outputs = llm.generate(reqs[:3], GREEDY, use_tqdm=False) + llm.generate(reqs[3:], GREEDY, use_tqdm=False)
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == hf_reference.greedy(req, GREEDY.max_tokens)
    assert 3 in batches and 1 in batches
    assert len(outputs[3].prompt_token_ids) in prompts  # the request alone was prefilled by the padded step


def test_the_native_path_with_every_device_kernel_off_gives_hf_tokens(tiny_llava, hf_reference, images):
    """The reference the device kernels are held to: every op in its native PyTorch form, the pure-PyTorch
    attention backend."""
    from vllm_utils.layers.op import Op

    llm = engine(tiny_llava, cpu_kernels=False, attention_backend="torch")
    runner = llm.engine.runner
    assert runner.backend.name == "torch"
    assert all(m.impl is None for m in runner.model.modules() if isinstance(m, Op))
    reqs = [request(llm, text, [images[i] for i in idx]) for text, idx in BATCH]
    for req, out in zip(reqs, llm.generate(reqs, GREEDY, use_tqdm=False)):
        assert out.outputs[0].token_ids == hf_reference.greedy(req, GREEDY.max_tokens)
