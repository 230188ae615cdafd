"""GLM-4.1V against transformers' model on a tiny random checkpoint shaped like the hub's: images of different
sizes, several per prompt, videos, text alone, one batch mixing them, prompts prefilled in chunks; the processing
against transformers' own processor; the positions and the vision tower against transformers' own; the CLI.
(transformers' forward refuses an image and a video in one prompt, counting the video's frames as images: its own
parts run that one.)"""
import glob
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_utils import LLM, SamplingParams
from vllm_utils.errors import UserError
from vllm_utils.models.glm4v import Glm4vForConditionalGeneration
from vllm_utils.multimodal.video import VideoClip
from vllm_utils.testing.tiny_glm4v import VARIED_SEED, build_tiny_glm4v

from conftest import HFReference, assert_bf16_close, chosen_logprobs, uncaptured_graph_mode
from test_cli import cli, error_lines
from test_perf import SEED_KEYS, perf_info

TOKENS = 24  # past EOS too: both sides ignore it, neither masks it


@pytest.fixture(scope="module")
def tiny_glm4v(tmp_path_factory) -> str:
    return build_tiny_glm4v(str(tmp_path_factory.mktemp("glm4v")), seed=VARIED_SEED)


@pytest.fixture(scope="module")
def glm_reference(tiny_glm4v) -> HFReference:
    return HFReference(tiny_glm4v)


@pytest.fixture(scope="module")
def llm(tiny_glm4v) -> LLM:
    return LLM(tiny_glm4v, device="cpu", dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def clip(images) -> np.ndarray:
    """Six frames of a moving crop of a photo, 90 x 120 (not a multiple of 28: the processor resizes)."""
    big = np.asarray(images[1].resize((200, 150)))
    return np.stack([big[i * 6 : i * 6 + 90, i * 10 : i * 10 + 120] for i in range(6)])


def prompts(adapter, images: list[Image.Image], clip: np.ndarray) -> list[dict]:
    """One image, two images of different sizes in one prompt, a wide image, a video's frames given without a rate
    and decoded from a file of 12 frames at 3 a second, text alone."""
    cases = [("describe the picture", [images[0]], []),
             ("what is in this image ?", [images[0], images[1].resize((100, 180))], []),
             ("describe the picture in detail", [images[1].resize((300, 120))], []),
             ("describe this video", [], [clip]),
             ("what happens after the dog jumps ?", [], [VideoClip(clip, fps=3.0, total_frames=12)]),
             ("a cup of coffee on a wooden table", [], [])]
    return [{"prompt": adapter.chat_prompt(text, len(ims), len(vids)),
             "multi_modal_data": {"image": ims, "video": vids}} for text, ims, vids in cases]


def test_images_of_any_size_several_per_prompt_videos_and_text_give_hf_tokens_and_logprobs(llm, glm_reference,
                                                                                          images, clip):
    """All six prompts in one batch: HF's greedy tokens, and HF's log-prob of each within 1e-4."""
    reqs = prompts(llm.engine.processor, images, clip)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(reqs, params, use_tqdm=False)
    variety = []
    for req, out in zip(reqs, outputs):
        tokens = out.outputs[0].token_ids
        assert tokens == glm_reference.greedy(req, TOKENS, ignore_eos=True)
        reference = glm_reference.token_logprobs(req, tokens)
        assert max(abs(a - b) for a, b in zip(chosen_logprobs(out.outputs[0]), reference)) < 1e-4
        variety.append(len(set(tokens)))
    assert min(variety) > 3, variety  # the reference does not repeat itself
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == len(outputs)  # the prompts answer differently


def test_an_image_and_a_video_in_one_prompt_give_hf_tokens(llm, glm_reference, images, clip):
    """transformers' forward refuses the mix (it counts the video's frames as images), so its own parts run it:
    the image and video features, scattered into the embeddings by token type, its positions, its decoder, teacher
    forced on our tokens: each is its argmax, its log-prob within 1e-4."""
    adapter = llm.engine.processor
    req = {"prompt": adapter.chat_prompt("describe this video", 1, 1),
           "multi_modal_data": {"image": [images[0]], "video": [VideoClip(clip, fps=3.0, total_frames=12)]}}
    out = llm.generate([req], SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0]
    tokens = out.outputs[0].token_ids
    ids, mm = adapter.process(req["prompt"], *[req["multi_modal_data"][k] for k in ("image", "video")])
    model, hf = glm_reference.model, glm_reference.model.model
    inputs = adapter.hf_model_inputs(mm)
    full = torch.tensor([ids + tokens])
    kinds = adapter.hf_token_inputs(full)["mm_token_type_ids"]
    with torch.inference_mode():
        embeds = hf.get_input_embeddings()(full)
        embeds[kinds == 1] = torch.cat(hf.get_image_features(inputs["pixel_values"],
                                                             inputs["image_grid_thw"]).pooler_output)
        embeds[kinds == 2] = torch.cat(hf.get_video_features(inputs["pixel_values_videos"],
                                                             inputs["video_grid_thw"]).pooler_output)
        positions, _ = hf.get_rope_index(full, kinds, image_grid_thw=inputs["image_grid_thw"],
                                         video_grid_thw=inputs["video_grid_thw"])
        logits = model(inputs_embeds=embeds, position_ids=positions).logits[0, len(ids) - 1 : -1]
    assert logits.argmax(-1).tolist() == tokens and len(set(tokens)) > 3
    reference = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(chosen_logprobs(out.outputs[0]), reference)) < 1e-4


def test_prompts_prefilled_in_chunks_give_hf_tokens(tiny_glm4v, glm_reference, images, clip):
    """Chunks of 16 tokens: each image's positions and the video's frames span several chunks."""
    llm = LLM(tiny_glm4v, device="cpu", dtype="float32", max_model_len=1024, max_num_batched_tokens=16)
    reqs = [prompts(llm.engine.processor, images, clip)[i] for i in (1, 4)]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for req, out in zip(reqs, outputs):
        assert len(out.prompt_token_ids) > 32
        assert out.outputs[0].token_ids == glm_reference.greedy(req, 12, ignore_eos=True)


def test_the_cuda_code_path_gives_hf_tokens(tiny_glm4v, glm_reference, images, clip):
    """The kernels the CUDA platform chooses (the fused Triton RoPE of three position rows over our tables + K/V
    store, Triton paged decode, fused norms) and graph mode's padded decode steps, through Triton's interpreter on
    CPU where there is no GPU."""
    pytest.importorskip("triton")
    from vllm_utils.attention.triton_backend import TritonPagedAttention
    from vllm_utils.platforms.cuda import CudaPlatform

    llm = LLM(tiny_glm4v, device="cpu", dtype="float32", max_model_len=1024)
    llm.engine.runner.choose_kernels(CudaPlatform())
    assert isinstance(llm.engine.runner.backend, TritonPagedAttention)
    uncaptured_graph_mode(llm)
    reqs = prompts(llm.engine.processor, images, clip)[1:2]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == glm_reference.greedy(req, 6, ignore_eos=True)


def test_bf16_logprobs_close_to_hf_fp32(tiny_glm4v, glm_reference, images, clip):
    llm = LLM(tiny_glm4v, device="cpu", dtype="bfloat16", max_model_len=1024)
    for req in [prompts(llm.engine.processor, images, clip)[i] for i in (1, 4)]:
        out = llm.generate([req], SamplingParams(temperature=0, max_tokens=16, logprobs=0, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
        assert_bf16_close(chosen_logprobs(out), tiny_glm4v, req, out.token_ids, glm_reference)


def test_tensor_parallel_2_gives_the_tokens_of_1(tiny_glm4v, llm, images, clip):
    """Each rank's share of heads keeps its channels in our RoPE order; the merger's projection is whole on each."""
    reqs = [prompts(llm.engine.processor, images, clip)[i] for i in (1, 4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    single = [o.outputs[0].token_ids for o in llm.generate(reqs, params, use_tqdm=False)]
    parallel = LLM(tiny_glm4v, device="cpu", dtype="float32", max_model_len=1024, tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in parallel.generate(reqs, params, use_tqdm=False)] == single
    parallel.engine.shutdown()


def hf_processor(folder: str):
    """transformers' Glm4vProcessor of the folder, built around its constructor, which refuses to run without
    torchvision (for a video processor these prompts do not use)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = Glm4vProcessor.__new__(Glm4vProcessor)
    token = tokenizer.convert_tokens_to_ids
    vars(processor).update(image_processor=AutoImageProcessor.from_pretrained(folder), tokenizer=tokenizer,
                           video_processor=None, chat_template=None, image_token="<|image|>",
                           video_token="<|video|>", image_token_id=token("<|image|>"),
                           video_token_id=token("<|video|>"), video_start_id=token("<|begin_of_video|>"),
                           video_end_id=token("<|end_of_video|>"))
    return processor


@pytest.mark.parametrize("sizes", [[(5, 5)], [(13, 100)], [(28, 28)], [(100, 60)], [(224, 224)], [(500, 300)],
                                   [(60, 700)], [(1000, 1000)], [(640, 480), (90, 120)]])
def test_tokens_pixels_and_positions_equal_transformers_processor(llm, tiny_glm4v, images, sizes):
    """Images below a patch, beyond the pixel limit, long and thin, two in one prompt: our token ids (each image's
    placeholder repeated for its positions), pixel rows, grids and token types are those of Glm4vProcessor."""
    adapter = llm.engine.processor
    pictures = [images[i % 2].resize(size) for i, size in enumerate(sizes)]
    prompt = adapter.chat_prompt("describe", len(pictures))
    ids, mm = adapter.process(prompt, pictures)
    hf = hf_processor(tiny_glm4v)(text=prompt, images=pictures, return_tensors="pt")
    assert ids == hf["input_ids"][0].tolist()
    assert torch.equal(mm["pixel_values"], hf["pixel_values"]) and torch.equal(mm["grid_thw"], hf["image_grid_thw"])
    assert torch.equal(adapter.hf_token_inputs(torch.tensor([ids]))["mm_token_type_ids"], hf["mm_token_type_ids"])
    assert sum(adapter.item_positions(mm)) == ids.count(adapter.mm_token_id)


def test_positions_and_vision_tower_equal_transformers(llm, glm_reference, images, clip):
    """The three position rows of a prompt with two images and a video, the offset of generated tokens, and the
    tower's features of all three in one batch, against transformers' own."""
    adapter, model = llm.engine.processor, llm.engine.runner.model
    video = VideoClip(clip, fps=3.0, total_frames=12)
    ids, mm = adapter.process(adapter.chat_prompt("describe", 2, 1), [images[0], images[1].resize((300, 120))],
                              [video])
    hf = glm_reference.model.model
    hf_inputs = adapter.hf_model_inputs(mm)
    kinds = adapter.hf_token_inputs(torch.tensor([ids]))["mm_token_type_ids"]
    expected, delta = hf.get_rope_index(torch.tensor([ids]), kinds, image_grid_thw=hf_inputs["image_grid_thw"],
                                        video_grid_thw=hf_inputs["video_grid_thw"])
    positions, offset = model.rope_positions([t in model.mm_token_ids for t in ids], mm)
    assert torch.equal(positions, expected[:, 0]) and offset == int(delta) < 0
    with torch.inference_mode():
        ours = model.encode_mm(mm)
        image = torch.cat(hf.get_image_features(hf_inputs["pixel_values"], hf_inputs["image_grid_thw"]).pooler_output)
        frames = torch.cat(hf.get_video_features(hf_inputs["pixel_values_videos"],
                                                 hf_inputs["video_grid_thw"]).pooler_output)
    torch.testing.assert_close(ours, torch.cat([image, frames]), rtol=1e-5, atol=1e-5)  # the prompt's order


@pytest.mark.parametrize("given", ["frames", "clip"])
def test_a_videos_text_is_glm4v_processors(llm, tiny_glm4v, clip, given):
    """Each temporal patch's positions and the second it starts at, as Glm4vProcessor writes them: frames without a
    rate at transformers' 24 a second, a decoded clip at the times of the frames sampled from its file."""
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
    from transformers.video_utils import VideoMetadata

    adapter = llm.engine.processor
    video = clip if given == "frames" else VideoClip(clip, fps=1.0, total_frames=24)  # frames 0, 4, 8, ...: 4 s apart
    prompt = adapter.chat_prompt("describe", 0, 1)
    ids, mm = adapter.process(prompt, [], [video])
    processor = hf_processor(tiny_glm4v)
    processor.video_processor = SimpleNamespace(merge_size=adapter.merge)
    indices = list(range(6)) if given == "frames" else list(range(0, 24, 4))
    metadata = VideoMetadata(total_num_frames=len(indices), fps=None if given == "frames" else 1.0,
                             frames_indices=indices)
    text = Glm4vProcessor.replace_video_token(processor, {"video_grid_thw": mm["grid_thw"],
                                                          "video_metadata": [metadata]}, 0)
    assert ids == processor.tokenizer(prompt.replace("<|video|>", text))["input_ids"]
    assert (given == "clip") == ("<|end_of_image|>8" in text)


def test_a_video_of_one_picture_twice_is_that_image(llm, images):
    """Two equal frames resize to the image's size and patch as the image processor patches one picture."""
    adapter = llm.engine.processor
    picture = images[0].resize((150, 100))
    video = adapter.video_inputs(np.stack([np.asarray(picture)] * 2))
    image = adapter.image_inputs([picture])
    assert torch.equal(video["grid_thw"], image["grid_thw"])
    assert torch.equal(video["pixel_values"], image["pixel_values"])


def test_the_bundled_config_builds_every_transformers_parameter_on_meta():
    """GLM-4.1V-9B-Thinking's bundled configuration: as many parameters as transformers' model of it holds."""
    from transformers import Glm4vForConditionalGeneration as HFGlm4v

    from vllm_utils.config import load_hf_config
    from vllm_utils.engine.model_runner import build_model

    config = load_hf_config("zai-org/GLM-4.1V-9B-Thinking")
    ours = build_model(config, Glm4vForConditionalGeneration, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        theirs = HFGlm4v(config)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) and abs(count - 10.29e9) < 0.01e9


@pytest.mark.parametrize("path, value, message", [
    ("text_config.rope_parameters.rope_type", "linear", "text_config.rope_parameters.rope_type = 'linear'"),
    ("text_config.rope_parameters.partial_rotary_factor", 0.3, "text_config.partial_rotary_factor = 0.3"),
    ("text_config.rope_parameters.mrope_section", [2, 2, 2], "text_config.rope_parameters.mrope_section"),
    ("text_config.hidden_act", "swish", "text_config.hidden_act 'swish'"),
    ("vision_config.rope_parameters.rope_type", "default", "vision_config.rope_parameters.rope_type 'default'"),
    ("vision_config.out_hidden_size", 32, "vision_config.out_hidden_size 32 differs"),
    ("vision_config.in_channels", 4, "vision_config.in_channels = 4"),
])
def test_config_values_not_implemented_are_refused_by_name(tiny_glm4v, path, value, message):
    from vllm_utils.config import load_hf_config

    config = load_hf_config(tiny_glm4v)
    *parents, field = path.split(".")
    target = config
    for name in parents:
        target = target[name] if isinstance(target, dict) else getattr(target, name)
    if isinstance(target, dict):
        target[field] = value
    else:
        setattr(target, field, value)
    with pytest.raises(UserError, match=re.escape(message)):
        Glm4vForConditionalGeneration.check_config(config)


# ---- the command line -----------------------------------------------------------------------------
def test_demo_gives_hf_text(tiny_glm4v, glm_reference, tmp_path, images):
    """--demo --reference hf with two images of different sizes in one prompt: HF's tokens, HF's text."""
    images[0].save(tmp_path / "a.png")
    images[1].resize((150, 100)).save(tmp_path / "b.png")
    run = cli("--demo", f"--model={tiny_glm4v}", f"--input-image={tmp_path / 'a.png'}",
              f"--input-image={tmp_path / 'b.png'}", "--mm-per-prompt=2", "--dtype=float32", "--device=cpu",
              "--output-len=12", "--reference=hf", "--prompt=describe the picture", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == 1 and agreement["exact_match_rate"] == 1.0, agreement
    assert agreement["max_abs_dlogprob"] < 1e-4
    pictures = [Image.open(tmp_path / name).convert("RGB") for name in ("a.png", "b.png")]
    request = {"prompt": glm_reference.processor.chat_prompt("describe the picture", 2),
               "multi_modal_data": {"image": pictures}}
    text = glm_reference.decode(glm_reference.greedy(request, 12))
    assert f"Generated text: {text!r}" in run.stdout


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


def test_demo_with_a_video_agrees_with_hf(tiny_glm4v, video_file, tmp_path):
    run = cli("--demo", f"--model={tiny_glm4v}", f"--input-video={video_file}", "--num-frames=6", "--dtype=float32",
              "--device=cpu", "--output-len=12", "--reference=hf", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "Video: " in run.stdout
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["exact_match_rate"] == 1.0 and agreement["max_abs_dlogprob"] < 1e-4, agreement


def test_a_video_of_one_frame_is_one_line(tiny_glm4v, video_file, tmp_path):
    run = cli("--demo", f"--model={tiny_glm4v}", f"--input-video={video_file}", "--num-frames=1", "--device=cpu",
              cwd=str(tmp_path))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert len(error_lines(run)) == 1 and "needs at least 2" in error_lines(run)[0], run.stderr


def test_perf_with_a_synthetic_video(tiny_glm4v, tmp_path):
    run = cli("--perf", f"--model={tiny_glm4v}", "--device=cpu", "--dtype=float32", "--num-frames=4",
              "--input-vision-shape=100,150", "--input-len=120", "--output-len=4", "--num-prompts=2",
              cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    # 4 frames of 100 x 150 -> 112 x 140 pixels -> 2 temporal patches of 8 x 10 patches -> 2 * 4 * 5 positions
    assert "tokens per request: 40 video + 80 text" in run.stdout, run.stdout


def test_perf_with_dummy_weights_on_the_config_alone(tiny_glm4v, tmp_path):
    """A folder holding only config.json: the image processor comes from the config (transformers' limits)."""
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(f"{tiny_glm4v}/config.json", folder)
    run = cli("--perf", f"--model={folder}", "--load-format=dummy", "--device=cpu", "--dtype=float32",
              "--input-vision-shape=100,150", "--input-len=120", "--output-len=4", "--num-prompts=2",
              cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert set(perf_info(run.stdout)) == set(SEED_KEYS) | {"cpu_threads"}  # on CPU
    # 100 x 150 -> 112 x 140 pixels -> 8 x 10 patches -> 4 * 5 positions, framed by begin/end of image
    assert "tokens per request: 20 image + 100 text" in run.stdout, run.stdout
    assert glob.glob(str(tmp_path / "*.csv"))


def test_a_config_only_folder_ends_replies_at_every_eos_its_config_lists():
    """GLM-4.1V's config lists four EOS ids: a --load-format dummy run on the bundled config stops at each."""
    from vllm_utils.bundled import bundled_config_dir
    from vllm_utils.config import load_hf_config
    from vllm_utils.multimodal.glm4v import Glm4vProcessorAdapter

    folder = bundled_config_dir("zai-org/GLM-4.1V-9B-Thinking")
    adapter = Glm4vProcessorAdapter(folder, load_hf_config(folder), allow_missing=True)
    assert adapter.eos_token_ids == [151329, 151336, 151338, 151348] and adapter.eos_token_id == 151329


def test_acc_on_the_bundled_sample_agrees_with_hf_fp32(tiny_glm4v, tmp_path):
    run = cli("--acc", f"--model={tiny_glm4v}", "--device=cpu", "--dtype=float32", "--dataset=sample-jsonl",
              "--reference=hf", "--output-len=8", "--batch-size=3", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    ref = info["reference"]
    assert ref["samples_compared"] == 3 and ref["exact_match_rate"] == 1.0 and ref["max_abs_dlogprob"] < 1e-4
