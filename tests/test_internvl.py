"""InternVL against transformers' model on tiny random checkpoints shaped like the hub's (InternVL3-1B-hf; the
InternViT-6B switches of the larger sizes; InternVL3.5's Qwen3 decoder): an image of several tiles, a small one of
one tile, two in one prompt, text alone, videos, one batch mixing them, prompts prefilled in chunks, bf16, the CUDA
code path, tensor parallelism, mm_processor_kwargs; the tiles and tokens against transformers' own
InternVLProcessor (built here without the torchvision video processor it cannot build); the tower's switches no
tiny checkpoint carries against transformers' features; full-size parameter counts; the CLI; refusals by name."""
import json
import re

import numpy as np
import pytest
import torch

from vllm_utils import LLM, SamplingParams
from vllm_utils.config import load_hf_config
from vllm_utils.errors import UserError
from vllm_utils.models.internvl import InternVLForConditionalGeneration
from vllm_utils.multimodal.internvl import InternVLProcessorAdapter
from vllm_utils.multimodal.video import VideoClip
from vllm_utils.testing.tiny_internvl import LARGE_SEED, LLAMA_SEED, QWEN3_SEED, VARIED_SEED, build_tiny_internvl

from conftest import HFReference, assert_bf16_close, chosen_logprobs, uncaptured_graph_mode
from test_cli import cli

TOKENS = 12


def hf_processor(folder: str):
    """transformers' InternVLProcessor of the folder, without the video processor it cannot build here."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    class ImagesOnly(InternVLProcessor):
        def check_argument_for_proper_class(self, name, argument):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, argument)

    with open(f"{folder}/processor_config.json") as f:
        seq = json.load(f)["image_seq_length"]
    with open(f"{folder}/chat_template.jinja") as f:
        template = f.read()
    return ImagesOnly(image_processor=AutoImageProcessor.from_pretrained(folder),
                      tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None, image_seq_length=seq,
                      chat_template=template)


def reference(folder: str, processor_kwargs: dict | None = None) -> HFReference:
    """HF's model, fed HF's own processor's tokens and tiles for prompts of images (ours for videos)."""
    adapter = InternVLProcessorAdapter(folder, load_hf_config(folder), processor_kwargs=processor_kwargs)
    adapter.hf_processor = hf_processor(folder)
    return HFReference(folder, processor=adapter)


@pytest.fixture(scope="module")
def tiny_internvl(tmp_path_factory) -> str:
    return build_tiny_internvl(str(tmp_path_factory.mktemp("internvl")), seed=VARIED_SEED)


@pytest.fixture(scope="module")
def internvl_reference(tiny_internvl) -> HFReference:
    return reference(tiny_internvl)


@pytest.fixture(scope="module")
def llm(tiny_internvl) -> LLM:
    return LLM(tiny_internvl, device="cpu", dtype="float32", max_model_len=4096)


@pytest.fixture(scope="module")
def clip(images) -> np.ndarray:
    """Four frames of a moving crop of a photo, 90 x 120 (each frame one tile)."""
    big = np.asarray(images[1].resize((200, 150)))
    return np.stack([big[i * 8 : i * 8 + 90, i * 12 : i * 12 + 120] for i in range(4)])


def requests(adapter, images, clip) -> list[dict]:
    """An image of several tiles, a small square one (one tile), two images, text alone, a video's frames, an
    image and a video (frames sampled from a clip at its rate, as a decoded file gives them)."""
    cases = [("describe the picture", [images[0]], []),
             ("what is in this image ?", [images[1].resize((90, 90))], []),
             ("describe", [images[0], images[1]], []),
             ("a photo of a cat sitting on a red chair", [], []),
             ("describe this video", [], [clip]),
             ("what happens in the frames ?", [images[1].resize((300, 120))], [VideoClip(clip, 3.0, 12)])]
    return [{"prompt": adapter.chat_prompt(text, len(ims), len(vids)), "multi_modal_data": {"image": ims,
                                                                                           "video": vids}}
            for text, ims, vids in cases]


def assert_hfs(llm: LLM, ref: HFReference, reqs: list[dict]) -> list:
    """One batch: each prompt's greedy tokens HF's, their log-probs within 1e-4, varied, and every prompt's own."""
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(reqs, params, use_tqdm=False)
    for req, out in zip(reqs, outputs):
        ours = out.outputs[0]
        assert ours.token_ids == ref.greedy(req, TOKENS, ignore_eos=True)
        theirs = ref.token_logprobs(req, ours.token_ids)
        assert max(abs(e[t].logprob - r) for e, t, r in zip(ours.logprobs, ours.token_ids, theirs)) < 1e-4
        assert len(set(ours.token_ids)) >= 3, ours.token_ids  # the reference's tokens vary
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == len(outputs)  # every prompt is read
    return outputs


def test_a_batch_of_images_videos_and_text_gives_hfs_tokens_and_logprobs(llm, internvl_reference, images, clip):
    reqs = requests(llm.engine.processor, images, clip)
    outputs = assert_hfs(llm, internvl_reference, reqs)
    context = llm.engine.processor.mm_token_id
    counts = [o.prompt_token_ids.count(context) // 64 for o in outputs]  # tiles (or frames) of each prompt
    assert counts[0] > 1 and counts[1] == 1 and counts[3] == 0 and counts[4] == 4


@pytest.fixture(scope="module")
def tiny_large(tmp_path_factory) -> str:
    """InternVL3-38B/78B's tower: RMSNorm blocks, q/k RMSNorm, no q/k/v biases; untied embeddings."""
    return build_tiny_internvl(str(tmp_path_factory.mktemp("large")), large_vision=True, seed=LARGE_SEED)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> str:
    """InternVL3.5's Qwen3 decoder (q/k RMSNorm per head), in transformers 5's key layout (model.*, lm_head.*)."""
    return build_tiny_internvl(str(tmp_path_factory.mktemp("qwen3")), text_type="qwen3", layout="prefixed",
                               seed=QWEN3_SEED)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """The Llama-format decoder (InternVL3-9B's, InternVL2.5-8B's): no q/k/v biases."""
    return build_tiny_internvl(str(tmp_path_factory.mktemp("llama")), text_type="llama", seed=LLAMA_SEED)


@pytest.mark.parametrize("variant", ["tiny_large", "tiny_qwen3", "tiny_llama"])
def test_internvit_6b_switches_and_a_qwen3_decoder_give_hfs_tokens(variant, request, images):
    folder = request.getfixturevalue(variant)
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=4096)
    reqs = [r for i, r in enumerate(requests(llm.engine.processor, images, None)) if i in (0, 2)]
    assert_hfs(llm, reference(folder), reqs)


def test_the_cuda_code_path_gives_hf_tokens(tiny_large, images):
    """The kernels the CUDA platform chooses (fused norms, Triton RoPE + K/V store and paged decode) and graph mode's
    padded decode steps, through Triton's interpreter on CPU where there is no GPU, on the RMSNorm tower."""
    pytest.importorskip("triton")
    from vllm_utils.attention.triton_backend import TritonPagedAttention
    from vllm_utils.platforms.cuda import CudaPlatform

    llm = LLM(tiny_large, device="cpu", dtype="float32", max_model_len=1024)
    llm.engine.runner.choose_kernels(CudaPlatform())
    assert isinstance(llm.engine.runner.backend, TritonPagedAttention)
    uncaptured_graph_mode(llm)
    req = requests(llm.engine.processor, images, None)[1]  # one tile
    out = llm.generate(req, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference(tiny_large).greedy(req, 6, ignore_eos=True)


def test_tensor_parallel_2_gives_the_tokens_and_logprobs_of_1(tiny_large, images):
    """Each rank's q/k RMSNorm reduces its sum of squares over the ranks' heads."""
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0)
    single = LLM(tiny_large, device="cpu", dtype="float32", max_model_len=2048)
    req = requests(single.engine.processor, images, None)[0]
    expected = single.generate(req, params, use_tqdm=False)[0].outputs[0]
    parallel = LLM(tiny_large, device="cpu", dtype="float32", max_model_len=2048, tensor_parallel_size=2)
    got = parallel.generate(req, params, use_tqdm=False)[0].outputs[0]
    parallel.engine.shutdown()
    assert got.token_ids == expected.token_ids
    assert max(abs(a - b) for a, b in zip(chosen_logprobs(got), chosen_logprobs(expected))) < 1e-4


def test_prompts_prefilled_in_chunks_give_hfs_tokens(tiny_internvl, internvl_reference, images, clip):
    llm = LLM(tiny_internvl, device="cpu", dtype="float32", max_model_len=4096, max_num_batched_tokens=128)
    reqs = [requests(llm.engine.processor, images, clip)[i] for i in (2, 5)]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    assert len(outputs[0].prompt_token_ids) > 800  # two images of 7 tiles, over several chunks
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == internvl_reference.greedy(req, TOKENS, ignore_eos=True)


def test_bf16_logprobs_close_to_hf_fp32(tiny_internvl, internvl_reference, images):
    llm = LLM(tiny_internvl, device="cpu", dtype="bfloat16", max_model_len=4096)
    req = requests(llm.engine.processor, images, None)[0]
    out = llm.generate(req, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    assert_bf16_close(chosen_logprobs(out), tiny_internvl, req, out.token_ids, internvl_reference)


SIZES = [(20, 20), (90, 90), (224, 224), (300, 40), (33, 500), (600, 400), (640, 427), (1240, 1754), (2000, 100),
         (448, 224), (500, 499)]


def test_tiles_tokens_and_positions_equal_transformers_processor(internvl_reference, images):
    """Over sizes and aspect ratios: the tokens and tiles of transformers' InternVLProcessor, the tile count its
    image processor computes, the same tiles from the config alone, and each tile's 64 positions."""
    adapter, hf = internvl_reference.processor, internvl_reference.hf_processor
    fallback = adapter.fallback_image_processor()
    for width, height in SIZES:
        image = images[0].resize((width, height))
        prompt = adapter.chat_prompt("describe", 1)
        ids, ours = adapter.process(prompt, [image])
        theirs = hf(text=prompt, images=[image], return_tensors="pt")
        assert ids == theirs["input_ids"][0].tolist(), (width, height)
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"]), (width, height)
        tiles = hf.image_processor.get_number_of_image_patches(height, width, {"crop_to_patches": True})
        assert ours["tiles"].tolist() == [tiles] and adapter.item_positions(ours) == [64 * tiles]
        assert ids.count(adapter.mm_token_id) == 64 * tiles
        alone = fallback(images=[image], crop_to_patches=True, return_tensors="pt")["pixel_values"]
        assert torch.equal(ours["pixel_values"], alone), (width, height)
    two = [images[0], images[1].resize((90, 90))]
    prompt = internvl_reference.chat_prompt("describe", 2)  # transformers' chat template renders ours
    assert prompt == adapter.chat_prompt("describe", 2)
    ids, ours = adapter.process(prompt, two)
    theirs = hf(text=prompt, images=two, return_tensors="pt")
    assert ids == theirs["input_ids"][0].tolist() and torch.equal(ours["pixel_values"], theirs["pixel_values"])


@pytest.mark.parametrize("kwargs, tiles", [({"min_patches": 2, "max_patches": 4}, 5), ({"crop_to_patches": False}, 1)])
def test_mm_processor_kwargs_tile_as_transformers_processor(tiny_internvl, images, kwargs, tiles):
    """The tiling settings vLLM's mm_processor_kwargs pass: transformers' processor given the same, HF's tokens."""
    llm = LLM(tiny_internvl, device="cpu", dtype="float32", max_model_len=4096, mm_processor_kwargs=kwargs)
    req = requests(llm.engine.processor, images, None)[0]
    out = llm.generate(req, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt_token_ids.count(llm.engine.processor.mm_token_id) == 64 * tiles
    assert out.outputs[0].token_ids == reference(tiny_internvl, kwargs).greedy(req, TOKENS, ignore_eos=True)


def test_a_videos_text_is_the_processors(internvl_reference, clip):
    """`<video>` becomes InternVLProcessor's lines (`FrameN: <img>...</img>`), the frames one tile each at the
    tiles' size."""
    adapter, hf = internvl_reference.processor, internvl_reference.hf_processor
    prompt = adapter.chat_prompt("describe this video", 0, 1)
    ids, ours = adapter.process(prompt, [], [clip])
    frames = {"pixel_values_videos": [torch.zeros(len(clip), 3, 224, 224)]}
    expected = prompt.replace("<video>", hf.replace_video_token(frames, 0))
    assert ids == adapter.tokenizer(expected)["input_ids"]
    assert ours["pixel_values"].shape == (4, 3, 224, 224) and ours["tiles"].tolist() == [4]


def load_ours(folder: str) -> InternVLForConditionalGeneration:
    from vllm_utils.engine.model_runner import build_model
    from vllm_utils.loader import load_weights

    model = build_model(load_hf_config(folder), InternVLForConditionalGeneration, torch.device("cpu"), torch.float32)
    load_weights(model, folder, show_progress=False)
    return model


@pytest.mark.parametrize("switches", [
    dict(vision=dict(use_mean_pooling=False, use_absolute_position_embeddings=False), vision_layers=3),
    dict(large_vision=True, vision_layers=3, vision_feature_layer=-2),
    dict(vision_layers=3, vision_feature_layer=1),
], ids=["final_layernorm_no_positions", "second_to_last_layer", "first_layer"])
def test_vision_switches_give_transformers_features(switches, images, tmp_path):
    """The tower's output, shuffled and projected, against transformers' `get_image_features` for switches the
    published checkpoints do not use (their weights loaded from the same files)."""
    from transformers import AutoModelForImageTextToText

    folder = build_tiny_internvl(str(tmp_path / "m"), **switches)
    adapter = InternVLProcessorAdapter(folder, load_hf_config(folder))
    pixels = adapter.image_inputs([images[0]])["pixel_values"]
    hf = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = hf.model.get_image_features(pixel_values=pixels).pooler_output.flatten(0, 1)
        ours = load_ours(folder).encode_mm({"pixel_values": pixels})
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path, value, message", [
    ("vision_config.norm_type", "group_norm", "vision_config.norm_type 'group_norm'"),
    ("vision_config.hidden_act", "swish", "vision_config.hidden_act 'swish'"),
    ("vision_config.image_size", [224, 448], "vision_config.image_size [224, 448]"),
    ("vision_config.num_channels", 4, "vision_config.num_channels = 4"),
    ("vision_config.model_type", "siglip_vision_model", "vision_config.model_type 'siglip_vision_model'"),
    ("vision_feature_select_strategy", "full", "vision_feature_select_strategy 'full'"),
    ("vision_feature_layer", [-1, -2], "vision_feature_layer = [-1, -2]"),
    ("vision_feature_layer", 5, "vision_feature_layer = 5"),
    ("downsample_ratio", 0.3, "downsample_ratio = 0.3"),
    ("projector_hidden_act", "swish", "projector_hidden_act 'swish'"),
    ("text_config.model_type", "internlm2", "text_config.model_type 'internlm2'"),
])
def test_config_values_not_implemented_are_refused_by_name(tiny_internvl, path, value, message):
    config = load_hf_config(tiny_internvl)
    *parents, field = path.split(".")
    target = config
    for name in parents:
        target = getattr(target, name)
    setattr(target, field, value)
    with pytest.raises(UserError, match=re.escape(message)):
        InternVLForConditionalGeneration.check_config(config)


# ---- the command line -----------------------------------------------------------------------------
def test_demo_agrees_with_hf(tiny_internvl, images, tmp_path):
    images[0].save(tmp_path / "a.png")
    run = cli("--demo", f"--model={tiny_internvl}", f"--input-image={tmp_path / 'a.png'}", "--dtype=float32",
              "--device=cpu", "--output-len=12", "--reference=hf", "--prompt=describe the picture",
              cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == 1 and agreement["exact_match_rate"] == 1.0, agreement
    assert agreement["max_abs_dlogprob"] < 1e-4


def test_acc_on_the_bundled_sample_agrees_with_hf_fp32(tiny_internvl, tmp_path):
    run = cli("--acc", f"--model={tiny_internvl}", "--device=cpu", "--dtype=float32", "--dataset=sample-jsonl",
              "--reference=hf", "--output-len=8", "--batch-size=3", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    ref = info["reference"]
    assert ref["samples_compared"] == 3 and ref["exact_match_rate"] == 1.0 and ref["max_abs_dlogprob"] < 1e-4


@pytest.mark.parametrize("args, tokens", [
    (["--input-vision-shape=300,900"], "tokens per request: 256 image + 384 text"),  # 3 x 1 tiles and a thumbnail
    (["--num-frames=3"], "tokens per request: 192 video + 448 text"),  # 3 frames of one tile
])
def test_perf_runs_on_the_tiny_folder(tiny_internvl, tmp_path, args, tokens):
    run = cli("--perf", f"--model={tiny_internvl}", "--device=cpu", "--dtype=float32", "--input-len=640",
              "--output-len=4", "--num-prompts=2", *args, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert tokens in run.stdout, run.stdout


@pytest.fixture(scope="module")
def video_file(tmp_path_factory, clip) -> str:
    av = pytest.importorskip("av")
    path = str(tmp_path_factory.mktemp("video") / "clip.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 120, 90, "yuv420p"
        for frame in np.concatenate([clip, clip]):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def test_demo_with_a_video_agrees_with_hf(tiny_internvl, video_file, tmp_path):
    run = cli("--demo", f"--model={tiny_internvl}", f"--input-video={video_file}", "--num-frames=4", "--dtype=float32",
              "--device=cpu", "--output-len=12", "--reference=hf", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["exact_match_rate"] == 1.0 and agreement["max_abs_dlogprob"] < 1e-4, agreement


@pytest.mark.parametrize("name", ["OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-8B-hf",
                                  "OpenGVLab/InternVL3_5-1B-HF"])
def test_the_bundled_configs_build_transformers_parameters_on_meta(name):
    """Every parameter transformers builds for the bundled configuration, no other."""
    from transformers import AutoModelForImageTextToText

    from vllm_utils.config import load_hf_config
    from vllm_utils.engine.model_runner import build_model

    config = load_hf_config(name)
    ours = build_model(config, InternVLForConditionalGeneration, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        theirs = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert ours.num_tile_features == 256


def test_internvit_6b_switches_build_transformers_parameters_on_meta():
    """InternViT-6B's switches (InternVL3-38B/78B) at full size: every parameter transformers builds, no other."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vllm_utils.engine.model_runner import build_model

    vision = dict(hidden_size=3200, intermediate_size=12800, num_attention_heads=25, num_hidden_layers=45,
                  use_qk_norm=True, norm_type="rms_norm", attention_bias=False)
    text = dict(model_type="qwen2", hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
                num_key_value_heads=8, num_hidden_layers=2, vocab_size=151674)
    config = AutoConfig.for_model("internvl", vision_config=vision, text_config=text, tie_word_embeddings=False)
    ours = build_model(config, InternVLForConditionalGeneration, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        theirs = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_the_default_model_is_the_tiny_one(tmp_path):
    """--model-type internvl without --model: the tiny random model, built once and cached."""
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first = cli("--demo", "--model-type=internvl", "--device=cpu", "--output-len=4", env=env)
    assert first.returncode == 0, first.stderr
    assert "built a tiny internvl with RANDOM weights" in first.stderr and first.stdout.count("Generated text: ") == 1
    again = cli("--perf", "--model-type=internvl", "--device=cpu", "--input-len=400", "--output-len=2",
                "--no-save-result", env=env)
    assert again.returncode == 0 and "***Perf Info***" in again.stdout, again.stderr
