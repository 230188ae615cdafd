"""LLaVA-NeXT and LLaVA-OneVision (any-resolution images, several per prompt) against HF transformers on tiny
random checkpoints shaped like llava-v1.6 (CLIP + Llama) and llava-onevision (SigLIP + Qwen2)."""
import pytest
import torch
from PIL import Image

from vllm_utils import LLM, SamplingParams
from vllm_utils.errors import UserError

from conftest import HFReference, assert_bf16_close, chosen_logprobs, real_tokenizer_dir
from test_cli import cli

FAMILIES = {
    "llava_next": dict(family="llava_next"),
    "llava_onevision": dict(family="llava_onevision", vision_type="siglip_vision_model", select_strategy="full",
                            vision_feature_layer=-1, text_type="qwen2", seed=12),
}
SIZES = {"square": (120, 120), "wide": (200, 70), "tall": (60, 180), "tiny": (10, 8), "large": (640, 480)}
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A colourful picture of (width, height)."""
    gen = torch.Generator().manual_seed(seed)
    small = (torch.rand(3, 4, 4, generator=gen) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(small).resize(size, Image.BILINEAR)


@pytest.fixture(scope="session", params=list(FAMILIES))
def anyres(request, tmp_path_factory) -> tuple[str, HFReference]:
    from vllm_utils.testing.tiny_llava import build_tiny_llava

    folder = str(tmp_path_factory.mktemp(request.param))
    build_tiny_llava(folder, real_tokenizer_dir(), **{"seed": 11, **FAMILIES[request.param]})
    return folder, HFReference(folder)


def _request(llm: LLM, text: str, images: list) -> dict:
    return {"prompt": llm.engine.processor.chat_prompt(text, len(images)), "multi_modal_data": {"image": images}}


def test_images_of_every_shape_in_one_batch_give_hf_tokens(anyres):
    folder, hf = anyres
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=2048)
    images = {name: picture(size, i) for i, (name, size) in enumerate(SIZES.items())}
    requests = [_request(llm, f"Describe the {name} picture.", [image]) for name, image in images.items()]
    outputs = llm.generate(requests, GREEDY, use_tqdm=False)
    lengths = {name: len(out.prompt_token_ids) for name, out in zip(images, outputs)}
    assert len(set(lengths.values())) >= 3, lengths  # positions follow each image's size
    varied = 0
    for (name, image), request, out in zip(images.items(), requests, outputs):
        expected = hf.greedy(request, GREEDY.max_tokens)
        assert out.outputs[0].token_ids == expected, name
        assert len(out.prompt_token_ids) == hf.inputs(request)["input_ids"].shape[1]
        varied += len(set(expected)) > 2
    assert varied >= 3, "the reference repeats itself: it would prove little"


def test_two_images_in_one_prompt_give_hf_tokens(anyres):
    folder, hf = anyres
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=2048, block_size=4)
    images = [picture(SIZES["wide"], 1), picture(SIZES["tall"], 2)]
    request = _request(llm, "Compare the two pictures.", images)
    out = llm.generate([request], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf.greedy(request, GREEDY.max_tokens)


@pytest.mark.parametrize("anyres", ["llava_onevision"], indirect=True)
def test_several_non_square_images_take_the_pixels_and_tokens_of_hfs_multi_image_mode(anyres):
    """HF's OneVision processor, given one prompt's images together, pads each to a square (the image mean around
    it) and resizes it to one base view: our pixels are those, and HF's model fed HF's own pixels gives our tokens."""
    folder, hf = anyres
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=2048)
    adapter = llm.engine.processor
    images = [picture(SIZES["wide"], 29), picture(SIZES["tall"], 30), picture((90, 150), 31)]
    request = _request(llm, "Compare the pictures.", images)
    ids, ours = adapter.process(request["prompt"], images)
    theirs = adapter.image_processor(images=[images], return_tensors="pt")  # HF's multi-image mode
    assert theirs["pixel_values"].shape[:2] == (3, 1)  # one view each
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"].flatten(0, 1), rtol=0, atol=0)
    out = llm.generate([request], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              **{k: v for k, v in theirs.items()}}
    with torch.inference_mode():
        expected = hf.model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert out == expected and len(set(expected)) > 3


def test_bf16_logprobs_close_to_hf_fp32(anyres):
    folder, hf = anyres
    llm = LLM(folder, device="cpu", dtype="bfloat16", max_model_len=2048)
    seed = {"llava_next": 3, "llava_onevision": 9}[llm.engine.config.model_type]  # where the reference varies
    request = _request(llm, "Describe the picture.", [picture(SIZES["large"], seed)])
    assert len(set(hf.greedy(request, 12, ignore_eos=True))) > 3, "the reference repeats itself"
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=0, ignore_eos=True)
    out = llm.generate([request], params, use_tqdm=False)[0].outputs[0]
    assert_bf16_close(chosen_logprobs(out), folder, request, out.token_ids, hf)


def test_the_model_type_comes_from_the_folder_and_a_mismatch_is_one_line(anyres):
    folder, _ = anyres
    family = LLM(folder, device="cpu", dtype="float32", max_model_len=256).engine.config.model_type
    assert family in FAMILIES
    with pytest.raises(UserError, match=f"leave --model-type out .* --model-type {family}"):
        LLM(folder, model_type="llava", device="cpu", dtype="float32")


def test_cli_demo_prints_what_hf_generates(anyres, tmp_path):
    folder, hf = anyres
    path = tmp_path / "wide.png"
    picture(SIZES["wide"], 4).save(path)
    run = cli("--demo", f"--model={folder}", "--device=cpu", f"--input-image={path}", "--prompt=What is this?",
              "--dtype=float32", "--output-len=12")
    assert run.returncode == 0, run.stderr
    tokens = hf.greedy({"prompt": hf.chat_prompt("What is this?"),
                        "multi_modal_data": {"image": Image.open(path).convert("RGB")}}, 12)
    assert f"Generated text: {hf.decode(tokens)!r}," in run.stdout


def _hf_image_positions(processor, images: list[Image.Image]) -> int:
    """How many image positions HF's own processor gives a prompt holding these images."""
    placeholder = processor.image_token
    ids = processor(text=placeholder * len(images), images=images, return_tensors="pt")["input_ids"][0].tolist()
    return ids.count(processor.tokenizer.convert_tokens_to_ids(placeholder))


@pytest.mark.parametrize("shape", ["672,672", "336,1008", "1000,300"])
def test_the_bundled_next_7b_takes_the_positions_hf_gives(shape, tiny_llava):
    """--perf on llava-v1.6-vicuna-7b-hf with dummy weights: each --input-vision-shape takes the positions HF's
    LLaVA-NeXT processor expands it to (with the processor our adapter builds from the bundled config)."""
    from transformers import AutoTokenizer, LlavaNextProcessor

    from vllm_utils.modes.spec import parse_vision_shapes
    from vllm_utils.modes.synthetic import image_positions, request_images
    from vllm_utils.config import EngineConfig
    from vllm_utils.engine.resolve import resolve
    from vllm_utils.models.registry import family

    config = resolve(EngineConfig("llava-hf/llava-v1.6-vicuna-7b-hf", load_format="dummy"))
    adapter = family(config.model_type).processor(config.folder, config.hf_config, allow_missing=True)
    images = request_images(adapter, [], parse_vision_shapes(shape), 1)
    hf = LlavaNextProcessor(image_processor=adapter.image_processor, tokenizer=AutoTokenizer.from_pretrained(tiny_llava),
                            patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    assert image_positions(adapter, images)[1] == _hf_image_positions(hf, images) > 576


def test_perf_with_two_images_of_given_shapes_per_request(tmp_path):
    from vllm_utils.testing.tiny_llava import build_tiny_llava

    from test_perf import perf_info, SEED_KEYS

    folder = build_tiny_llava(str(tmp_path / "next"), real_tokenizer_dir(), family="llava_next")
    run = cli("--perf", f"--model={folder}", "--device=cpu", "--dtype=float32", "--max-model-len=512",
              "--input-len=300", "--output-len=4", "--num-prompts=2", "--mm-per-prompt=2",
              "--input-vision-shape=60,180;200,70", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert set(perf_info(run.stdout)) == set(SEED_KEYS) | {"cpu_threads"}  # on CPU
    from transformers import AutoProcessor

    images = [Image.new("RGB", (180, 60)), Image.new("RGB", (70, 200))]  # (width, height)
    expected = _hf_image_positions(AutoProcessor.from_pretrained(folder), images)
    assert f"tokens per request: {expected} image + {300 - expected} text" in run.stdout


def test_demo_with_two_images_per_prompt_prints_what_hf_generates(anyres, tmp_path):
    folder, hf = anyres
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for i, (path, size) in enumerate(zip(paths, (SIZES["wide"], SIZES["tall"]))):
        picture(size, 10 + i).save(path)
    run = cli("--demo", f"--model={folder}", "--device=cpu", *(f"--input-image={p}" for p in paths),
              "--mm-per-prompt=2", "--prompt=Compare them.", "--dtype=float32", "--output-len=12")
    assert run.returncode == 0, run.stderr
    tokens = hf.greedy({"prompt": hf.chat_prompt("Compare them.", 2),
                        "multi_modal_data": {"image": [Image.open(p).convert("RGB") for p in paths]}}, 12)
    assert f"Generated text: {hf.decode(tokens)!r}," in run.stdout


def test_tensor_parallel_2_gives_the_tokens_of_1(anyres):
    folder, _ = anyres
    images = [picture(SIZES["wide"], 1), picture(SIZES["large"], 2)]
    outputs = {}
    for size in (1, 2):
        llm = LLM(folder, device="cpu", dtype="float32", max_model_len=2048, tensor_parallel_size=size)
        requests = [_request(llm, "Describe the picture.", [image]) for image in images]
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        outputs[size] = [o.outputs[0].token_ids for o in llm.generate(requests, params, use_tqdm=False)]
        llm.engine.shutdown()
    assert outputs[2] == outputs[1] and all(len(t) == 12 for t in outputs[2])


def test_a_large_image_prefilled_in_chunks_gives_hf_tokens(anyres):
    folder, hf = anyres
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=2048, max_num_batched_tokens=16)
    images = [picture(SIZES["large"], 3), picture(SIZES["tall"], 4)]
    requests = [_request(llm, "Describe the picture.", [image]) for image in images]
    outputs = llm.generate(requests, GREEDY, use_tqdm=False)
    assert len(outputs[0].prompt_token_ids) > 3 * 16  # several chunks
    for request, out in zip(requests, outputs):
        assert out.outputs[0].token_ids == hf.greedy(request, GREEDY.max_tokens)


def test_the_hf_backend_runs_the_same_perf_workload(anyres, tmp_path):
    """--backend hf hands HF's model the images as it takes them (not our engine's own tensor layout)."""
    from test_perf import SEED_KEYS, perf_info

    folder, _ = anyres
    run = cli("--perf", "--backend=hf", f"--model={folder}", "--device=cpu", "--dtype=float32",
              "--max-model-len=1024", "--input-len=400", "--output-len=3", "--mm-per-prompt=2",
              "--input-vision-shape=60,180;200,70", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert set(perf_info(run.stdout)) == set(SEED_KEYS) | {"cpu_threads"}  # on CPU


def test_preemption_under_a_small_kv_pool_gives_hf_tokens(anyres):
    folder, hf = anyres
    images = [picture(SIZES["large"], 3), picture(SIZES["wide"], 1), picture(SIZES["tall"], 2)]
    probe = LLM(folder, device="cpu", dtype="float32", max_model_len=2048)
    lengths = [len(probe.engine.processor.process(_request(probe, "Describe the picture.", [i])["prompt"], [i])[0])
               for i in images]
    # room for every prompt, not for all of them to grow by 40 tokens: running requests must be preempted
    blocks = max(sum(-(-n // 4) for n in lengths) + 8, -(-(max(lengths) + 40) // 4))
    llm = LLM(folder, device="cpu", dtype="float32", block_size=4, max_model_len=4 * blocks, max_num_seqs=3,
              num_kv_blocks=blocks)
    requests = [_request(llm, "Describe the picture.", [image]) for image in images]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outputs = llm.generate(requests, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.block_manager.num_free == blocks
    for request, out in zip(requests, outputs):
        assert out.outputs[0].token_ids == hf.greedy(request, 40, ignore_eos=True)
