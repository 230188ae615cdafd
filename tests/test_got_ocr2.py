"""GOT-OCR2 against transformers' model on a tiny random checkpoint shaped like stepfun-ai/GOT-OCR-2.0-hf: plain and
formatted OCR of one page, two pages in one prompt, in one batch; chunked prefill through a page; the processor's
pixels and position counts; the CLI's --demo and --acc against HF; the bundled configuration's parameters."""
import json

import pytest
import torch

from vllm_utils import LLM, SamplingParams

from conftest import HFReference, assert_bf16_close, chosen_logprobs
from test_cli import cli, error_lines

TOKENS = 16


@pytest.fixture(scope="module")
def tiny_got(tmp_path_factory) -> str:
    from vllm_utils.testing.tiny_got_ocr2 import build_tiny_got_ocr2

    return build_tiny_got_ocr2(str(tmp_path_factory.mktemp("got_ocr2")), seed=14)


@pytest.fixture(scope="module")
def got_reference(tiny_got) -> HFReference:
    return HFReference(tiny_got)


def engine(folder: str, **kwargs) -> LLM:
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("max_model_len", 1024)
    return LLM(folder, device="cpu", **kwargs)


def requests(adapter, images) -> list[dict]:
    """Plain OCR of each picture, and formatted OCR of both (one resized tall) in one prompt."""
    cases = [("OCR: ", [images[0]]), ("OCR with format: ", [images[0], images[1].resize((100, 180))]),
             ("OCR: ", [images[1]])]
    return [{"prompt": adapter.chat_prompt(text, len(ims)), "multi_modal_data": {"image": ims}} for text, ims in cases]


def test_a_batch_of_pages_gives_hfs_tokens_and_logprobs(tiny_got, got_reference, images):
    llm = engine(tiny_got)
    reqs = requests(llm.engine.processor, images)
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(reqs, params, use_tqdm=False)
    for req, out in zip(reqs, outputs):
        ours = out.outputs[0]
        assert ours.token_ids == got_reference.greedy(req, TOKENS, ignore_eos=True)
        theirs = got_reference.token_logprobs(req, ours.token_ids)
        assert max(abs(e[t].logprob - r) for e, t, r in zip(ours.logprobs, ours.token_ids, theirs)) < 1e-4
        assert len(set(ours.token_ids)) >= 3  # the reference's tokens vary
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == len(outputs)  # the pages are read


def test_the_prompt_is_the_one_gots_processor_writes(tiny_got, got_reference, images):
    """Without a chat template on the hub, the adapter writes GOT's conversation: the processor's own, token for
    token, for its plain OCR query."""
    llm = engine(tiny_got)
    ids, _ = llm.engine.processor.process(llm.engine.processor.chat_prompt(" OCR: ", 1), [images[0]])
    assert ids == got_reference.processor.hf_processor(images=[images[0]])["input_ids"][0]


def test_pages_prefilled_in_chunks_give_hfs_tokens(tiny_got, got_reference, images):
    llm = engine(tiny_got, max_num_batched_tokens=100)
    req = requests(llm.engine.processor, images)[1]
    out = llm.generate(req, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) > 500  # two pages of 256 positions, over six chunks
    assert out.outputs[0].token_ids == got_reference.greedy(req, TOKENS, ignore_eos=True)


@pytest.mark.parametrize("settings, pages", [
    ({"crop_to_patches": True, "max_patches": 2}, [(900, 300)]),  # a wide page: 2 tiles and the thumbnail
    ({"multi_page": True}, [(256, 256), (300, 400)]),  # two pages behind one placeholder
    ({"multi_page": True, "crop_to_patches": True, "max_patches": 2}, [(256, 256), (200, 500)]),
])
def test_multi_crop_and_multi_page_give_hfs_tokens_and_logprobs(tiny_got, images, settings, pages):
    """mm_processor_kwargs reach GOT's processor for our engine and for HF alike; the tiles take their positions."""
    from vllm_utils.config import EngineConfig
    from vllm_utils.engine.resolve import resolve

    llm = engine(tiny_got, max_model_len=4096, mm_processor_kwargs=settings)
    adapter = llm.engine.processor
    pictures = [images[i % 2].resize(size) for i, size in enumerate(pages)]
    req = {"prompt": adapter.chat_prompt("OCR: ", len(pictures)), "multi_modal_data": {"image": pictures}}
    out = llm.generate(req, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0]
    reference = HFReference(resolve(EngineConfig(tiny_got, dtype="float32", mm_processor_kwargs=settings)))
    hf_ids = reference.inputs(req)["input_ids"][0].tolist()
    assert out.prompt_token_ids == hf_ids and hf_ids.count(adapter.mm_token_id) > 256 * len(pages) - 1
    ours = out.outputs[0]
    assert ours.token_ids == reference.greedy(req, TOKENS, ignore_eos=True)
    theirs = reference.token_logprobs(req, ours.token_ids)
    assert max(abs(e[t].logprob - r) for e, t, r in zip(ours.logprobs, ours.token_ids, theirs)) < 1e-4


def test_processor_settings_are_checked_by_name(tiny_got, tmp_path):
    run = cli("--demo", f"--model={tiny_got}", "--device=cpu", '--mm-processor-kwargs={"crop_to_patch": true}',
              cwd=str(tmp_path))
    assert run.returncode == 1 and "Loading the model" not in run.stderr
    assert error_lines(run) == ["error: mm_processor_kwargs 'crop_to_patch' is not a setting of got_ocr2's "
                                "processor here (it takes: crop_to_patches, min_patches, max_patches, multi_page)"]
    run = cli("--demo", f"--model={tiny_got}", "--device=cpu", "--mm-processor-kwargs=crop", cwd=str(tmp_path))
    assert run.returncode == 1 and "takes a JSON object" in error_lines(run)[0]
    for settings, words in (('{"max_patches": "12"}', "'max_patches' = '12': it takes a whole number >= 1"),
                            ('{"crop_to_patches": 1}', "'crop_to_patches' = 1: it takes true or false")):
        run = cli("--demo", f"--model={tiny_got}", "--device=cpu", f"--mm-processor-kwargs={settings}",
                  cwd=str(tmp_path))
        assert run.returncode == 1 and "Traceback" not in run.stderr and words in error_lines(run)[0], run.stderr


def test_demo_of_a_cropped_page_agrees_with_hf(tiny_got, images, tmp_path):
    images[1].resize((900, 300)).save(tmp_path / "wide.png")
    run = cli("--demo", f"--model={tiny_got}", f"--input-image={tmp_path / 'wide.png'}", "--prompt=OCR: ",
              '--mm-processor-kwargs={"crop_to_patches": true, "max_patches": 2}', "--dtype=float32",
              "--device=cpu", "--output-len=8", "--reference=hf", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == 1 and agreement["exact_match_rate"] == 1.0, agreement


def test_bf16_logprobs_close_to_hf_fp32(tiny_got, got_reference, images):
    llm = engine(tiny_got, dtype="bfloat16")
    req = requests(llm.engine.processor, images)[0]
    out = llm.generate(req, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    assert_bf16_close(chosen_logprobs(out), tiny_got, req, out.token_ids, got_reference)


@pytest.mark.parametrize("size", [(20, 20), (256, 256), (300, 40), (33, 500), (1240, 1754)])
def test_pixels_and_positions_equal_hfs_processor(tiny_got, got_reference, images, size):
    """The folder's processor and the one built from the config alone make the same pixels; a page takes the
    positions HF's processor expands it to."""
    adapter = got_reference.processor
    image = images[1].resize(size)
    ids, ours = adapter.process(adapter.chat_prompt("OCR: ", 1), [image])
    hf = adapter.hf_processor(images=[image], text=adapter.chat_prompt("OCR: ", 1), return_tensors="pt")
    assert ids == hf["input_ids"][0].tolist()
    assert ids.count(adapter.mm_token_id) == adapter.item_positions(ours)[0] == 256
    fallback = adapter.fallback_image_processor()(images=[image], return_tensors="pt")
    assert torch.equal(ours["pixel_values"], hf["pixel_values"])
    assert torch.equal(ours["pixel_values"], fallback["pixel_values"])


def test_demo_agrees_with_hf(tiny_got, images, tmp_path):
    images[0].save(tmp_path / "page.png")
    run = cli("--demo", f"--model={tiny_got}", f"--input-image={tmp_path / 'page.png'}", "--prompt=OCR: ",
              "--dtype=float32", "--device=cpu", "--output-len=12", "--reference=hf", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    agreement = json.loads(run.stdout.split("***Reference Agreement***")[1])
    assert agreement["samples_compared"] == 1 and agreement["exact_match_rate"] == 1.0, agreement


def test_acc_on_the_bundled_fox_sample_agrees_with_hf_fp32(tiny_got, tmp_path):
    """GOT-OCR2's benchmark: Fox's layout, each reply scored by Fox's OCR measures."""
    run = cli("--acc", f"--model={tiny_got}", "--device=cpu", "--dtype=float32", "--dataset=sample-fox",
              "--reference=hf", "--output-len=8", "--batch-size=3", f"--save-output={tmp_path / 'out.jsonl'}",
              cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout.split("***Acc Info***", 1)[1].split("\n}\n", 1)[0] + "\n}")
    ref = info["reference"]
    assert ref["samples_compared"] == 3 and ref["exact_match_rate"] == 1.0 and ref["max_abs_dlogprob"] < 1e-4
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert info["metric"] == "f1" and set(info["ocr"]) == set(records[0]["measures"])
    assert info["ocr"]["edit_distance"] == pytest.approx(sum(r["measures"]["edit_distance"] for r in records) / 3)


def test_the_bundled_config_builds_hfs_parameters_on_meta():
    from transformers import AutoModelForImageTextToText

    from vllm_utils.config import load_hf_config
    from vllm_utils.engine.model_runner import build_model
    from vllm_utils.models.got_ocr2 import GotOcr2ForConditionalGeneration

    config = load_hf_config("stepfun-ai/GOT-OCR-2.0-hf")
    ours = build_model(config, GotOcr2ForConditionalGeneration, torch.device("meta"), torch.bfloat16)
    with torch.device("meta"):
        hf = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert ours.num_image_features == 256
