"""MiniCPM-V 4.7 against transformers' model on a tiny random checkpoint of its layout (4.6's tower, merger and hybrid
decoder, positions laid out by canvas M-RoPE): the canvas rows against transformers' `get_rope_index` on every kind
of prompt, and why they matter (the tiny model reads them); images of several slices and of none, two in one prompt,
text alone, videos (frames with slices) and an image beside a video, in one batch: tokens and log-probs as HF's;
prompts prefilled in chunks; preemption; tensor parallelism; the tokens against MiniCPMV4_7Processor (a video without
<image_id>); the CLI (--demo with images, two in one prompt, a video; --acc); refusals by name."""
import json
import re

import numpy as np
import pytest
import torch

from vllm_utils import LLM, SamplingParams
from vllm_utils.config import load_hf_config
from vllm_utils.errors import UserError
from vllm_utils.llm import multi_modal_items
from vllm_utils.models.minicpmv import MiniCPMV4_6ForConditionalGeneration, MiniCPMV4_7ForConditionalGeneration
from vllm_utils.models.registry import find_family
from vllm_utils.multimodal.minicpmv import MiniCPMV4_7ProcessorAdapter
from vllm_utils.testing.tiny_minicpmv import VARIED_SEED_4_7, build_tiny_minicpmv

from conftest import HFReference, chosen_logprobs
from test_cli import cli
from test_minicpmv import hf_processor, requests, small_clip, video_requests

TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return build_tiny_minicpmv(str(tmp_path_factory.mktemp("minicpmv4_7")), seed=VARIED_SEED_4_7,
                               model_type="minicpmv4_7")


@pytest.fixture(scope="module")
def reference(tiny) -> HFReference:
    """HF's model, fed HF's own processor's tokens and pixels for images (ours for videos: its video processor
    needs torchvision)."""
    from transformers.models.minicpmv4_7.processing_minicpmv4_7 import MiniCPMV4_7Processor

    adapter = MiniCPMV4_7ProcessorAdapter(tiny, load_hf_config(tiny))
    adapter.hf_processor = hf_processor(tiny, MiniCPMV4_7Processor)
    return HFReference(tiny, processor=adapter)


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    return LLM(tiny, device="cpu", dtype="float32", max_model_len=2048)


@pytest.fixture(scope="module")
def reqs(llm, images) -> list[dict]:
    """An image of several slices, a small one, two images, text alone, a video, an image and a video of frames with
    slices."""
    adapter = llm.engine.processor
    return requests(adapter, images) + video_requests(adapter, images, small_clip(images))


@pytest.fixture(scope="module")
def expected(reference, reqs) -> list[list[int]]:
    return [reference.greedy(req, TOKENS, ignore_eos=True) for req in reqs]


def hf_rope_index(reference: HFReference, request: dict) -> torch.Tensor:
    inputs = reference.inputs(request)
    positions, _ = reference.model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], target_sizes=inputs.get("target_sizes"),
        target_sizes_videos=inputs.get("target_sizes_videos"))
    return positions[:, 0]


def our_positions(llm: LLM, request: dict, adapter=None) -> tuple[torch.Tensor, int]:
    model = llm.engine.runner.model
    images, videos = multi_modal_items(request)
    ids, mm = (adapter or llm.engine.processor).process(request["prompt"], images, videos)
    return model.rope_positions([t in model.mm_token_ids for t in ids], mm, ids)


def test_a_batch_of_images_videos_and_text_gives_hf_tokens_and_logprobs(llm, reference, reqs, expected):
    outputs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0),
                           use_tqdm=False)
    for req, out, theirs in zip(reqs, outputs, expected):
        ours = out.outputs[0]
        assert ours.token_ids == theirs
        their_logprobs = reference.token_logprobs(req, ours.token_ids)
        assert max(abs(a - b) for a, b in zip(chosen_logprobs(ours), their_logprobs)) < 1e-4
    assert min(len(set(t)) for t in expected) > 3, expected  # the reference does not repeat itself
    assert len({tuple(t) for t in expected}) == len(expected)  # every prompt is read, its pictures included
    slice_id = llm.engine.processor.tokenizer.convert_tokens_to_ids("<slice>")
    assert [o.prompt_token_ids.count(slice_id) > 1 for o in outputs] == [True, False, True, False, False, True]
    manager = llm.engine.block_manager  # every state slot came back
    assert sorted(manager.free_state_slots) == list(range(manager.num_state_slots))


def test_canvas_positions_equal_transformers_and_the_model_reads_them(llm, reference, reqs, images):
    """Our rows equal transformers' get_rope_index on every request (text alone: its indices), and on two images in
    one canvas group (no <image_id> between them); they are not 1-D, and HF's own log-probs under 1-D positions move
    far past the tests' bound: a wrong layout fails the token and log-prob tests."""
    plain = MiniCPMV4_7ProcessorAdapter(llm.engine.processor.folder, llm.engine.processor.hf_config,
                                        processor_kwargs={"use_image_id": False})
    for req in reqs[:3] + reqs[4:]:
        ours, offset = our_positions(llm, req)
        theirs = hf_rope_index(reference, req)
        assert torch.equal(ours, theirs) and offset == int(theirs.max()) + 1 - theirs.shape[1]
        assert not torch.equal(ours[1], ours[2])  # two-dimensional
        assert not torch.equal(ours, torch.arange(ours.shape[1]).expand(3, -1))
    text, _ = our_positions(llm, reqs[3])
    assert torch.equal(text, torch.arange(text.shape[1]).expand(3, -1))
    two = reqs[2]
    ours, _ = our_positions(llm, two, plain)
    inputs = reference.hf_processor(text=two["prompt"], images=two["multi_modal_data"]["image"],
                                    use_image_id=False, return_tensors="pt")
    theirs, _ = reference.model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                     target_sizes=inputs["target_sizes"])
    assert torch.equal(ours, theirs[:, 0])
    inputs = reference.inputs(reqs[0])
    flat = torch.arange(inputs["input_ids"].shape[1]).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        right = reference.model(**inputs).logits.log_softmax(-1)
        wrong = reference.model(**inputs, position_ids=flat).logits.log_softmax(-1)
    assert float((right - wrong)[0, -1].abs().max()) > 1e-2


@pytest.mark.parametrize("settings", [{}, {"use_image_id": False, "max_slice_nums": 4}])
def test_tokens_and_pixels_equal_minicpmv4_7_processor(tiny, reference, images, settings):
    """Images of several shapes in one prompt (MiniCPMV4_7Processor: tokens, pixels, grids, token kinds); a video's
    text has no <image_id>, an image's has."""
    adapter = MiniCPMV4_7ProcessorAdapter(tiny, load_hf_config(tiny), processor_kwargs=settings)
    pictures = [images[i % 2].resize(size) for i, size in enumerate([(600, 400), (90, 90), (33, 500)])]
    prompt = adapter.chat_prompt("describe", len(pictures))
    ids, ours = adapter.process(prompt, pictures)
    theirs = reference.hf_processor(text=prompt, images=pictures, return_tensors="pt", **settings)
    assert ids == theirs["input_ids"][0].tolist()
    hf_inputs = adapter.hf_model_inputs(ours)
    assert torch.equal(hf_inputs["pixel_values"], theirs["pixel_values"])
    assert torch.equal(hf_inputs["target_sizes"], theirs["target_sizes"])
    assert torch.equal(adapter.hf_token_inputs(theirs["input_ids"])["mm_token_type_ids"], theirs["mm_token_type_ids"])
    frames = np.stack([np.asarray(images[0].resize((600, 400)))] * 2)
    text = adapter.tokenizer.decode(adapter.process(adapter.chat_prompt("compare", 1, 1), pictures[1:2], [frames])[0])
    assert text.count("<image_id>") == settings.get("use_image_id", True) and text.count("<image>") == 3
    assert reference.hf_processor._prepend_local_ids([""], ["x"], "<|video_pad|>") == ["x"]


def test_prompts_prefilled_in_chunks_give_hf_tokens(tiny, reqs, expected):
    """Chunks of 16 tokens (boundaries inside images, frames and text), three prompts sharing the steps."""
    chunked = LLM(tiny, device="cpu", dtype="float32", max_model_len=2048, max_num_batched_tokens=16)
    picked = (0, 2, 5)
    outputs = chunked.generate([reqs[i] for i in picked], SamplingParams(temperature=0, max_tokens=TOKENS,
                                                                         ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [expected[i] for i in picked]
    assert all(len(o.prompt_token_ids) > 32 for o in outputs)


def test_preempted_requests_recompute_their_state(tiny, llm, reqs, expected):
    lengths = [len(o.prompt_token_ids) for o in llm.generate(reqs, SamplingParams(max_tokens=1), use_tqdm=False)]
    blocks = sum(-(-n // 16) for n in lengths) + 1
    small = LLM(tiny, device="cpu", dtype="float32", max_model_len=max(lengths) + TOKENS, num_kv_blocks=blocks,
                block_size=16)
    outputs = small.generate(reqs, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_tensor_parallel_2_gives_the_tokens_of_1(tiny, reqs, expected):
    parallel = LLM(tiny, device="cpu", dtype="float32", max_model_len=2048, tensor_parallel_size=2)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in parallel.generate(reqs[2:], params, use_tqdm=False)]
    parallel.engine.shutdown()
    assert got == expected[2:]


@pytest.fixture(scope="module")
def video_file(tmp_path_factory, images) -> str:
    av = pytest.importorskip("av")
    path = str(tmp_path_factory.mktemp("video") / "clip.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 120, 90, "yuv420p"
        for frame in small_clip(images):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("given", ["two requests", "two images in one", "an image and a video"])
def test_demo_agrees_with_hf(tiny, tmp_path, images, given, request):
    images[0].save(tmp_path / "a.png")
    images[1].resize((90, 90)).save(tmp_path / "b.png")
    pictures = [f"--input-image={tmp_path / 'a.png'}", f"--input-image={tmp_path / 'b.png'}"]
    extra = {"two requests": pictures, "two images in one": pictures + ["--mm-per-prompt=2"],
             "an image and a video": pictures[1:] + [f"--input-video={request.getfixturevalue('video_file')}",
                                                     "--num-frames=2"]}[given]
    run = cli("--demo", f"--model={tiny}", *extra, "--dtype=float32", "--device=cpu", "--output-len=8",
              "--reference=hf", "--prompt=describe the picture", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == (2 if given == "two requests" else 1)
    assert agreement["exact_match_rate"] == 1.0 and agreement["max_abs_dlogprob"] < 1e-4, agreement


def test_acc_on_the_bundled_sample_agrees_with_hf_fp32(tiny, tmp_path):
    run = cli("--acc", f"--model={tiny}", "--device=cpu", "--dtype=float32", "--dataset=sample-jsonl",
              "--reference=hf", "--output-len=6", "--batch-size=3", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    ref = info["reference"]
    assert ref["samples_compared"] == 3 and ref["exact_match_rate"] == 1.0 and ref["max_abs_dlogprob"] < 1e-4


@pytest.mark.parametrize("field", ["image_start_id", "image_end_id", "slice_start_id", "slice_end_id", "newline_id"])
def test_a_config_without_a_canvas_marker_is_refused_by_name(tiny, field):
    config = load_hf_config(tiny)
    setattr(config, field, None)
    with pytest.raises(UserError, match=f"{field} is not set in the config; canvas M-RoPE"):
        MiniCPMV4_7ForConditionalGeneration.check_config(config)


def test_the_family_is_found_and_mixed_files_are_refused(tiny):
    config = load_hf_config(tiny)
    assert find_family(config, None, tiny) == "minicpmv4_7"
    with pytest.raises(UserError, match="model_type 'minicpmv4_7' is not supported here"):
        MiniCPMV4_6ForConditionalGeneration.check_config(config)
    config.slice_end_id = config.slice_start_id
    with pytest.raises(UserError, match=re.escape("marker of the config's slice_end_id")):
        MiniCPMV4_7ProcessorAdapter(tiny, config)
