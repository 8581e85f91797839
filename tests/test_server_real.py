"""The server on the offline pair (Gemma 3 270M + the bundled drafter): greedy output equals
`generate --mode ar`, and a burst of concurrent and malformed requests loses nothing.

The offline verifier's tokenizer has no chat template (it is rebuilt from the GGUF's
vocabulary): its chat requests take mlx-lm's plain `USER: ... ASSISTANT:` form."""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from mlx_engine.engine import Engine, RunOptions
from mlx_engine.generate import main as generate_main
from mlx_engine.server_bench import ServerProcess

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

PROMPTS = ["def fibonacci(n):", "Name three primary colours.", "import os\n\ndef list_py(path):",
           "The capital of France is", "for i in range(10):"]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--max-tokens", "8"], timeout_s=900) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def test_greedy_output_equals_generate_ar(client, capsys):
    for prompt in PROMPTS[:1]:
        argv = ["--mode", "ar", "--prompt", prompt, "--max-tokens", "12", "--no-warmup"]
        assert generate_main(argv) == 0
        expected = capsys.readouterr().out.removesuffix("\n")
        whole = client.completions.create(model="default", prompt=prompt, max_tokens=12)
        streamed = client.completions.create(model="default", prompt=prompt, max_tokens=12,
                                             stream=True)
        assert whole.choices[0].text == expected and expected.strip()
        assert "".join(c.choices[0].text for c in streamed) == expected


def test_fifty_requests_from_eight_clients_then_twenty_malformed(server, client):
    engine = Engine.load("default", None)
    expected = {}
    for p in PROMPTS:
        text: list[str] = []
        engine.run("ar", engine.encode(p), RunOptions(8), on_text=text.append)
        expected[p] = "".join(text)
    chat = [{"role": "user", "content": PROMPTS[1]}]
    text = []
    engine.run("ar", engine.encode(chat), RunOptions(8), on_text=text.append)
    expected_chat = "".join(text)
    del engine

    def ask(prompt: str) -> str:
        return client.completions.create(model="default", prompt=prompt,
                                         max_tokens=8).choices[0].text

    jobs = PROMPTS * 10
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [expected[p] for p in jobs]

    where = urlsplit(server.url)
    statuses = []
    for i in range(20):
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        body = b'{"prompt": [' if i % 2 else json.dumps({"prompt": "x", "max_tokens": -i})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        statuses.append(response.status)
        assert "error" in json.loads(response.read())
        conn.close()
    assert len(statuses) == 20 and all(400 <= s < 500 for s in statuses)
    assert ask(PROMPTS[1]) == expected[PROMPTS[1]]
    answer = client.chat.completions.create(model="default", messages=chat, max_tokens=8)
    assert answer.choices[0].message.content == expected_chat
