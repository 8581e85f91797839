"""`python -m mlx_engine.server_bench`: the server's speed against in-process decoding.

Starts `python -m mlx_engine.server` on a free port and loads the same pair here. Per prompt of
a workload, back to back in an order rotated from prompt to prompt: one streamed request to
the server, the same prompt through `Engine.generate` in this process (what `generate` runs)
and plain AR (the oracle). The server's output must be the in-process output and AR's. Then
every prompt again from 1 and from N concurrent clients: requests/s and tok/s as clients see
them (the model runs one request at a time; the queue must lose none). Evidence JSON, schema
v1: the in-process arms per sample, the server's under `server`, its aggregates beside them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import evidence, workloads
from .bench import _requested_width
from .engine import DTYPES, Engine, RunOptions, RunResult
from .errors import UserError, cli_entry
from .sources import DEFAULT

START_TIMEOUT_S = 1800  # loading, converting on first use and warm-up


class ServerProcess:
    """`python -m mlx_engine.server ARGS --port 0` for as long as the with-block lasts."""

    def __init__(self, args: list[str], timeout_s: float = START_TIMEOUT_S):
        self.args, self.timeout_s = args, timeout_s
        self.url = ""
        self.log: list[str] = []
        self._ready = threading.Event()

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_engine.server", *self.args, "--port", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + self.timeout_s
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start: " + "".join(self.log[-5:]))
        return self

    def _drain(self) -> None:
        """Keep reading its log (a full pipe would block it) and find its address."""
        for line in self.proc.stderr:
            self.log.append(line)
            if match := re.search(r"serving .* on (http://\S+)", line):
                self.url = match.group(1)
                self._ready.set()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ClientRun:
    """One streamed completion as the client saw it."""

    text: str
    sent: float
    first: float | None  # arrival of the first text
    last: float  # arrival of the final chunk
    usage: dict[str, Any] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.usage.get("completion_tokens", 0)

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first per second between their arrivals (as decode_tok_s is)."""
        span = self.last - (self.first or self.last)
        return (self.tokens - 1) / span if span > 0 else 0.0

    @property
    def e2e_tok_s(self) -> float:
        return self.tokens / (self.last - self.sent) if self.last > self.sent else 0.0


def stream_completion(url: str, body: dict[str, Any], timeout_s: float = 3600) -> ClientRun:
    """POST a streamed /v1/completions request and time its chunks as they arrive."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout_s)
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(payload),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"server answered {response.status}: {response.read()[:200]!r}")
    run = ClientRun("", sent, None, sent)
    for raw in response:
        data = raw.decode().strip().removeprefix("data: ")
        if not raw.startswith(b"data: ") or data == "[DONE]":
            continue
        event, now = json.loads(data), time.perf_counter()
        run.usage = event.get("usage") or run.usage
        for choice in event["choices"]:
            if choice["text"] and run.first is None:
                run.first = now
            run.text += choice["text"]
            if choice["finish_reason"] is not None:
                run.decoding, run.last = event["decoding"], now
    conn.close()
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_engine.server_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="code",
                   help=f"one of {', '.join(workloads.NAMES)}, or a .jsonl file of prompts")
    p.add_argument("--n", type=int, default=8, help="first N prompts")
    p.add_argument("--max-tokens", "-m", type=int, default=128)
    p.add_argument("--block-size", default="auto", help="a fixed width 2..drafter's, or auto")
    p.add_argument("--model", default=DEFAULT, help="mlx-lm model dir or HF id")
    p.add_argument("--draft", default=DEFAULT, help="DFlash drafter dir or HF id")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (besides 1)")
    p.add_argument("--json", type=Path, default=None, help="write evidence JSON (schema v1)")
    return p


class Arms:
    """The three ways one prompt is decoded, and the request the server gets for it."""

    def __init__(self, engine: Engine, url: str, fixed: int | None, max_tokens: int):
        self.engine, self.url, self.fixed, self.max_tokens = engine, url, fixed, max_tokens

    def request(self, prompt: workloads.Prompt, ids: list[int]) -> dict[str, Any]:
        body = {"prompt": ids, "max_tokens": self.max_tokens, "temperature": 0,
                "stop": list(prompt.stop or []), "ignore_eos": prompt.ignore_eos}
        return body if self.fixed is None else {**body, "block_size": self.fixed}

    def local(self, mode: str, prompt: workloads.Prompt, ids: list[int]
              ) -> tuple[RunResult, str]:
        opts = RunOptions(max_tokens=self.max_tokens, block_size=self.fixed,
                          ignore_eos=prompt.ignore_eos, stop=tuple(prompt.stop or ()))
        text: list[str] = []
        return self.engine.run(mode, ids, opts, on_text=text.append), "".join(text)

    def sample(self, index: int, prompt: workloads.Prompt, ids: list[int]) -> dict[str, Any]:
        arms = ["server", "fused", "ar"]
        shift = index % len(arms)
        got: dict[str, Any] = {}
        for arm in arms[shift:] + arms[:shift]:
            got[arm] = (stream_completion(self.url, self.request(prompt, ids))
                        if arm == "server" else self.local(arm, prompt, ids))
        (ar, ar_text), (fused, fused_text), server = got["ar"], got["fused"], got["server"]
        served = {
            "decode_tok_s": server.decoding["decode_tok_s"],
            "client_decode_tok_s": server.decode_tok_s, "client_e2e_tok_s": server.e2e_tok_s,
            "new_tokens": server.tokens, "tau": server.decoding["tau"],
            "cached_tokens": server.decoding["cached_tokens"],
            "matches_generate": server.text == fused_text, "matches_ar": server.text == ar_text,
        }
        return evidence.sample_record(prompt.id, len(ids), self.engine.block_size(self.fixed),
                                      ar, fused, {"server": served})

    def concurrent(self, clients: int, prompts: list[tuple[workloads.Prompt, list[int]]]
                   ) -> dict[str, Any]:
        """Every prompt once, from `clients` threads at a time."""
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            runs = list(pool.map(lambda p: stream_completion(self.url, self.request(*p)),
                                 prompts))
        wall = time.perf_counter() - start
        tokens = sum(r.tokens for r in runs)
        return {"clients": clients, "requests": len(runs), "wall_s": wall,
                "requests_per_s": len(runs) / wall, "tok_s": tokens / wall,
                "median_decode_tok_s": evidence.median([r.decoding["decode_tok_s"]
                                                        for r in runs])}


def server_aggregate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The server's speed next to the in-process fused arm's, per prompt, and its exactness."""
    served = [s["server"] for s in samples]
    timed = [s for s in samples if s["fused"]["decode_tok_s"] > 0]

    def vs_generate(key: str) -> float | None:
        return evidence.median([s["server"][key] / s["fused"]["decode_tok_s"] for s in timed])

    return {
        "server_decode_tok_s": evidence.median([s["decode_tok_s"] for s in served]),
        "server_client_decode_tok_s": evidence.median([s["client_decode_tok_s"]
                                                       for s in served]),
        "server_vs_generate": vs_generate("decode_tok_s"),
        "server_client_vs_generate": vs_generate("client_decode_tok_s"),
        "server_identical_all": all(s["matches_generate"] and s["matches_ar"] for s in served),
    }


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    evidence.code_version()
    for flag, value in (("--n", args.n), ("--max-tokens", args.max_tokens),
                        ("--clients", args.clients)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, not {value}")
    fixed = _requested_width(args.block_size)
    prompts = workloads.load(args.workload)[: args.n]
    engine = Engine.load(args.model, args.draft, args.dtype)
    width = engine.block_size(fixed)
    ids = [workloads.encode(engine, p) for p in prompts]
    engine.warmup(RunOptions(block_size=fixed))
    server_args = ["--model", args.model, "--draft", args.draft,
                   "--max-tokens", str(args.max_tokens)]
    server_args += ["--dtype", args.dtype] if args.dtype else []
    with ServerProcess(server_args) as server:
        print(f"server: {server.url}", file=sys.stderr)
        arms = Arms(engine, server.url, fixed, args.max_tokens)
        samples = []
        for i, (prompt, prompt_ids) in enumerate(zip(prompts, ids, strict=True)):
            samples.append(arms.sample(i, prompt, prompt_ids))
            s = samples[-1]
            print(f"{prompt.id}: server {s['server']['decode_tok_s']:.2f} tok/s (client "
                  f"{s['server']['client_decode_tok_s']:.2f}), generate "
                  f"{s['fused']['decode_tok_s']:.2f}, AR {s['ar']['decode_tok_s']:.2f} | "
                  f"same text {s['server']['matches_generate'] and s['server']['matches_ar']}",
                  file=sys.stderr)
        pairs = list(zip(prompts, ids, strict=True))
        concurrency = {str(c): arms.concurrent(c, pairs) for c in sorted({1, args.clients})}

    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    params["timing"] = ("per prompt: server request (streamed), in-process generate and AR back "
                        "to back, order rotated; server.decode_tok_s as the server's engine "
                        "measures it, client_* from chunk arrival times; " + evidence.TIMING)
    command = shlex.join(["python", "-m", __spec__.name, *argv])
    record = evidence.build_record(
        engine, params, samples, width, command=command, workload=args.workload,
        aggregate_extra={**server_aggregate(samples), "concurrency": concurrency})
    a = record["aggregate"]
    loads = " | ".join(f"{c} client(s): {v['requests_per_s']:.3f} req/s, {v['tok_s']:.2f} tok/s"
                       for c, v in concurrency.items())
    print(f"server decode {a['server_decode_tok_s']:.2f} tok/s = {a['server_vs_generate']:.3f}x "
          f"generate (client-side {a['server_client_vs_generate']:.3f}x) | {loads} | identical "
          f"{a['server_identical_all']}, lossless {a['lossless_all']}", file=sys.stderr)
    if args.json is not None:
        evidence.write(record, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
