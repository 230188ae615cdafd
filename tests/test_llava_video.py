"""Videos of the LLaVA line against HF transformers on tiny random checkpoints shaped like the hub's: LLaVA-OneVision
(frames pooled bilinearly, one newline per video; images and a video in one prompt) and LLaVA-NeXT-Video (frames
pooled by the spatial stride): through the API (a batch mixing them, chunked prefill, preemption), the CLI and
--perf with a synthetic video, and --acc on the bundled Video-MME sample."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_utils import LLM, SamplingParams

from conftest import HFReference, real_tokenizer_dir
from test_cli import cli, error_lines
from test_perf import SEED_KEYS, perf_info

FAMILIES = {
    "llava_onevision": dict(family="llava_onevision", vision_type="siglip_vision_model", select_strategy="full",
                            vision_feature_layer=-1, text_type="qwen2", seed=12),
    "llava_next_video": dict(family="llava_next_video", seed=28),
}
TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=list(FAMILIES))
def video_family(request, tmp_path_factory) -> tuple[str, HFReference]:
    from vllm_utils.testing.tiny_llava import build_tiny_llava

    folder = build_tiny_llava(str(tmp_path_factory.mktemp(request.param)), real_tokenizer_dir(),
                              **FAMILIES[request.param])
    return folder, HFReference(folder)


def clip(seed: int, frames: int = 6, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """Frames [T, H, W, 3] of a moving coloured pattern, not the tower's size (the processor resizes)."""
    gen = torch.Generator().manual_seed(seed)
    small = (torch.rand(frames + 3, 3, 4, 4, generator=gen) * 255).byte()
    return np.stack([np.asarray(Image.fromarray(small[i : i + 3].float().mean(0).byte().permute(1, 2, 0).numpy())
                                .resize(size[::-1], Image.BILINEAR)) for i in range(frames)])


def picture(seed: int, size: tuple[int, int] = (90, 60)) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(4, 4, 3, generator=gen) * 255).byte().numpy()).resize(size, Image.BILINEAR)


def requests(llm: LLM) -> list[dict]:
    """A video alone, an image and a video, a second video of another length, and text alone."""
    p = llm.engine.processor
    return [{"prompt": p.chat_prompt("describe the video", 0, 1), "multi_modal_data": {"video": clip(1)}},
            {"prompt": p.chat_prompt("what happens here ?", 1, 1),
             "multi_modal_data": {"image": picture(2), "video": clip(3)}},
            {"prompt": p.chat_prompt("what is in this video ?", 0, 1),
             "multi_modal_data": {"video": clip(4, frames=3, size=(70, 40))}},
            {"prompt": p.chat_prompt("a photo of a cat", 0, 0)}]


def test_videos_images_and_text_in_one_batch_give_hf_tokens(video_family):
    folder, hf = video_family
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=2048)
    reqs = requests(llm)
    outputs = llm.generate(reqs, GREEDY, use_tqdm=False)
    adapter = llm.engine.processor
    video = adapter.video_positions(6)
    assert video > 6 and video == sum(t == adapter.video_token_id for t in outputs[0].prompt_token_ids)
    variety = []
    for req, out in zip(reqs, outputs):
        expected = hf.greedy(req, TOKENS, ignore_eos=True)
        assert out.outputs[0].token_ids == expected
        variety.append(len(set(expected)))
    assert min(variety[:3]) > 3, variety  # the reference varies where the videos are


def test_fp32_logprobs_of_a_video_equal_hfs(video_family):
    folder, hf = video_family
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=2048)
    req = requests(llm)[1]
    out = llm.generate(req, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    reference = hf.token_logprobs(req, out.token_ids)
    assert max(abs(e[t].logprob - r) for e, t, r in zip(out.logprobs, out.token_ids, reference)) < 1e-4


def test_video_prompts_in_chunks_and_under_preemption_give_hf_tokens(video_family):
    """Chunks of 16 tokens (a video spans several); a pool too small for every request to grow."""
    folder, hf = video_family
    chunked = LLM(folder, device="cpu", dtype="float32", max_model_len=2048, max_num_batched_tokens=16)
    reqs = requests(chunked)[:3]
    for req, out in zip(reqs, chunked.generate(reqs, GREEDY, use_tqdm=False)):
        assert out.outputs[0].token_ids == hf.greedy(req, TOKENS, ignore_eos=True)
    lengths = [len(o.prompt_token_ids) for o in chunked.generate(reqs, SamplingParams(max_tokens=1),
                                                                   use_tqdm=False)]
    blocks = max(sum(-(-n // 4) for n in lengths) + 4, -(-(max(lengths) + 40) // 4))
    small = LLM(folder, device="cpu", dtype="float32", block_size=4, max_model_len=4 * blocks, max_num_seqs=3,
                num_kv_blocks=blocks)
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outputs = small.generate(reqs, long, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for req, out in zip(reqs, outputs):
        assert out.outputs[0].token_ids == hf.greedy(req, 40, ignore_eos=True)


def test_cli_demo_with_a_video_file_prints_what_hf_generates(video_family, tmp_path):
    from test_video import _frames, _write

    folder, hf = video_family
    path = tmp_path / "clip.mp4"
    _write(path, _frames())
    run = cli("--demo", f"--model={folder}", "--device=cpu", "--dtype=float32", f"--input-video={path}",
              "--num-frames=4", "--prompt=What happens?", "--output-len=8")
    assert run.returncode == 0, run.stderr
    from vllm_utils.multimodal.video import load_video

    prompt = hf.processor.chat_prompt("What happens?", 0, 1)
    tokens = hf.greedy({"prompt": prompt, "multi_modal_data": {"video": load_video(str(path), 4)}}, 8)
    assert f"Prompt: {prompt!r}, Generated text: {hf.decode(tokens)!r}, Video: {str(path)!r}" in run.stdout


def test_cli_demo_with_an_image_and_a_video_in_one_prompt_prints_what_hf_generates(video_family, tmp_path):
    from test_video import _frames, _write

    folder, hf = video_family
    video, image = tmp_path / "clip.mp4", tmp_path / "p.png"
    _write(video, _frames())
    picture(13).save(image)
    run = cli("--demo", f"--model={folder}", "--device=cpu", "--dtype=float32", f"--input-image={image}",
              f"--input-video={video}", "--num-frames=4", "--prompt=What happens?", "--output-len=8",
              "--reference=hf")
    assert run.returncode == 0, run.stderr
    from vllm_utils.multimodal.video import load_video

    request = {"prompt": hf.processor.chat_prompt("What happens?", 1, 1),
               "multi_modal_data": {"image": Image.open(image).convert("RGB"), "video": load_video(str(video), 4)}}
    tokens = hf.greedy(request, 8)
    assert len(set(tokens)) > 3, "the reference repeats itself"
    assert f"Generated text: {hf.decode(tokens)!r}, Image: {str(image)!r}, Video: {str(video)!r}" in run.stdout
    figures = json.loads(run.stdout.split("***Reference Agreement***", 1)[1])
    assert figures["exact_match_rate"] == 1.0 and figures["max_abs_dlogprob"] < 1e-4


def test_perf_with_a_synthetic_video_takes_its_positions(video_family, tmp_path):
    folder, _ = video_family
    run = cli("--perf", f"--model={folder}", "--device=cpu", "--dtype=float32", "--max-model-len=512",
              "--input-len=200", "--output-len=4", "--num-frames=4", "--input-vision-shape=60,90", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert set(perf_info(run.stdout)) == set(SEED_KEYS) | {"cpu_threads"}
    positions = LLM(folder, device="cpu", dtype="float32", max_model_len=256).engine.processor.video_positions(4)
    assert f"tokens per request: {positions} video + {200 - positions} text" in run.stdout


def test_video_mme_sample_agrees_with_hf(video_family, tmp_path):
    from test_videomme import check_agrees_with_hf, run_videomme

    info, records, _ = run_videomme(video_family[0], tmp_path)
    check_agrees_with_hf(info, records)


def test_llava_1_5_takes_no_video(tiny_llava, tmp_path):
    run = cli("--perf", f"--model={tiny_llava}", "--device=cpu", "--num-frames=4", "--input-len=200",
              cwd=str(tmp_path))
    assert run.returncode == 1 and "llava models take no video" in error_lines(run)[0]


def test_frames_are_the_video_processors_where_torchvision_is_installed(video_family):
    """transformers builds the video processors only with torchvision; where it is, our frames are its frames
    (its antialiased resize may put a pixel a level or two apart)."""
    pytest.importorskip("torchvision")
    from transformers import AutoVideoProcessor

    folder, _ = video_family
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=256)
    frames = clip(5)
    ours = llm.engine.processor.video_inputs(frames)["pixel_values_videos"]
    theirs = AutoVideoProcessor.from_pretrained(folder)(videos=[frames], return_tensors="pt")["pixel_values_videos"]
    torch.testing.assert_close(ours, theirs[0], rtol=0, atol=0.05)
