"""`python -m mlx_engine.server` on a tiny pair, driven by the real `openai` client."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tiny import drafter_config, prompt_tokens, save_model_dir, save_random_drafter, words

from mlx_engine.engine import Engine, RunOptions
from mlx_engine.server_bench import ServerProcess

openai = pytest.importorskip("openai")

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # words in, words out
PROMPTS = [words(prompt_tokens(40, seed=s)) for s in range(4)]  # past the sliding window
MAX_BODY = 65536


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("served")
    model = save_model_dir(root / "model")
    config_file = model / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "chat_template": TEMPLATE}))
    draft = save_random_drafter(root / "draft", drafter_config(6, block_size=8))
    return model, draft


@pytest.fixture(scope="module")
def server(pair):
    model, draft = pair
    with ServerProcess(["--model", str(model), "--draft", str(draft), "--max-tokens", "32",
                        "--max-body-bytes", str(MAX_BODY)], timeout_s=300) as running:
        yield running


@pytest.fixture(scope="module")
def engine(pair) -> Engine:
    model, _ = pair
    return Engine.load(str(model), None)


@pytest.fixture(scope="module")
def client(server, pair):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _ar_text(engine: Engine, prompt: str | list[dict[str, str]], n: int, chat: bool) -> str:
    ids = engine.encode(prompt, chat_template=chat)
    text: list[str] = []
    engine.run("ar", ids, RunOptions(n, ignore_eos=True), on_text=text.append)
    return "".join(text)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _request(server, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict]:
    where = urlsplit(server.url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, payload = response.status, response.read()
    conn.close()
    return status, json.loads(payload)


def test_models_and_health(server, client, pair):
    model, _ = pair
    assert [m.id for m in client.models.list()] == [str(model)]
    status, health = _request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["mode"] == "fused"


def test_greedy_chat_and_completion_equal_ar(client, engine, pair):
    model = str(pair[0])
    for prompt in PROMPTS[:2]:
        chat = client.chat.completions.create(model=model, messages=_user(prompt),
                                              max_tokens=24, extra_body={"ignore_eos": True})
        assert chat.choices[0].message.content == _ar_text(engine, _user(prompt), 24, True)
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage.completion_tokens == 24
        assert chat.usage.prompt_tokens == len(engine.encode(_user(prompt)))
        stats = chat.model_extra["decoding"]
        assert stats["mode"] == "fused" and stats["rounds"] > 0 and stats["decode_tok_s"] > 0
        text = client.completions.create(model=model, prompt=prompt, max_tokens=24,
                                         extra_body={"ignore_eos": True})
        assert text.choices[0].text == _ar_text(engine, prompt, 24, False)


def test_streaming_gives_the_same_text(client, engine, pair):
    model, prompt = str(pair[0]), PROMPTS[2]
    chunks = list(client.chat.completions.create(
        model=model, messages=_user(prompt), max_tokens=24, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == _ar_text(engine, _user(prompt), 24, True)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    pieces = list(client.completions.create(model=model, prompt=prompt, max_tokens=24,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in pieces) == _ar_text(engine, prompt, 24, False)
    assert len(pieces) > 2  # it did stream


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text(client, engine, pair, stream):
    model, prompt = str(pair[0]), PROMPTS[3]
    full = _ar_text(engine, _user(prompt), 32, True)
    stop = full.split()[5]
    expected = full[: full.index(stop)]
    answer = client.chat.completions.create(model=model, messages=_user(prompt), max_tokens=32,
                                            stop=[stop, "never-seen"], stream=stream,
                                            extra_body={"ignore_eos": True})
    if stream:
        chunks = [c for c in answer if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
    assert text == expected and finish == "stop"


def test_seed_reproduces_a_sampled_answer(client, pair):
    def sample(seed: int) -> str:
        return client.completions.create(model=str(pair[0]), prompt=PROMPTS[0], max_tokens=24,
                                         temperature=1.0, top_p=0.95, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9, 10))


def test_prompt_cache_serves_the_next_turn(client, engine, pair):
    model = str(pair[0])
    turn = _user(PROMPTS[1])
    reply = client.chat.completions.create(model=model, messages=turn, max_tokens=16,
                                           extra_body={"ignore_eos": True})
    turn = [*turn, {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": words(prompt_tokens(8, seed=9))}]
    second = client.chat.completions.create(model=model, messages=turn, max_tokens=16,
                                            extra_body={"ignore_eos": True})
    assert second.usage.prompt_tokens_details.cached_tokens >= 40
    assert second.model_extra["decoding"]["cached_tokens"] >= 40
    assert second.choices[0].message.content == _ar_text(engine, turn, 16, True)


BAD_REQUESTS = {
    "malformed JSON": ("/v1/chat/completions", b'{"messages": [', 400),
    "not an object": ("/v1/completions", b"[1, 2]", 400),
    "unknown model": ("/v1/completions", {"model": "gpt-9", "prompt": "xab"}, 404),
    "negative max_tokens": ("/v1/completions", {"prompt": "xab", "max_tokens": -1}, 400),
    "missing messages": ("/v1/chat/completions", {"max_tokens": 4}, 400),
    "no messages": ("/v1/chat/completions", {"messages": []}, 400),
    "temperature a word": ("/v1/completions", {"prompt": "xab", "temperature": "hot"}, 400),
    "n of 2": ("/v1/completions", {"prompt": "xab", "n": 2}, 400),
    "empty prompt": ("/v1/completions", {"prompt": " "}, 400),
    "token id out of range": ("/v1/completions", {"prompt": [1, 10**6]}, 400),
    "block size too big": ("/v1/completions", {"prompt": "xab", "block_size": 99}, 400),
    "oversize body": ("/v1/completions", {"prompt": "xab " * MAX_BODY}, 413),
    "unknown route": ("/v1/nothing", {}, 404),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_json_4xx(server, case):
    path, body, expected = BAD_REQUESTS[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = _request(server, "POST", path, raw)
    assert status == expected, answer
    message = answer["error"]["message"]
    assert message and "\n" not in message and "Traceback" not in message


def test_errors_leave_the_server_serving(server, client, pair):
    for case in ("malformed JSON", "oversize body", "block size too big"):
        test_bad_requests_get_a_json_4xx(server, case)
    assert client.completions.create(model=str(pair[0]), prompt=PROMPTS[0],
                                     max_tokens=4).choices[0].finish_reason
    status, health = _request(server, "GET", "/health")
    assert status == 200 and health["failed"] == 0


def test_a_chunked_oversize_body_and_a_wrong_method(server):
    """No Content-Length to go by: the body is counted as it arrives."""
    where = urlsplit(server.url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    pieces = [b'{"prompt": "', *[b"xab " * 1024] * 32, b'"}']
    conn.request("POST", "/v1/completions", iter(pieces),
                 {"Content-Type": "application/json"}, encode_chunked=True)
    response = conn.getresponse()
    status, answer = response.status, json.loads(response.read())
    conn.close()
    assert status == 413 and "larger than" in answer["error"]["message"]
    status, answer = _request(server, "GET", "/v1/completions")
    assert status == 405 and answer["error"]["message"]


def _health(server) -> dict:
    return _request(server, "GET", "/health")[1]


def test_a_client_that_goes_away_frees_the_model(server, client, pair):
    before = _health(server)["cancelled"]
    where = urlsplit(server.url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    body = {"prompt": PROMPTS[0], "max_tokens": 10**6, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 60
    while (_health(server)["cancelled"] == before or _health(server)["busy"]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _health(server)["cancelled"] == before + 1 and not _health(server)["busy"]
    assert client.completions.create(model=str(pair[0]), prompt=PROMPTS[1],
                                     max_tokens=4).choices[0].finish_reason


def test_concurrent_requests_are_queued_and_all_answered_exactly(server, client, engine, pair):
    model = str(pair[0])
    expected = {p: _ar_text(engine, p, 12, False) for p in PROMPTS}
    served = _health(server)["served"]

    def ask(prompt: str) -> str:
        return client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                         extra_body={"ignore_eos": True}).choices[0].text

    jobs = PROMPTS * 4
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [expected[p] for p in jobs]
    assert _health(server)["served"] == served + len(jobs)


@pytest.mark.parametrize("argv, expected", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--model", "/nonexistent/model"], "neither an existing dir"),
])
def test_cli_errors_are_one_line(argv, expected):
    proc = subprocess.run([sys.executable, "-m", "mlx_engine.server", "--port", "0", *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr, proc.stderr


def test_a_taken_port_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "mlx_engine.server", "--port", str(port)],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "cannot listen on 127.0.0.1" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
