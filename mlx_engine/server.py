"""`python -m mlx_engine.server`: an OpenAI-compatible HTTP server on the fused loop.

POST /v1/chat/completions and /v1/completions (whole, or streamed as server-sent events),
GET /v1/models and /health. Speculative by default (`--mode ar`: plain decoding). One model
in memory: requests queue and run one at a time on a worker thread (`worker.py`); each
reuses the previous one's KV rows as far as its prompt starts the same (`prompt_cache.py`).
A client that goes away frees the model between two rounds. Bad requests get a 4xx JSON
error in OpenAI's shape.

FastAPI + uvicorn: the most used ASGI stack on PyPI (vLLM's OpenAI server runs on it);
pydantic models validate every request field, Starlette streams SSE and reports a client's
disconnect, and uvicorn is a small pure-Python server (h11) with no build step on a Mac.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import secrets
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as exc:
    print(f"error: the server needs {exc.name}: pip install 'kakeya-mlx[server]'", file=sys.stderr)
    sys.exit(2)

from . import blas
from .engine import DTYPES, Engine, RunOptions
from .errors import UserError, cli_entry
from .openai_api import ChatRequest, CompletionRequest, Reply, decoding, error_body
from .sources import DEFAULT
from .speculative import GRAPH_MODES
from .worker import END, Job, Worker

DEFAULT_PORT = 8080
POLL_S = 0.25  # how often a waiting request checks that its client is still there


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_engine.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT,
                   help="mlx-lm model dir or HF id (default: offline Gemma 3 270M); the id "
                        "clients name it by")
    p.add_argument("--draft", default=DEFAULT,
                   help="z-lab-format DFlash drafter dir or HF id (default: bundled)")
    p.add_argument("--mode", choices=["fused", "ar"], default="fused",
                   help="speculative decoding (default) or plain AR decoding")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0: any free port")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="verifier dtype (default: as stored; offline model fp32 on CPU)")
    p.add_argument("--block-size", type=int, default=None,
                   help="verify width for requests that name none (default: adaptive)")
    p.add_argument("--graph", choices=GRAPH_MODES, default="two-phase")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="new-token budget of requests that set none")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for the model; more get 503")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="larger request bodies get 413")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    return p


class BodyLimit:
    """ASGI middleware: 413 for a body over the limit, counted as it arrives (uvicorn has no
    limit of its own, and a body is read whole before it is parsed)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is larger than {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if int(declared) > self.max_bytes:  # h11 has already refused a malformed length
            return await _error(413, too_large)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)


def _error(status: int, message: str, kind: str = "invalid_request_error",
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code), status_code=status)


def _failure(exc: BaseException) -> JSONResponse:
    """A job's error as a response: the request's fault (400) or ours (500, no traceback)."""
    if isinstance(exc, UserError):
        return _error(400, str(exc))
    return _error(500, f"internal error: {type(exc).__name__}", "server_error")


def _validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


def _sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def _next(job: Job, request: Request | None) -> Any:
    """The job's next event. With `request`: if its client goes away meanwhile, cancel the job
    and return END (a streaming response learns of it from Starlette instead)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), None if request is None else POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return END


class Server:
    """The HTTP side: validates, queues on the worker, formats what comes back."""

    def __init__(self, worker: Worker, engine: Engine, model_id: str,
                 args: argparse.Namespace):
        self.worker, self.engine, self.model_id, self.args = worker, engine, model_id, args
        self.mode = "ar" if engine.drafter is None else "fused"
        self.defaults = RunOptions(max_tokens=args.max_tokens, block_size=args.block_size,
                                   graph=args.graph)

    def app(self) -> FastAPI:
        app = FastAPI(title="kakeya-mlx", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(BodyLimit, max_bytes=self.args.max_body_bytes)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            return _error(400, _validation_message(exc))

        @app.exception_handler(HTTPException)
        async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
            return _error(exc.status_code, str(exc.detail))

        @app.exception_handler(Exception)
        async def crash(request: Request, exc: Exception) -> JSONResponse:
            return _failure(exc)

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {"status": "ok", "model": self.model_id, "mode": self.mode,
                    "busy": self.worker.busy, "queued": self.worker.queued,
                    **asdict(self.worker.counts)}

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                "created": 0, "owned_by": "kakeya-mlx"}]}

        @app.post("/v1/chat/completions")
        async def chat(body: ChatRequest, request: Request) -> Any:
            return await self.answer(body, request, chat=True)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Any:
            return await self.answer(body, request, chat=False)

        return app

    async def answer(self, body: ChatRequest | CompletionRequest, request: Request,
                     chat: bool) -> Any:
        if body.model is not None and body.model != self.model_id:
            return _error(404, f"model {body.model!r} is not served here (this server "
                               f"serves {self.model_id!r})", code="model_not_found")
        try:
            prompt = body.encode(self.engine)
            opts = body.options(self.defaults, secrets.randbelow(2**31))
            job = self.worker.submit(prompt, opts)
        except UserError as exc:
            return _failure(exc)
        except queue.Full:
            return _error(503, f"{self.args.max_queue} requests are already waiting",
                          "server_busy")
        reply = Reply(chat, self.model_id)
        first = await _next(job, request)
        if isinstance(first, BaseException):
            return _failure(first)
        if first is END:  # the client went away while its request waited
            return _error(499, "the client closed the request")
        if body.stream:
            return StreamingResponse(self._stream(job, first, reply, body.include_usage),
                                     media_type="text/event-stream")
        return await self._whole(job, first, reply, request)

    async def _whole(self, job: Job, event: Any, reply: Reply, request: Request) -> Any:
        text, from_draft = [], 0
        while True:
            if isinstance(event, BaseException):
                return _failure(event)
            if event is END:
                return _error(499, "the client closed the request")
            text.append(event.text)
            from_draft += event.from_draft
            if event.finish_reason is not None:
                return reply.whole("".join(text), event.finish_reason, event.stats, self.mode,
                                   from_draft)
            event = await _next(job, request)

    async def _stream(self, job: Job, event: Any, reply: Reply,
                      include_usage: bool) -> AsyncIterator[str]:
        from_draft = 0
        try:
            if reply.chat:
                yield _sse(reply.chunk("", role=True))
            while event is not END:
                if isinstance(event, BaseException):  # the status line is already sent
                    yield _sse(json.loads(_failure(event).body))
                    break
                from_draft += event.from_draft
                if event.finish_reason is not None:
                    stats = event.stats
                    yield _sse({**reply.chunk(event.text, event.finish_reason),
                                "decoding": decoding(stats, self.mode, from_draft)})
                    if include_usage:
                        yield _sse(reply.usage_chunk(stats))
                elif event.text:
                    yield _sse(reply.chunk(event.text))
                event = await _next(job, None)
            yield _sse("[DONE]")
        finally:  # also when Starlette cancels us because the client went away
            job.cancelled.set()


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading: a taken port is a one-line error, and port 0 gets a real one."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, not {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog; a client that connects early waits, not refused
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in (("--max-tokens", args.max_tokens, 1),
                             ("--max-queue", args.max_queue, 1),
                             ("--max-body-bytes", args.max_body_bytes, 1024)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, not {value}")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    sock = _listen(args.host, args.port)

    def load() -> Engine:
        engine = Engine.load(args.model, None if args.mode == "ar" else args.draft, args.dtype)
        if engine.drafter is not None:
            engine.block_size(args.block_size)
        if not args.no_warmup:
            engine.warmup(RunOptions(block_size=args.block_size, graph=args.graph))
        return engine

    worker = Worker(load, args.max_queue)
    engine = worker.start()
    if (warning := blas.warning(blas.detect())) is not None:
        print(warning, file=sys.stderr)
    app = Server(worker, engine, args.model, args).app()
    host, port = sock.getsockname()[:2]
    print(f"serving {args.model} ({args.mode}) on http://{host}:{port}", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
