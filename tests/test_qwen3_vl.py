"""Qwen3-VL against transformers' model on a tiny random checkpoint shaped like Qwen3-VL-2B-Instruct's: images of
different sizes, two per prompt, videos (frames without a rate and a decoded clip), an image beside a video, text
alone, in one batch; prompts prefilled in chunks; requests preempted and recomputed; bf16; the positions, the
vision tower with its DeepStack features, and the processing against transformers' own; the CLI."""
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_utils import LLM, SamplingParams
from vllm_utils.errors import UserError
from vllm_utils.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vllm_utils.multimodal.video import VideoClip
from vllm_utils.testing.tiny_qwen3_vl import VARIED_SEED, build_tiny_qwen3_vl

from conftest import HFReference, assert_bf16_close, chosen_logprobs
from test_cli import cli

TOKENS = 24  # past EOS too: both sides ignore it, neither masks it


@pytest.fixture(scope="module")
def tiny_qwen3_vl(tmp_path_factory) -> str:
    return build_tiny_qwen3_vl(str(tmp_path_factory.mktemp("qwen3_vl")), seed=VARIED_SEED)


@pytest.fixture(scope="module")
def reference(tiny_qwen3_vl) -> HFReference:
    return HFReference(tiny_qwen3_vl)


@pytest.fixture(scope="module")
def llm(tiny_qwen3_vl) -> LLM:
    return LLM(tiny_qwen3_vl, device="cpu", dtype="float32", max_model_len=2048)


@pytest.fixture(scope="module")
def clip(images) -> np.ndarray:
    """Six frames of a moving crop of a photo, 90 x 120 (not a multiple of 32: the processor resizes)."""
    big = np.asarray(images[1].resize((200, 150)))
    return np.stack([big[i * 6 : i * 6 + 90, i * 10 : i * 10 + 120] for i in range(6)])


def prompts(adapter, images: list[Image.Image], clip: np.ndarray) -> list[dict]:
    """One image, two images of different sizes, a video's frames given without a rate, a clip decoded from a
    file of 12 frames at 3 a second beside an image, text alone."""
    cases = [("describe the picture", [images[0]], []),
             ("what is in this image ?", [images[0], images[1].resize((100, 180))], []),
             ("describe this video", [], [clip]),
             ("what happens after the dog jumps ?", [images[1]], [VideoClip(clip, fps=3.0, total_frames=12)]),
             ("a cup of coffee on a wooden table", [], [])]
    return [{"prompt": adapter.chat_prompt(text, len(ims), len(vids)),
             "multi_modal_data": {"image": ims, "video": vids}} for text, ims, vids in cases]


def test_images_videos_and_text_in_one_batch_give_hf_tokens_and_logprobs(llm, reference, images, clip):
    reqs = prompts(llm.engine.processor, images, clip)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(reqs, params, use_tqdm=False)
    variety = []
    for req, out in zip(reqs, outputs):
        tokens = out.outputs[0].token_ids
        assert tokens == reference.greedy(req, TOKENS, ignore_eos=True)
        theirs = reference.token_logprobs(req, tokens)
        assert max(abs(a - b) for a, b in zip(chosen_logprobs(out.outputs[0]), theirs)) < 1e-4
        variety.append(len(set(tokens)))
    assert min(variety) > 3, variety  # the reference does not repeat itself
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == len(outputs)  # the prompts answer differently


def test_prompts_prefilled_in_chunks_give_hf_tokens(tiny_qwen3_vl, reference, images, clip):
    """Chunks of 16 tokens: chunk boundaries fall inside each image and between a video's pictures, so DeepStack's
    rows must follow the chunk's share of the multimodal positions."""
    llm = LLM(tiny_qwen3_vl, device="cpu", dtype="float32", max_model_len=2048, max_num_batched_tokens=16)
    reqs = [prompts(llm.engine.processor, images, clip)[i] for i in (1, 3)]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for req, out in zip(reqs, outputs):
        ids = out.prompt_token_ids
        first = ids.index(llm.engine.processor.mm_token_id)
        assert first % 16 + 4 < 16 and ids[first - first % 16 + 16 - 1] == ids[first]  # a boundary in the image
        assert out.outputs[0].token_ids == reference.greedy(req, 12, ignore_eos=True)


def test_preempted_requests_recompute_hf_tokens(tiny_qwen3_vl, reference, images, clip):
    """256 cache slots for four requests of 98-180 tokens (images, a video's frames, a clip beside an image):
    running requests are preempted; recomputed, their prompts and generated tokens take the same positions (the
    video's timestamps among them) and DeepStack features again."""
    llm = LLM(tiny_qwen3_vl, device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, max_num_seqs=4,
              max_model_len=256)
    reqs = prompts(llm.engine.processor, images, clip)[:4]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free == 64  # every block came back
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == reference.greedy(req, TOKENS, ignore_eos=True)


def test_bf16_logprobs_close_to_hf_fp32(tiny_qwen3_vl, reference, images, clip):
    llm = LLM(tiny_qwen3_vl, device="cpu", dtype="bfloat16", max_model_len=2048)
    req = prompts(llm.engine.processor, images, clip)[3]
    out = llm.generate([req], SamplingParams(temperature=0, max_tokens=12, logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert_bf16_close(chosen_logprobs(out), tiny_qwen3_vl, req, out.token_ids, reference)


def test_tensor_parallel_2_gives_the_tokens_of_1(tiny_qwen3_vl, llm, images, clip):
    """Each rank's share of the heads and MLPs, the DeepStack features whole on every rank."""
    reqs = prompts(llm.engine.processor, images, clip)[3:4]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    single = [o.outputs[0].token_ids for o in llm.generate(reqs, params, use_tqdm=False)]
    parallel = LLM(tiny_qwen3_vl, device="cpu", dtype="float32", max_model_len=2048, tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in parallel.generate(reqs, params, use_tqdm=False)] == single
    parallel.engine.shutdown()


def test_positions_and_vision_tower_with_deepstack_equal_transformers(llm, reference, images, clip):
    """The position rows of a prompt with two images and a video, the offset of generated tokens, and the tower's
    embeddings and DeepStack features of all three, against transformers' own."""
    adapter, model = llm.engine.processor, llm.engine.runner.model
    ids, mm = adapter.process(adapter.chat_prompt("describe", 2, 1), [images[0], images[1].resize((300, 120))],
                              [VideoClip(clip, fps=3.0, total_frames=12)])
    hf = reference.model.model
    inputs = adapter.hf_model_inputs(mm)
    kinds = adapter.hf_token_inputs(torch.tensor([ids]))["mm_token_type_ids"]
    expected, delta = hf.get_rope_index(torch.tensor([ids]), kinds, image_grid_thw=inputs["image_grid_thw"],
                                        video_grid_thw=inputs["video_grid_thw"].clone())
    positions, offset = model.rope_positions([t in model.mm_token_ids for t in ids], mm)
    assert torch.equal(positions, expected[:, 0]) and offset == int(delta) < 0
    with torch.inference_mode():
        ours = model.encode_mm(mm)
        image = hf.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        video = hf.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    theirs = [torch.cat([*image.pooler_output, *video.pooler_output])]  # the prompt's order: images first here
    theirs += [torch.cat([*a, *b]) for a, b in zip(image.deepstack_features, video.deepstack_features)]
    assert len(theirs) == 3
    torch.testing.assert_close(ours, torch.cat(theirs, dim=-1), rtol=1e-5, atol=1e-5)


def test_interleaved_rope_tables_equal_transformers_at_the_hub_shape():
    """Qwen3-VL-2B's head (128 channels, sections [24, 20, 20]): our cos/sin of three position rows are
    transformers' Qwen3VLTextRotaryEmbedding's."""
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from vllm_utils.models.qwen3_vl import InterleavedMRotaryEmbedding

    params = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    config = Qwen3VLTextConfig(head_dim=128, max_position_embeddings=4096, rope_parameters=params)
    positions = torch.randint(0, 4096, (3, 50))
    ours = InterleavedMRotaryEmbedding(128, 4096, {"rope_type": "default", "rope_theta": 5000000.0}, [24, 20, 20])
    _, cos, sin = ours.tables(positions)
    theirs = Qwen3VLTextRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[:, None])
    torch.testing.assert_close(cos, theirs[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, theirs[1][0], rtol=0, atol=1e-6)


def test_the_2b_shapes_build_every_transformers_parameter_on_meta():
    """Qwen3-VL-2B-Instruct's shapes: as many parameters as transformers' model of them holds (tied embeddings)."""
    from transformers import Qwen3VLConfig
    from transformers import Qwen3VLForConditionalGeneration as HFQwen3VL

    from vllm_utils.engine.model_runner import build_model

    text = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
    vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                  deepstack_visual_indexes=[5, 11, 17])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    ours = build_model(config, Qwen3VLForConditionalGeneration, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        theirs = HFQwen3VL(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) and abs(count - 2.13e9) < 0.01e9


def test_the_bundled_8b_config_builds_every_transformers_parameter_on_meta():
    from transformers import Qwen3VLForConditionalGeneration as HFQwen3VL

    from vllm_utils.config import load_hf_config
    from vllm_utils.engine.model_runner import build_model

    config = load_hf_config("Qwen/Qwen3-VL-8B-Instruct")
    ours = build_model(config, Qwen3VLForConditionalGeneration, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        theirs = HFQwen3VL(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) and abs(count - 8.77e9) < 0.01e9


def hf_processor(folder: str):
    """transformers' Qwen3VLProcessor of the folder, built around its constructor, which refuses to run without
    torchvision (for a video processor): the image processor and tokenizer of the folder, the video processor's
    sizes for its video text."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    vars(processor).update(image_processor=AutoImageProcessor.from_pretrained(folder), tokenizer=tokenizer,
                           video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2), chat_template=None,
                           image_token="<|image_pad|>", video_token="<|video_pad|>",
                           vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    return processor


@pytest.mark.parametrize("sizes", [[(5, 5)], [(13, 100)], [(32, 32)], [(100, 60)], [(224, 224)], [(500, 300)],
                                   [(60, 700)], [(1000, 1000)], [(640, 480), (90, 120)]])
def test_tokens_and_pixels_equal_transformers_processor(llm, tiny_qwen3_vl, images, sizes):
    """Images below a patch, beyond the pixel limit, long and thin, two in one prompt: pixel rows and grids are
    transformers' image processor's, token ids its processor's placeholders expanded."""
    adapter = llm.engine.processor
    pictures = [images[i % 2].resize(size) for i, size in enumerate(sizes)]
    prompt = adapter.chat_prompt("describe", len(pictures))
    ids, mm = adapter.process(prompt, pictures)
    processor = hf_processor(tiny_qwen3_vl)
    hf = processor.image_processor(images=pictures, return_tensors="pt")
    assert torch.equal(mm["pixel_values"], hf["pixel_values"]) and torch.equal(mm["grid_thw"], hf["image_grid_thw"])
    first, *rest = prompt.split("<|image_pad|>")
    expanded = first + "".join(processor.replace_image_token({"image_grid_thw": hf["image_grid_thw"]}, i) + piece
                               for i, piece in enumerate(rest))
    assert ids == processor.tokenizer(expanded)["input_ids"]
    assert sum(adapter.item_positions(mm)) == ids.count(adapter.mm_token_id)


@pytest.mark.parametrize("given", ["frames", "clip"])
def test_a_videos_text_is_qwen3_vl_processors(llm, tiny_qwen3_vl, clip, given):
    """Each temporal patch's time and positions, as Qwen3VLProcessor writes them: frames without a rate at
    transformers' 24 a second, a decoded clip at the times of the frames sampled from its file; the chat template's
    markers around the video collapse."""
    from transformers.video_utils import VideoMetadata

    adapter = llm.engine.processor
    video = clip[:5] if given == "frames" else VideoClip(clip, fps=1.0, total_frames=24)  # 5 frames: one padded
    prompt = adapter.chat_prompt("describe", 0, 1)
    ids, mm = adapter.process(prompt, [], [video])
    processor = hf_processor(tiny_qwen3_vl)
    indices = list(range(5)) if given == "frames" else list(range(0, 24, 4))
    metadata = VideoMetadata(total_num_frames=len(indices), fps=None if given == "frames" else 1.0,
                             frames_indices=indices)
    text = processor.replace_video_token({"video_grid_thw": mm["grid_thw"], "video_metadata": [metadata]}, 0)
    wrapper = "<|vision_start|><|video_pad|><|vision_end|>"
    assert ids == processor.tokenizer(prompt.replace(wrapper, text))["input_ids"]
    assert ("<10.0 seconds>" in text) == (given == "clip") and ("<0.1 seconds>" in text) == (given == "frames")


@pytest.mark.parametrize("path, value, message", [
    ("text_config.rope_parameters.rope_type", "linear", "text_config.rope_parameters.rope_type = 'linear'"),
    ("text_config.num_experts", 8, "text_config.num_experts = 8"),
    ("text_config.hidden_act", "swish", "text_config.hidden_act 'swish'"),
    ("vision_config.rope_parameters", {"rope_type": "default"}, "vision_config.rope_parameters.rope_type 'default'"),
    ("vision_config.num_position_embeddings", 40, "vision_config.num_position_embeddings 40 is not a square"),
    ("vision_config.out_hidden_size", 32, "vision_config.out_hidden_size 32 differs"),
])
def test_config_values_not_implemented_are_refused_by_name(tiny_qwen3_vl, path, value, message):
    from vllm_utils.config import load_hf_config

    config = load_hf_config(tiny_qwen3_vl)
    *parents, field = path.split(".")
    target = config
    for name in parents:
        target = target[name] if isinstance(target, dict) else getattr(target, name)
    if isinstance(target, dict):
        target[field] = value
    else:
        setattr(target, field, value)
    with pytest.raises(UserError, match=re.escape(message)):
        Qwen3VLForConditionalGeneration.check_config(config)


# ---- the command line -----------------------------------------------------------------------------
def test_demo_gives_hf_tokens(tiny_qwen3_vl, tmp_path, images):
    images[0].save(tmp_path / "a.png")
    images[1].resize((150, 100)).save(tmp_path / "b.png")
    run = cli("--demo", f"--model={tiny_qwen3_vl}", f"--input-image={tmp_path / 'a.png'}",
              f"--input-image={tmp_path / 'b.png'}", "--mm-per-prompt=2", "--dtype=float32", "--device=cpu",
              "--output-len=12", "--reference=hf", "--prompt=describe the picture", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == 1 and agreement["exact_match_rate"] == 1.0, agreement
    assert agreement["max_abs_dlogprob"] < 1e-4


def test_acc_on_the_bundled_sample_agrees_with_hf_fp32(tiny_qwen3_vl, tmp_path):
    run = cli("--acc", f"--model={tiny_qwen3_vl}", "--device=cpu", "--dtype=float32", "--dataset=sample-jsonl",
              "--reference=hf", "--output-len=8", "--batch-size=3", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    ref = info["reference"]
    assert ref["samples_compared"] == 3 and ref["exact_match_rate"] == 1.0 and ref["max_abs_dlogprob"] < 1e-4


def test_perf_with_a_synthetic_video(tiny_qwen3_vl, tmp_path):
    run = cli("--perf", f"--model={tiny_qwen3_vl}", "--device=cpu", "--dtype=float32", "--num-frames=4",
              "--input-vision-shape=100,150", "--input-len=120", "--output-len=4", "--num-prompts=2",
              cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    # 4 frames of 100 x 150 -> 96 x 160 pixels -> 2 temporal patches of 6 x 10 patches -> 2 * 3 * 5 positions
    assert "tokens per request: 30 video + 90 text" in run.stdout, run.stdout
