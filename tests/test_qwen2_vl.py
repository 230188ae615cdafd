"""Qwen2-VL and Qwen2.5-VL against transformers' models on tiny random checkpoints shaped like the hub's: images of
different sizes, several per prompt, video, chunked prefill, long decodes (whose positions continue from the
prompt's largest, not its length), bf16 log-probs, tensor parallelism, the CLI."""
import glob
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_utils import LLM, SamplingParams
from vllm_utils.models.registry import video_families

from conftest import HFReference, assert_bf16_close, chosen_logprobs, uncaptured_graph_mode
from test_cli import cli, error_lines
from test_perf import SEED_KEYS, perf_info

TOKENS = 24  # past EOS too: both sides ignore it, neither masks it


def engine(folder: str, **kwargs) -> LLM:
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("max_model_len", 1024)
    return LLM(folder, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def clip(images) -> np.ndarray:
    """Six frames of a moving crop of a photo, 90 x 120 (not a multiple of 28: the processor resizes)."""
    big = np.asarray(images[1].resize((200, 150)))
    return np.stack([big[i * 6 : i * 6 + 90, i * 10 : i * 10 + 120] for i in range(6)])


@pytest.fixture(scope="module")
def qwen_reference(tiny_qwen) -> HFReference:
    return HFReference(tiny_qwen)


def prompts(adapter, images: list[Image.Image], clip: np.ndarray) -> list[dict]:
    """Images of two sizes alone, both in one prompt, an image and a video, text alone."""
    cases = [("describe the picture", [images[0]], []), ("what is in this image ?", [images[1].resize((100, 180))], []),
             ("describe the picture in detail", images, []), ("describe this video", [images[1]], [clip]),
             ("a cup of coffee on a wooden table", [], [])]
    return [{"prompt": adapter.chat_prompt(text, len(ims), len(vids)),
             "multi_modal_data": {"image": ims, "video": vids}} for text, ims, vids in cases]


def test_images_of_any_size_several_per_prompt_and_video_give_hf_tokens(tiny_qwen, qwen_reference, images, clip):
    llm = engine(tiny_qwen)
    adapter = llm.engine.processor
    reqs = prompts(adapter, images, clip)
    grids = [adapter.process(r["prompt"], r["multi_modal_data"]["image"], r["multi_modal_data"]["video"])[1]
             for r in reqs[:2]]
    assert grids[0]["grid_thw"].tolist() != grids[1]["grid_thw"].tolist()  # the sizes are kept
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    variety = []
    for req, out in zip(reqs, outputs):
        expected = qwen_reference.greedy(req, TOKENS, ignore_eos=True)
        assert out.outputs[0].token_ids == expected
        variety.append(len(set(expected)))
    # the reference must not repeat itself, above all where the bf16 test below looks (prompts 2 and 3)
    assert min(variety[2:4]) > 3 and sum(v > 3 for v in variety) >= len(variety) - 1, variety
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == len(outputs)  # the prompts answer differently


def test_prompts_prefilled_in_chunks_give_hf_tokens(tiny_qwen, qwen_reference, images, clip):
    """Chunks of 32 tokens: an image's positions and the video's span several chunks."""
    llm = engine(tiny_qwen, max_num_batched_tokens=32)
    adapter = llm.engine.processor
    reqs = [prompts(adapter, images, clip)[i] for i in (2, 3)]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    for req, out in zip(reqs, outputs):
        assert len(out.prompt_token_ids) > 100
        assert out.outputs[0].token_ids == qwen_reference.greedy(req, TOKENS, ignore_eos=True)


def test_preempted_requests_recompute_hf_tokens(tiny_qwen, qwen_reference, images, clip):
    """Recomputed after a preemption, a prompt and its generated tokens take the same positions again."""
    llm = engine(tiny_qwen, block_size=4, num_kv_blocks=96, max_num_seqs=4, max_model_len=384)
    reqs = prompts(llm.engine.processor, images, clip)[:4]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == qwen_reference.greedy(req, 40, ignore_eos=True)


def test_padded_decode_steps_of_graph_mode_give_hf_tokens(tiny_qwen, qwen_reference, images, clip):
    """Graph mode's decode steps (static buffers, padded batches) take the one-row positions with their offset;
    prompts, whose positions have three rows, run eagerly."""
    llm = engine(tiny_qwen, max_num_seqs=4)
    uncaptured_graph_mode(llm)
    runner = llm.engine.runner
    assert runner.prefill_graphs is None
    batches = []
    decode = runner.graphs.run
    runner.graphs.run = lambda inputs: batches.append(len(inputs.token_ids)) or decode(inputs)
    reqs = prompts(llm.engine.processor, images, clip)[:3]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    assert 3 in batches
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == qwen_reference.greedy(req, TOKENS, ignore_eos=True)


@pytest.mark.parametrize("tiny_qwen", ["qwen2_5_vl"], indirect=True)  # the decoder paths are the same
def test_the_cuda_code_path_gives_hf_tokens(tiny_qwen, qwen_reference, images, clip):
    """The kernels the CUDA platform chooses (fused Triton RoPE of three position rows + K/V store, Triton paged
    decode, fused norms) and graph mode's padded decode steps, through Triton's interpreter on CPU where there is
    no GPU."""
    pytest.importorskip("triton")
    from vllm_utils.attention.triton_backend import TritonPagedAttention
    from vllm_utils.platforms.cuda import CudaPlatform

    llm = engine(tiny_qwen)
    llm.engine.runner.choose_kernels(CudaPlatform())
    assert isinstance(llm.engine.runner.backend, TritonPagedAttention)
    uncaptured_graph_mode(llm)
    reqs = [prompts(llm.engine.processor, images, clip)[i] for i in (0, 3)]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == qwen_reference.greedy(req, TOKENS, ignore_eos=True)


def test_positions_equal_transformers_get_rope_index(tiny_qwen, images, clip):
    """The three position rows of a prompt with two images and a video (Qwen2.5-VL: time in seconds of a clip
    sampled at 1.5 frames a second) and the offset of generated tokens, against transformers' own."""
    from transformers import AutoModelForImageTextToText

    from vllm_utils.multimodal.video import VideoClip

    llm = engine(tiny_qwen)
    adapter, model = llm.engine.processor, llm.engine.runner.model
    video = VideoClip(clip, fps=3.0, total_frames=12)
    prompt = adapter.chat_prompt("describe", 2, 1)
    ids, mm = adapter.process(prompt, images, [video])
    hf = AutoModelForImageTextToText.from_pretrained(tiny_qwen).model
    kinds = adapter.hf_token_inputs(torch.tensor([ids]))["mm_token_type_ids"]
    hf_inputs = adapter.hf_model_inputs(mm)
    expected, delta = hf.get_rope_index(torch.tensor([ids]), kinds, image_grid_thw=hf_inputs["image_grid_thw"],
                                        video_grid_thw=hf_inputs["video_grid_thw"],
                                        **{k: v for k, v in hf_inputs.items() if k == "second_per_grid_ts"})
    positions, offset = model.rope_positions([t in model.mm_token_ids for t in ids], mm)
    assert torch.equal(positions, expected[:, 0]) and offset == int(delta) < 0


def test_vision_tower_equals_transformers(tiny_qwen, images, clip):
    """Images and a video through our tower in one batch, against transformers' image and video features."""
    from transformers import AutoModelForImageTextToText

    llm = engine(tiny_qwen)
    adapter, model = llm.engine.processor, llm.engine.runner.model
    ids, mm = adapter.process(adapter.chat_prompt("x", 2, 1), images, [clip])
    hf = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32).model
    hf_inputs = adapter.hf_model_inputs(mm)
    with torch.inference_mode():
        ours = model.encode_mm(mm)
        image = torch.cat(hf.get_image_features(hf_inputs["pixel_values"], hf_inputs["image_grid_thw"]).pooler_output)
        video = torch.cat(hf.get_video_features(hf_inputs["pixel_values_videos"],
                                                hf_inputs["video_grid_thw"]).pooler_output)
    # the prompt holds the images, then the video
    torch.testing.assert_close(ours, torch.cat([image, video]), rtol=1e-4, atol=1e-4)


def test_bf16_logprobs_close_to_hf_fp32(tiny_qwen, qwen_reference, images, clip):
    """Two images, and an image with a video (whose fp32 tokens the first test checks for variety)."""
    llm = engine(tiny_qwen, dtype="bfloat16")
    adapter = llm.engine.processor
    for req in [prompts(adapter, images, clip)[i] for i in (2, 3)]:
        out = llm.generate([req], SamplingParams(temperature=0, max_tokens=16, logprobs=0, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
        assert_bf16_close(chosen_logprobs(out), tiny_qwen, req, out.token_ids, qwen_reference)


def test_tensor_parallel_2_gives_the_tokens_of_1(tiny_qwen, images, clip):
    outputs = {}
    for size in (1, 2):
        llm = engine(tiny_qwen, tensor_parallel_size=size)
        reqs = prompts(llm.engine.processor, images, clip)[2:4]
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        outputs[size] = [o.outputs[0].token_ids for o in llm.generate(reqs, params, use_tqdm=False)]
        llm.engine.shutdown()
    assert outputs[2] == outputs[1]


# ---- the command line -----------------------------------------------------------------------------
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


@pytest.mark.parametrize("inputs", ["video", "images"])
def test_demo_agrees_with_hf(tiny_qwen, video_file, tmp_path, images, inputs):
    """--demo --reference hf: a video, or two images of different sizes in one prompt."""
    if inputs == "video":
        given, count = [f"--input-video={video_file}", "--num-frames=4"], 1
    else:
        images[0].save(tmp_path / "a.png")
        images[1].resize((150, 100)).save(tmp_path / "b.png")
        given, count = [f"--input-image={tmp_path / 'a.png'}", f"--input-image={tmp_path / 'b.png'}",
                        "--mm-per-prompt=2"], 1
    run = cli("--demo", f"--model={tiny_qwen}", *given, "--dtype=float32", "--device=cpu", "--output-len=12",
              "--reference=hf", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert ("Video: " if inputs == "video" else "Image: ") in run.stdout
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == count and agreement["exact_match_rate"] == 1.0, agreement


@pytest.mark.parametrize("tiny_qwen", ["qwen2_vl"], indirect=True)
def test_demo_counts_the_familys_own_placeholder_before_loading(tiny_qwen, tmp_path, images):
    images[0].save(tmp_path / "a.png")
    run = cli("--demo", f"--model={tiny_qwen}", f"--input-image={tmp_path / 'a.png'}", "--device=cpu",
              "--prompt", "<|image_pad|> and <|image_pad|>: what differs?", cwd=str(tmp_path))
    assert run.returncode == 1 and "Loading the model" not in run.stderr
    assert len(error_lines(run)) == 1 and "holds 2 <|image_pad|> placeholder(s) for its 1" in error_lines(run)[0]


def test_perf_with_a_synthetic_video(tiny_qwen, tmp_path):
    run = cli("--perf", f"--model={tiny_qwen}", "--device=cpu", "--dtype=float32", "--num-frames=4",
              "--input-vision-shape=100,150", "--input-len=200", "--output-len=4", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert set(perf_info(run.stdout)) == set(SEED_KEYS) | {"cpu_threads"}  # on CPU
    # 4 frames -> 2 temporal patches; 100 x 150 -> 112 x 140 pixels -> 8 x 10 patches -> 2 * 4 * 5 positions
    assert "tokens per request: 40 video + 160 text" in run.stdout
    [csv_path] = glob.glob(str(tmp_path / "*.csv"))
    table = dict(line.rstrip("\n").split(",", 1) for line in open(csv_path))
    assert table["input_video"] == "black" and table["input_image"] == "" and table["num_frames"] == "4"


@pytest.mark.parametrize("shape", ["448,448", "1080,1920", "60,700"])
def test_the_bundled_qwen25_7b_takes_the_positions_hf_gives(shape):
    """--perf on Qwen2.5-VL-7B-Instruct with dummy weights: an image of --input-vision-shape takes as many positions
    as transformers' Qwen2-VL image processor (with the hub's pixel limits) counts for it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vllm_utils.modes.spec import parse_vision_shapes
    from vllm_utils.modes.synthetic import image_positions, request_images
    from vllm_utils.config import EngineConfig
    from vllm_utils.engine.resolve import resolve
    from vllm_utils.models.registry import family

    config = resolve(EngineConfig("Qwen/Qwen2.5-VL-7B-Instruct", load_format="dummy"))
    assert config.model_type == "qwen2_5_vl"
    adapter = family(config.model_type).processor(config.folder, config.hf_config, allow_missing=True)
    height, width = parse_vision_shapes(shape)[0]
    hub = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    assert image_positions(adapter, request_images(adapter, [], [(height, width)], 1))[1] == \
        hub.get_number_of_image_patches(height, width, {}) // 4


def test_the_bundled_7b_configs_build_their_shapes_on_meta():
    from vllm_utils.config import load_hf_config
    from vllm_utils.engine.model_runner import build_model
    from vllm_utils.models.qwen2_vl import Qwen2VLForConditionalGeneration

    for name, params in (("Qwen/Qwen2.5-VL-7B-Instruct", 8.29e9), ("Qwen/Qwen2-VL-2B-Instruct", 2.21e9)):
        model = build_model(load_hf_config(name), Qwen2VLForConditionalGeneration, torch.device("meta"),
                            torch.bfloat16)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - params) / params < 0.01, (name, count)


def test_a_video_for_a_model_without_video_is_refused_before_loading(tiny_llava, video_file, tmp_path):
    run = cli("--demo", f"--model={tiny_llava}", f"--input-video={video_file}", "--device=cpu", cwd=str(tmp_path))
    assert run.returncode == 1 and "Loading the model" not in run.stderr
    assert error_lines(run) == ["error: --input-video/--num-frames: llava models take no video; use a video model "
                                f"({', '.join(video_families())}) or give images"]


@pytest.mark.parametrize("tiny_qwen", ["qwen2_vl"], indirect=True)  # the checks are the same for both families
@pytest.mark.parametrize("flags, message", [
    (["--num-frames=0"], "--num-frames must be between 1 and 768"),
    (["--input-video=missing.mp4"], "--input-video 'missing.mp4' is not a file"),
    (["--input-video=notes.mp4"], "cannot decode video"),
])
def test_bad_video_input_is_one_line(tiny_qwen, tmp_path, flags, message):
    (tmp_path / "notes.mp4").write_text("not a video")
    run = cli("--demo", f"--model={tiny_qwen}", "--device=cpu", *flags, cwd=str(tmp_path))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert len(error_lines(run)) == 1 and message in error_lines(run)[0], run.stderr
    assert not glob.glob(str(tmp_path / "*.csv"))


@pytest.mark.parametrize("tiny_qwen", ["qwen2_vl"], indirect=True)  # the checks are the same for both families
def test_images_smaller_than_a_patch_give_hf_tokens(tiny_qwen, qwen_reference, images):
    """transformers' processor scales them up to min_pixels; so do we (through it)."""
    llm = engine(tiny_qwen)
    adapter = llm.engine.processor
    reqs = [{"prompt": adapter.chat_prompt("what is in this image ?", 1),
             "multi_modal_data": {"image": [images[0].resize(size)]}} for size in ((5, 5), (13, 100))]
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == qwen_reference.greedy(req, 8, ignore_eos=True)


def test_a_picture_over_200_times_longer_than_wide_is_one_line(tiny_qwen, tmp_path):
    Image.new("RGB", (1, 300)).save(tmp_path / "thin.png")
    run = cli("--demo", f"--model={tiny_qwen}", "--device=cpu", f"--input-image={tmp_path / 'thin.png'}",
              cwd=str(tmp_path))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert len(error_lines(run)) == 1 and "aspect ratio above 200" in error_lines(run)[0], run.stderr


def test_ready_token_ids_must_hold_their_items_positions(tiny_qwen, images):
    from vllm_utils.errors import UserError

    llm = engine(tiny_qwen)
    adapter = llm.engine.processor
    ids, mm = adapter.process(adapter.chat_prompt("describe", 1), images[:1])
    params = SamplingParams(temperature=0, max_tokens=2)
    assert llm.generate([{"prompt_token_ids": ids, "mm_inputs": mm}], params, use_tqdm=False)[0].outputs[0].token_ids
    first = ids.index(adapter.mm_token_id)
    short = ids[:first] + ids[first + 1 :]  # one image position fewer
    with pytest.raises(UserError, match="hold .* multimodal placeholder positions but mm_inputs' items take"):
        llm.generate([{"prompt_token_ids": short, "mm_inputs": mm}], params, use_tqdm=False)
