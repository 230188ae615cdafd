"""The OpenAI-compatible server (`python3 -m vllm_utils.serve`) and the load generator (`vllm_utils.bench_serve`),
through the official `openai` client on 127.0.0.1 with the tiny LLaVA: greedy text equal to `LLM`'s for chat with
images (streamed and not) and completions; every bad request a 4xx with an OpenAI-style body while the server goes
on; a bounded load answered whole with every KV block free after it, its figures matching the server's /metrics; a
client gone mid-stream freeing its blocks; SIGTERM ending the server cleanly."""
import base64
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from vllm_utils.llm import LLM  # noqa: E402
from vllm_utils.sampling_params import SamplingParams  # noqa: E402

KEY = "test-key"
MAX_MODEL_LEN = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bomb_url() -> str:
    """A PNG whose header claims 30000 x 30000 pixels (over twice PIL's bomb limit), with no pixel data to read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture(scope="module")
def media(tmp_path_factory, images):
    """An allowed folder holding one picture, and a picture outside it."""
    allowed = tmp_path_factory.mktemp("media")
    outside = tmp_path_factory.mktemp("elsewhere")
    images[1].save(allowed / "b.png")
    images[1].save(outside / "b.png")
    return str(allowed), str(allowed / "b.png"), str(outside / "b.png")


@pytest.fixture(scope="module")
def server(tiny_llava, media, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_utils.serve", "--model", tiny_llava, "--port", str(port), "--api-key", KEY,
             "--max-model-len", str(MAX_MODEL_LEN), "--batch-size", "32", "--allowed-local-media-path", media[0],
             "--uvicorn-log-level", "warning"], stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_UTILS_CPU_FOLLOW_LOAD": "0"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the server did not come up:\n" + log.read_text())
    yield {"base": base, "proc": proc, "log": log, "model": tiny_llava}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(tiny_llava, media):
    return LLM(tiny_llava, max_model_len=MAX_MODEL_LEN, allowed_local_media_path=media[0])


def metrics(server) -> dict[str, float]:
    """The /metrics samples, by name (labels dropped; the server serves one model)."""
    text = httpx.get(server["base"] + "/metrics").text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = re.sub(r"\{.*\}", "", line).rsplit(" ", 1)
            values[name] = values.get(name, 0.0) + float(value)
    return values


def _stream_text(stream, chat: bool = True) -> str:
    pieces = []
    for chunk in stream:
        if chunk.choices:
            pieces.append((chunk.choices[0].delta.content if chat else chunk.choices[0].text) or "")
    return "".join(pieces)


GREEDY = SamplingParams(temperature=0, max_tokens=12)


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [server["model"]]
    assert httpx.get(server["base"] + "/health").status_code == 200
    m = metrics(server)
    assert m["vllm:num_requests_running"] == 0 and m["vllm_utils:kv_blocks_total"] > 0


@pytest.mark.parametrize("two_images", [False, True])
def test_chat_with_images_matches_llm(server, client, llm, images, media, two_images):
    parts = [{"type": "image_url", "image_url": {"url": _png_url(images[0])}}]
    if two_images:  # the second from the allowed folder, as a file:// URL
        parts.append({"type": "image_url", "image_url": {"url": "file://" + media[1]}})
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": "What is in the picture?"}]}]
    expected = llm.chat(messages, GREEDY, use_tqdm=False)[0].outputs[0]
    before = metrics(server)
    reply = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == len(expected.token_ids)
    stream = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    assert _stream_text(stream) == expected.text
    after = metrics(server)  # the second ask started after the first's cached blocks, image included
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] > 0
    assert after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"] == 2 * \
        reply.usage.prompt_tokens


def test_completions_match_llm(server, client, llm):
    prompt = "The quick brown fox"
    expected = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    reply = client.completions.create(model=server["model"], prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected.outputs[0].text
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    stream = client.completions.create(model=server["model"], prompt=prompt, max_tokens=12, temperature=0,
                                       stream=True)
    assert _stream_text(stream, chat=False) == expected.outputs[0].text
    ids = client.completions.create(model=server["model"], prompt=expected.prompt_token_ids, max_tokens=12,
                                    temperature=0)
    assert ids.choices[0].text == expected.outputs[0].text
    text = expected.outputs[0].text.strip()
    stop = text[len(text) // 2: len(text) // 2 + 3]  # a stop string in the middle: cut alike, streamed or not
    cut = llm.generate(prompt, GREEDY.replace(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert len(cut.text) < len(expected.outputs[0].text)
    for stream in (False, True):
        reply = client.completions.create(model=server["model"], prompt=prompt, max_tokens=12, temperature=0,
                                          stop=[stop], stream=stream)
        assert (_stream_text(reply, chat=False) if stream else reply.choices[0].text) == cut.text
    sampled = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=8)  # seeded samples: the same in any batch
    expected = [c.text for c in llm.generate(prompt, sampled, use_tqdm=False)[0].outputs]
    reply = client.completions.create(model=server["model"], prompt=prompt, n=2, temperature=1.0, seed=7, max_tokens=8)
    assert [c.text for c in reply.choices] == expected


def _image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe it."}]}]


def test_bad_requests_are_4xx_and_the_server_goes_on(server, client, media, tmp_path):
    model = server["model"]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = httpx.post(server["base"] + "/v1/chat/completions", content=b'{"model": ', headers=headers)
    assert raw.status_code == 400 and "JSON" in raw.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max-model-len"):
        client.completions.create(model=model, prompt=[5] * MAX_MODEL_LEN, max_tokens=2)
    bad = {
        "undecodable": ("data:image/png;base64," + base64.b64encode(b"not a picture").decode(), "base64 image"),
        "oversized": (_bomb_url(), "more pixels"),
        "outside": ("file://" + media[2], "outside allowed_local_media_path"),
        "remote": ("https://example.com/cat.png", "would be downloaded"),
    }
    for url, message in bad.values():
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model=model, messages=_image_message(url), max_tokens=2)
    video = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file://" + media[1]}}]}]
    with pytest.raises(openai.BadRequestError, match="takes no video"):
        client.chat.completions.create(model=model, messages=video, max_tokens=2)
    for key in (None, "wrong"):
        other = httpx.post(server["base"] + "/v1/completions", json={"model": model, "prompt": "hi"},
                           headers={"Authorization": f"Bearer {key}"} if key else {})
        assert other.status_code == 401 and other.json()["error"]["type"] == "AuthenticationError"
    body = httpx.post(server["base"] + "/v1/completions", json={"model": model, "prompt": "hi", "n": 0},
                      headers=headers).json()["error"]
    assert body["code"] == 400 and "n must be" in body["message"]
    assert client.completions.create(model=model, prompt="still here", max_tokens=2).usage.completion_tokens == 2
    assert httpx.get(server["base"] + "/health").status_code == 200


def test_client_gone_mid_stream_frees_its_blocks(server):
    before = metrics(server)
    request = {"model": server["model"], "prompt": "a long story", "max_tokens": MAX_MODEL_LEN - 16,
               "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server["base"] + "/v1/completions", json=request,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert metrics(server)["vllm_utils:kv_blocks_used"] > 0  # it is running
    # the connection is closed: the request leaves the engine, its blocks freed, long before it could have finished
    deadline = time.time() + 10
    while time.time() < deadline and metrics(server)["vllm_utils:kv_blocks_used"] > 0:
        time.sleep(0.05)
    after = metrics(server)
    assert after["vllm_utils:kv_blocks_used"] == 0
    assert after["vllm_utils:request_aborted_total"] == before["vllm_utils:request_aborted_total"] + 1
    # and a request whose client stops waiting before a whole (non-streamed) answer
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["base"] + "/v1/completions", json={**request, "stream": False, "n": 4},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    deadline = time.time() + 10
    while time.time() < deadline and metrics(server)["vllm_utils:request_aborted_total"] < \
            before["vllm_utils:request_aborted_total"] + 2:
        time.sleep(0.05)
    after = metrics(server)
    assert after["vllm_utils:request_aborted_total"] == before["vllm_utils:request_aborted_total"] + 2
    assert after["vllm_utils:kv_blocks_used"] == 0


def test_load_generator_under_load(server, tmp_path, capsys):
    """100 requests at concurrency 16: all answered, none lost, every block free after, and the load generator's
    figures agree with the server's own histograms."""
    from vllm_utils.bench_serve import main

    before = metrics(server)
    out = tmp_path / "bench.json"
    argv = ["--base-url", server["base"], "--api-key", KEY, "--input-len", "48", "--output-len", "4",
            "--num-prompts", "100", "--max-concurrency", "16", "--input-vision-shape", "56,56",
            "--goodput", "ttft:60000", "--result-dir", str(tmp_path), "--result-filename", "bench.csv",
            "--output-json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "***Perf Info***" in printed and "end-to-end latency (ms)" in printed
    result = json.loads(out.read_text())
    figures, requests = result["metrics"], result["requests"]
    assert figures["requests"] == 100 and figures["failed"] == 0 and figures["good_requests"] == 100
    assert all(r["output_tokens"] == 4 for r in requests)
    assert abs(figures["input_tokens_per_request"]["mean"] - 48) <= 3
    rows = dict(line.split(",", 1) for line in (tmp_path / "bench.csv").read_text().splitlines()[1:])
    assert float(rows["request_per_second"]) == pytest.approx(figures["requests_per_s"], rel=1e-3)
    after = metrics(server)
    assert after["vllm_utils:kv_blocks_used"] == 0
    assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0

    def delta(name: str) -> float:
        return after[name] - before[name]
    # the warm-up request is the 101st the server saw
    assert delta("vllm:time_to_first_token_seconds_count") == 101
    assert delta("vllm:generation_tokens_total") == 100 * 4 + min(4, 8)
    assert delta("vllm:prompt_tokens_total") >= figures["input_tokens"]
    # the client's times hold the server's (plus building, sending and reading the requests on a shared CPU)
    for name, key in (("time_to_first_token_seconds", "ttft_ms"), ("e2e_request_latency_seconds", "e2el_ms")):
        server_mean = 1e3 * delta(f"vllm:{name}_sum") / delta(f"vllm:{name}_count")
        client_mean = figures[key]["mean"]
        assert server_mean <= client_mean + 5, (name, server_mean, client_mean)
        assert client_mean - server_mean <= max(100.0, 0.5 * client_mean), (name, server_mean, client_mean)


def test_sigterm_ends_the_server_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = server["log"].read_text()
    assert "Traceback" not in log, log
