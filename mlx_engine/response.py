"""What `Engine.generate` yields: one response per committed round, text already detokenized.

A fused round commits several tokens at once, so a response carries a list of token ids and
how many of them were drafts the verifier accepted. Text never shows a stop string nor the
start of one (OpenAI's semantics); the token ids are the loop's, up to the token that
completes the stop string, so they stay comparable with plain AR decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .speculative import DecodeStats
from .stopping import partial_stop


@dataclass(frozen=True)
class GenerationResponse:
    text: str  # the new text segment (may be empty: held back, or a hidden stop token)
    tokens: list[int]  # the token ids this round committed
    from_draft: int  # how many of `tokens` were accepted drafts (the rest: the verifier's)
    finish_reason: str | None = None  # "stop" or "length" on the last response
    stats: DecodeStats | None = None  # on the last response


class TextStream:
    """Detokenizes a run's tokens (stop tokens hidden, as mlx-lm does) into segments that end
    before any stop string, holding back a tail that may still become one."""

    def __init__(self, tokenizer, stops: Sequence[str], hidden: frozenset[int]):
        self.detokenizer = tokenizer.detokenizer  # a fresh one per call
        self.stops, self.hidden = [s for s in stops if s], hidden
        self.sent = 0

    def add(self, tokens: list[int], finished: bool) -> str:
        """The new segment once `tokens` are added; `finished`: the run ends with them."""
        for t in tokens:
            if t not in self.hidden:
                self.detokenizer.add_token(t)
        if finished:
            self.detokenizer.finalize()
        text = self.detokenizer.text
        end = min((i for s in self.stops if (i := text.find(s)) >= 0), default=len(text))
        if not finished:
            end -= partial_stop(text[:end], self.stops)
        segment = text[self.sent : max(end, self.sent)]
        self.sent += len(segment)
        return segment
