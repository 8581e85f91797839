"""The OpenAI wire format the server speaks: request models and response bodies.

Requests are validated by pydantic models (a bad field is a 400 naming it). Fields OpenAI
clients send that change nothing here (user, frequency_penalty at 0, ...) are ignored; ones
that would change the answer and cannot be honoured (n > 1, logprobs) are refused. Beyond
OpenAI: `top_k` and `ignore_eos` (as vLLM and mlx-lm's server take them), `block_size`
(the drafter's verify width), and a `decoding` object of speed stats next to `usage`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from .engine import Engine, RunOptions
from .errors import UserError
from .sampling import SamplingParams
from .speculative import DecodeStats


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # greedy unless asked: the lossless default
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    logprobs: Literal[False, None] = None
    ignore_eos: bool = False
    block_size: int | None = None

    def options(self, defaults: RunOptions, seed: int) -> RunOptions:
        """The server's defaults with what this request sets; `seed` unless it names one."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return replace(
            defaults,
            max_tokens=self.max_tokens or defaults.max_tokens,
            sampling=SamplingParams(self.temperature, self.top_p, self.top_k),
            seed=self.seed if self.seed is not None else seed,
            ignore_eos=self.ignore_eos,
            block_size=self.block_size if self.block_size is not None else defaults.block_size,
            stop=tuple(stop),
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _newer_name(self) -> ChatRequest:
        """OpenAI's newer name for max_tokens."""
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def encode(self, engine: Engine) -> list[int]:
        return engine.encode([{"role": m.role, "content": m.text()} for m in self.messages])


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    echo: Literal[False] = False

    def encode(self, engine: Engine) -> list[int]:
        """Raw text (no chat template) or token ids; one prompt per request."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise UserError("one prompt per request (a list of prompts is not supported)")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return engine.encode(prompt, chat_template=False)
        vocab = engine.verifier.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise UserError(f"prompt token ids must be in [0, {vocab})")
        return list(prompt)


def usage(stats: DecodeStats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def decoding(stats: DecodeStats, mode: str, from_draft: int) -> dict[str, Any]:
    """How the answer was decoded and how fast (decode tok/s excludes the first token)."""
    return {"mode": mode, "prefill_tok_s": stats.prefill_tok_s,
            "decode_tok_s": stats.decode_tok_s, "prefill_s": stats.prefill_s,
            "decode_s": stats.decode_s, "tau": stats.mean_accept_len, "rounds": stats.rounds,
            "drafted_rounds": stats.blocks, "ar_steps": stats.ar_steps,
            "syncs": stats.host_syncs, "from_draft": from_draft,
            "cached_tokens": stats.cached_tokens, "peak_memory_gb": stats.peak_memory_gb}


def error_body(message: str, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass
class Reply:
    """The bodies of one answer: chat or text completion, streamed or whole."""

    chat: bool
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _body(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice}]}

    def chunk(self, text: str, finish: str | None = None, role: bool = False
              ) -> dict[str, Any]:
        if not self.chat:
            return self._body("text_completion", {"text": text, "logprobs": None,
                                                  "finish_reason": finish})
        delta = {"role": "assistant", "content": text} if role else {"content": text}
        return self._body("chat.completion.chunk", {"delta": delta if text or role else {},
                                                    "logprobs": None, "finish_reason": finish})

    def usage_chunk(self, stats: DecodeStats) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [], "usage": usage(stats)}

    def whole(self, text: str, finish: str, stats: DecodeStats, mode: str,
              from_draft: int) -> dict[str, Any]:
        if self.chat:
            choice = {"message": {"role": "assistant", "content": text}}
            body = self._body("chat.completion", {**choice, "logprobs": None,
                                                  "finish_reason": finish})
        else:
            body = self._body("text_completion", {"text": text, "logprobs": None,
                                                  "finish_reason": finish})
        return {**body, "usage": usage(stats), "decoding": decoding(stats, mode, from_draft)}
