"""Stop strings: where a stream's text first contains one, the stream ends.

Code-completion clients stop a base model at the end of the function it was asked for
(HumanEval's "\\ndef", "\\nclass", ...), inline completion at the end of the line. The check
runs on the decoded text of the tokens generated so far, so a stop string may span tokens;
the token that completes it is the last one kept (the text may run past it, within that token).
Only a window of the latest tokens is decoded, so the check costs the same at any length.
"""

from __future__ import annotations

from collections.abc import Sequence

WINDOW = 16  # tokens before the new ones that a stop string may start in


class StopStrings:
    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]

    def _hit(self, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(tokens)
        return any(s in text for s in self.stops)

    def end(self, tokens: list[int], new: int) -> int | None:
        """How many of `tokens` to keep, if the last `new` of them complete a stop string
        (the ones before did not); None when they do not."""
        start = max(0, len(tokens) - new - WINDOW)
        if not self.stops or not self._hit(tokens[start:]):
            return None
        return next(n for n in range(len(tokens) - new + 1, len(tokens) + 1)
                    if self._hit(tokens[start:n]))


def partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that may be the start of a stop string: a stream
    holds it back until the next tokens tell (a client must never see part of a stop)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)
