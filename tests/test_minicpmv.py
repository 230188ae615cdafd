"""MiniCPM-V 4.6 against transformers' model on a tiny random checkpoint of its layout (a SigLIP tower with the
window merger inside it, the merger, Qwen3.5's hybrid decoder with a recurrent state per sequence): an image of
several slices, a small one of none, two in one prompt, text alone, in one batch; prompts prefilled in chunks (the
state carried from chunk to chunk); preemption (the state recomputed); tensor parallelism; the slices, tokens and
pixels against transformers' own MiniCPMV4_6Processor (built here without the torchvision video processor it cannot
build); videos (frames cut as images, into the video token's positions) against transformers' model fed our inputs,
their frame sampling and placeholder text against the video processor's and processor's own code; the CLI; refusals
by name (config values). MiniCPM-V 4.7 (canvas M-RoPE) is tested in test_minicpmv4_7.py."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_utils import LLM, SamplingParams
from vllm_utils.config import load_hf_config
from vllm_utils.errors import UserError
from vllm_utils.models.minicpmv import MiniCPMV4_6ForConditionalGeneration
from vllm_utils.multimodal.minicpmv import MiniCPMVProcessorAdapter, sample_frame_indices, split_items
from vllm_utils.multimodal.video import VideoClip
from vllm_utils.testing.tiny_minicpmv import VARIED_SEED, build_tiny_minicpmv

from conftest import HFReference, chosen_logprobs
from test_cli import cli

TOKENS = 8


def hf_processor(folder: str, processor_class: type | None = None):
    """transformers' MiniCPMV4_6Processor (or `processor_class`: 4.7's) of the folder, its video processor built
    without the class check that needs torchvision (it never runs here)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    class ImagesOnly(processor_class or MiniCPMV4_6Processor):
        def check_argument_for_proper_class(self, name, argument):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, argument)

    with open(f"{folder}/chat_template.jinja") as f:
        template = f.read()
    return ImagesOnly(image_processor=AutoImageProcessor.from_pretrained(folder),
                      video_processor=MiniCPMV4_6VideoProcessor(), tokenizer=AutoTokenizer.from_pretrained(folder),
                      chat_template=template)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_minicpmv(str(tmp_path_factory.mktemp("minicpmv")), seed=VARIED_SEED)


@pytest.fixture(scope="module")
def reference(tiny) -> HFReference:
    """HF's model, fed HF's own processor's tokens and pixels."""
    adapter = MiniCPMVProcessorAdapter(tiny, load_hf_config(tiny))
    adapter.hf_processor = hf_processor(tiny)
    return HFReference(tiny, processor=adapter)


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    return LLM(tiny, device="cpu", dtype="float32", max_model_len=2048)


def requests(adapter, images) -> list[dict]:
    """An image of several slices, a small one (a thumbnail alone), two images, text alone."""
    cases = [("describe the picture", [images[0]]), ("what is in this image ?", [images[1].resize((90, 90))]),
             ("compare the two pictures", [images[0], images[1].resize((300, 120))]), ("a photo of a cat", [])]
    return [{"prompt": adapter.chat_prompt(text, len(ims)), "multi_modal_data": {"image": ims}} for text, ims in cases]


@pytest.fixture(scope="module")
def expected(reference, llm, images) -> list[list[int]]:
    return [reference.greedy(req, TOKENS, ignore_eos=True) for req in requests(llm.engine.processor, images)]


def test_a_batch_of_images_and_text_gives_hf_tokens_and_logprobs(llm, reference, images, expected):
    reqs = requests(llm.engine.processor, images)
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0),
                           use_tqdm=False)
    for req, out, theirs in zip(reqs, outputs, expected):
        ours = out.outputs[0]
        assert ours.token_ids == theirs
        their_logprobs = reference.token_logprobs(req, ours.token_ids)
        assert max(abs(a - b) for a, b in zip(chosen_logprobs(ours), their_logprobs)) < 1e-4
    assert min(len(set(t)) for t in expected) > 3, expected  # the reference does not repeat itself
    assert len({tuple(t) for t in expected}) == len(expected)  # every prompt is read, its pictures included
    slices = [o.prompt_token_ids.count(llm.engine.processor.tokenizer.convert_tokens_to_ids("<slice>"))
              for o in outputs]
    assert slices[0] > 1 and slices[1] == 0 and slices[3] == 0
    manager = llm.engine.block_manager  # every state slot came back
    assert sorted(manager.free_state_slots) == list(range(manager.num_state_slots))


SIZES = [(600, 400), (90, 90), (300, 120), (33, 500), (1240, 300), (500, 499)]


@pytest.mark.parametrize("settings", [{}, {"use_image_id": False, "max_slice_nums": 4}])
def test_slices_tokens_and_pixels_equal_transformers_processor(tiny, reference, images, settings):
    """Several images of many shapes in one prompt (slices of different grids): transformers' token ids, pixel
    strip and slice grids; each image's positions as the model's features count them."""
    adapter = MiniCPMVProcessorAdapter(tiny, load_hf_config(tiny), processor_kwargs=settings)
    pictures = [images[i % 2].resize(size) for i, size in enumerate(SIZES)]
    prompt = adapter.chat_prompt("describe", len(pictures))
    ids, ours = adapter.process(prompt, pictures)
    theirs = reference.hf_processor(text=prompt, images=pictures, return_tensors="pt", **settings)
    assert ids == theirs["input_ids"][0].tolist()
    hf_inputs = adapter.hf_model_inputs(ours)
    assert torch.equal(hf_inputs["pixel_values"], theirs["pixel_values"])
    assert torch.equal(hf_inputs["target_sizes"], theirs["target_sizes"])
    assert len({tuple(s) for s in ours["target_sizes"].tolist()}) > 2  # slices of several shapes
    assert sum(adapter.item_positions(ours)) == ids.count(adapter.mm_token_id)
    assert ("<image_id>" in adapter.tokenizer.decode(ids)) == settings.get("use_image_id", True)


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_image_features_equal_transformers_in_both_downsample_modes(tiny, reference, images, mode):
    """The tower (its window merger skipped in "4x") and the merger against transformers' `get_image_features`,
    on slices of several shapes."""
    from vllm_utils.loader import load_weights

    config = load_hf_config(tiny)
    config.downsample_mode = mode
    model = MiniCPMV4_6ForConditionalGeneration(config).eval()
    load_weights(model, tiny, show_progress=False)
    adapter = reference.processor
    mm = adapter.image_inputs([images[0].resize((300, 120)), images[1].resize((90, 200))])
    hf = adapter.hf_model_inputs(mm)
    with torch.no_grad():
        ours = model.encode_mm(mm)
        theirs = torch.cat(reference.model.model.get_image_features(hf["pixel_values"], hf["target_sizes"],
                                                                    downsample_mode=mode).pooler_output)
    assert ours.shape == theirs.shape and ours.shape[0] == int(mm["target_sizes"].prod(-1).sum()) // int(mode[:-1])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_prompts_prefilled_in_chunks_carry_their_state_and_give_hf_tokens(tiny, images, expected):
    """Chunks of 16 tokens (boundaries inside images and in text), two prompts sharing the steps."""
    llm = LLM(tiny, device="cpu", dtype="float32", max_model_len=2048, max_num_batched_tokens=16)
    reqs = requests(llm.engine.processor, images)
    outputs = llm.generate([reqs[i] for i in (0, 2)], SamplingParams(temperature=0, max_tokens=TOKENS,
                                                                     ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [expected[i] for i in (0, 2)]
    assert all(len(o.prompt_token_ids) > 32 for o in outputs)


def test_preempted_requests_recompute_their_state(tiny, llm, images, expected):
    """A pool with room for every prompt but not for all of them to grow: running requests are preempted, and
    their state is rebuilt from their tokens."""
    reqs = requests(llm.engine.processor, images)
    lengths = [len(o.prompt_token_ids) for o in llm.generate(reqs, SamplingParams(max_tokens=1), use_tqdm=False)]
    blocks = sum(-(-n // 16) for n in lengths) + 1
    small = LLM(tiny, device="cpu", dtype="float32", max_model_len=max(lengths) + TOKENS, num_kv_blocks=blocks,
                block_size=16)
    outputs = small.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_tensor_parallel_2_gives_the_tokens_of_1(tiny, llm, images, expected):
    """Each rank's share of the vision heads and MLPs, the window merger's and merger's widths, the decoder's."""
    reqs = requests(llm.engine.processor, images)[2:]
    parallel = LLM(tiny, device="cpu", dtype="float32", max_model_len=2048, tensor_parallel_size=2)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in parallel.generate(reqs, params, use_tqdm=False)]
    parallel.engine.shutdown()
    assert got == expected[2:]


@pytest.mark.parametrize("path,value,message", [
    ("downsample_mode", "64x", "downsample_mode '64x'"),
    ("merger_times", 2, "merger_times = 2"),
    ("merge_kernel_size", [3, 3], "merge_kernel_size = [3, 3]"),
    ("drop_vision_last_layer", True, "drop_vision_last_layer = True"),
    ("insert_layer_id", 7, "insert_layer_id = 7"),
    ("vision_config.window_kernel_size", [4, 4], "vision_config.window_kernel_size = [4, 4]"),
    ("vision_config.num_channels", 4, "vision_config.num_channels = 4"),
    ("vision_config.hidden_act", "tanh", "vision_config.hidden_act 'tanh'"),
    ("text_config.layer_types", ["linear_attention"] * 4, "at least one full_attention layer"),
    ("text_config.model_type", "qwen3_vl_text", "text_config.model_type 'qwen3_vl_text'"),
])
def test_config_values_not_implemented_are_refused_by_name(tiny, path, value, message):
    config = load_hf_config(tiny)
    *parents, field = path.split(".")
    target = config
    for name in parents:
        target = getattr(target, name)
    setattr(target, field, value)
    if path == "insert_layer_id":
        config.vision_config.insert_layer_id = value
    with pytest.raises(UserError, match=re.escape(message)):
        MiniCPMV4_6ForConditionalGeneration.check_config(config)


BUNDLED = Path(__file__).resolve().parents[1] / "vllm_utils" / "bundled" / "MiniCPM-V-4.6"


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="no bundled MiniCPM-V-4.6 configuration")
def test_the_published_config_builds_every_transformers_parameter_on_meta():
    """openbmb/MiniCPM-V-4.6's configuration (tied embeddings, 27 vision layers, 24 decoder layers): every tensor
    of transformers' model has a parameter here, and the counts agree."""
    from transformers import AutoModelForImageTextToText

    from vllm_utils.engine.model_runner import build_model
    from vllm_utils.loader import expected_targets, resolve_target, targets_filled

    config = load_hf_config(str(BUNDLED))
    ours = build_model(config, MiniCPMV4_6ForConditionalGeneration, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        theirs = AutoModelForImageTextToText.from_config(config)
    params, filled = dict(ours.named_parameters(remove_duplicate=False)), set()
    for key in theirs.state_dict():
        name, shard = resolve_target(ours, key)
        assert name in params, key
        filled.update(targets_filled(ours, name, shard))
    assert filled >= expected_targets(ours)  # (and the LM head, tied to the embeddings)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) and abs(count - 1.30e9) < 0.01e9


def small_clip(images) -> np.ndarray:
    """Three small frames (a thumbnail each, no slices), cut from one picture at moving places."""
    big = np.asarray(images[1].resize((200, 150)))
    return np.stack([big[i * 6:i * 6 + 90, i * 10:i * 10 + 120] for i in range(3)])


@pytest.fixture(scope="module")
def clip(images) -> np.ndarray:
    return small_clip(images)


def video_requests(adapter, images, clip) -> list[dict]:
    """A video alone; an image then a video (frames of 600 x 400: each a thumbnail and slices) in one prompt."""
    wide = np.stack([np.asarray(images[0].resize((600, 400)))] * 2)
    wide[1] = wide[1][::-1]
    return [{"prompt": adapter.chat_prompt("describe the video", 0, 1), "multi_modal_data": {"video": clip}},
            {"prompt": adapter.chat_prompt("compare them", 1, 1),
             "multi_modal_data": {"image": [images[1].resize((90, 90))], "video": wide}}]


def test_videos_and_a_batch_mixing_a_video_with_an_image_give_hf_tokens(tiny, llm, images, clip):
    """HF's model fed our processed inputs (its video processor needs torchvision): the frames' features in the
    video token's positions, images' in the image token's."""
    reference = HFReference(tiny, processor=MiniCPMVProcessorAdapter(tiny, load_hf_config(tiny)), hf_processor=False)
    reqs = video_requests(llm.engine.processor, images, clip) + requests(llm.engine.processor, images)[1:2]
    expected = [reference.greedy(req, TOKENS, ignore_eos=True) for req in reqs]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0),
                           use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for req, out in zip(reqs, outputs):
        theirs = reference.token_logprobs(req, out.outputs[0].token_ids)
        assert max(abs(a - b) for a, b in zip(chosen_logprobs(out.outputs[0]), theirs)) < 1e-4
    assert len({tuple(t) for t in expected}) == len(expected)
    tokenizer = llm.engine.processor.tokenizer
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert all(video_id in o.prompt_token_ids for o in outputs[:2])
    assert outputs[1].prompt_token_ids.count(tokenizer.convert_tokens_to_ids("<slice>")) > 2
    # the frames matter: the same video reversed reads differently
    flipped = dict(reqs[0], multi_modal_data={"video": clip[::-1].copy()})
    got = llm.generate([flipped], SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    assert got[0].outputs[0].token_ids == reference.greedy(flipped, TOKENS, ignore_eos=True)


@pytest.mark.parametrize("size", [(90, 120), (400, 600)])
def test_a_videos_text_and_sizes_are_minicpmv4_6_processors(tiny, llm, images, size):
    """Each frame's thumbnail and slices as MiniCPMV4_6VideoProcessor sizes them (its find_best_resize,
    get_sliced_grid, get_refine_size), and the prompt's text as MiniCPMV4_6Processor.replace_video_token and
    _prepend_local_ids write it, a video and an image each counted from 0."""
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    adapter = llm.engine.processor
    frames = np.stack([np.asarray(images[0].resize(size[::-1]))] * 2)
    prompt = adapter.chat_prompt("describe", 1, 1)
    ids, mm = adapter.process(prompt, [images[1].resize((90, 90))], [frames])
    image_item, video = split_items(mm)
    stored = json.loads(Path(f"{tiny}/video_preprocessor_config.json").read_text())
    hf_video = MiniCPMV4_6VideoProcessor(**{k: v for k, v in stored.items() if k != "video_processor_type"})
    grid = hf_video.get_sliced_grid(size, hf_video.max_slice_nums, hf_video.scale_resolution)
    p = hf_video.patch_size
    source = hf_video.find_best_resize(size, hf_video.scale_resolution, p, allow_upscale=grid is None)
    sizes = [[source[0] // p, source[1] // p]]
    if grid is not None:
        refine = hf_video.get_refine_size(size, grid, hf_video.scale_resolution, p, allow_upscale=True)
        sizes += [[refine[0] // grid[0] // p, refine[1] // grid[1] // p]] * (grid[0] * grid[1])
    assert video["target_sizes"].tolist() == sizes * 2
    assert video["grids"][0].tolist() == list(grid or (0, 0))
    processor = hf_processor(tiny)
    inputs = {"target_sizes_videos": video["target_sizes"].numpy(), "num_frames_per_video": [2],
              "grids_videos": np.array([grid or (0, 0)] * 2)}
    text = processor.replace_video_token(inputs, video_idx=0, video_token_divisor=16)
    image_text = processor.replace_image_token(
        {"grids": image_item["grids"].numpy(), "num_patches_per_image": [1],
         "target_sizes": image_item["target_sizes"].numpy()}, image_idx=0, image_token_divisor=16)
    image_text = processor._prepend_local_ids([prompt], [image_text], "<|image_pad|>")[0]
    text = processor._prepend_local_ids([prompt], [text], "<|video_pad|>")[0]
    assert "<image_id>0</image_id>" in text and ("<slice>" in text) == (grid is not None)
    expanded = prompt.replace("<|image_pad|>", image_text).replace("<|video_pad|>", text)
    assert ids == processor.tokenizer(expanded)["input_ids"]


def test_frames_are_sampled_as_minicpmv4_6s_video_processor_samples(tiny, llm, clip):
    """A clip of every frame of its file: a frame a second (ours against MiniCPMV4_6VideoProcessor.sample_frames,
    whatever num_frames or fps are asked); frames given without a rate are taken as sampled."""
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor
    from transformers.video_utils import VideoMetadata

    hf_video = MiniCPMV4_6VideoProcessor()
    for total, fps, most in [(24, 1.0, 128), (75, 30.0, 128), (100, 24.0, 128), (1000, 2.0, 16), (7, 2.5, 3)]:
        metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
        theirs = hf_video.sample_frames(metadata, max_num_frames=most, num_frames=4, fps=2)
        assert sample_frame_indices(total, fps, most) == [int(i) for i in theirs], (total, fps)
    adapter = llm.engine.processor
    assert adapter.max_num_frames == 64  # the folder's video processor's
    every = np.stack([clip[i % 3] + i for i in range(12)])
    taken = adapter.video_frames(VideoClip(every, fps=4.0, total_frames=12))
    assert np.array_equal(taken, every[[0, 4, 8]])
    assert np.array_equal(adapter.video_frames(every), every)  # frames given are taken as sampled
    assert np.array_equal(adapter.video_frames(VideoClip(every[:4], fps=4.0, total_frames=12)), every[:4])


def test_demo_gives_hf_tokens(tiny, tmp_path, images):
    images[0].save(tmp_path / "a.png")
    run = cli("--demo", f"--model={tiny}", f"--input-image={tmp_path / 'a.png'}", "--dtype=float32",
              "--device=cpu", "--output-len=8", "--reference=hf", "--prompt=describe the picture", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == 1 and agreement["exact_match_rate"] == 1.0, agreement
    assert agreement["max_abs_dlogprob"] < 1e-4


def test_acc_on_the_bundled_sample_agrees_with_hf_fp32(tiny, tmp_path):
    run = cli("--acc", f"--model={tiny}", "--device=cpu", "--dtype=float32", "--dataset=sample-jsonl",
              "--reference=hf", "--output-len=6", "--batch-size=3", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    ref = info["reference"]
    assert ref["samples_compared"] == 3 and ref["exact_match_rate"] == 1.0 and ref["max_abs_dlogprob"] < 1e-4
