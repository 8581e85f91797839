"""The verifier: any mlx-lm causal LM, driven one block at a time.

One target forward over a block returns the logits AND the hidden states of the layers the
drafter taps, so the drafter's context needs no second pass. Attention layers get a plain
`KVCache`: mlx-lm's models keep building sliding-window masks from the cache offset, so
attention is exactly what the native `RotatingKVCache` layout computes, while rolling back
rejected draft rows is an O(1) `trim` (a wrapped ring cannot be trimmed: once it has wrapped,
its rows are no longer in position order). A recurrent layer (linear attention, SSM) keeps one
state, which no trim can undo: its `RecurrentCache` keeps the state from before the latest
forward and that forward's layer input, and rolls back by running the layer again over the
rows it keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache

from .errors import UserError

PREFILL_CHUNK = 512
MEMO_ROWS = 64  # a forward this short (a verify, not a prefill chunk) keeps its linear outputs


class _TapSink:
    """Collects the outputs of tapped layers during one forward, in layer order."""

    def __init__(self) -> None:
        self.outputs: dict[int, mx.array] = {}
        self.tapped: set[int] = set()


class _LinearMemo:
    """What the linear maps of recurrent layers computed in their latest short forward. While
    a `RecurrentCache` runs its layer again over the first rows of that forward, they hand
    those rows back instead of reading their weights again: a linear map treats each row on
    its own, so the rows are the ones it would compute."""

    def __init__(self) -> None:
        self.outputs: dict[int, mx.array] = {}
        self.replaying: int | None = None  # the rows kept, while a layer runs again


def _memoize(linear: nn.Module, memo: _LinearMemo) -> None:
    base, key = type(linear), id(linear)

    def __call__(self, x: mx.array) -> mx.array:
        rows = memo.replaying
        if rows is not None and (y := memo.outputs.get(key)) is not None and y.shape[-2] >= rows:
            return y[..., :rows, :]
        y = base.__call__(self, x)
        if rows is None and x.shape[-2] <= MEMO_ROWS:
            memo.outputs[key] = y
        elif rows is None:  # a long forward is never rolled back: keep nothing stale
            memo.outputs.pop(key, None)
        return y

    linear.__class__ = type(f"Memo{base.__name__}", (base,), {"__call__": __call__})


class RecurrentCache(ArraysCache):
    """A recurrent layer's state that can drop the last rows of the latest forward, or go back
    to where it was marked.

    The layer's hook (`_install_hooks`) hands over, before each forward, how to run the layer
    again on the first rows of its input; dropping rows restores the state from before that
    forward and runs the layer over the rows kept, its linear maps handing back what they
    computed (`_LinearMemo`). Only the state is read from that run, so MLX evaluates only the
    convolution and the recurrence over those rows. A mark keeps the state at one position
    (the engine marks a prompt's end) for a later prompt that shares only that much.
    """

    def __init__(self, size: int):
        super().__init__(size)
        self.offset = 0  # tokens the state has absorbed: what `KVCache.offset` tells
        self._before: list[mx.array | None] | None = None
        self._redo: Callable[[int], object] | None = None
        self._rows = 0
        self.marked: int | None = None
        self._marked_state: list[mx.array | None] = []

    def remember(self, redo: Callable[[int], object], rows: int) -> None:
        self._before, self._redo, self._rows = list(self.cache), redo, rows
        self.offset += rows

    def mark(self) -> None:
        self.marked, self._marked_state = self.offset, list(self.cache)

    def can_trim(self, n: int) -> bool:
        return (n <= 0 or (self._redo is not None and n <= self._rows)
                or self.offset - n == self.marked)

    def trim(self, n: int) -> int:
        if n <= 0:
            return 0
        if not self.can_trim(n):
            raise ValueError(f"a recurrent state can drop rows of its latest forward only "
                             f"({self._rows}), or go back to its mark, not {n} rows")
        if self._redo is None or n > self._rows:  # back to the mark
            self.cache, self.offset = list(self._marked_state), self.marked
            self._before, self._redo, self._rows = None, None, 0
            return n
        keep, redo = self._rows - n, self._redo
        self.cache, self.offset = list(self._before), self.offset - self._rows
        self._before, self._redo, self._rows = None, None, 0
        if keep:  # the layer itself, not its hook: nothing is remembered, one rollback a forward
            redo(keep)
            self.offset += keep
        return n


def can_cut(cache: list[KVCache | RecurrentCache], n: int) -> bool:
    """Whether every layer's cache can be cut back to its first `n` rows (a recurrent state:
    only by rows of its latest forward, or back to its mark)."""
    return all(c.can_trim(c.offset - n) for c in cache if isinstance(c, RecurrentCache))


def longest_cut(cache: list[KVCache | RecurrentCache], n: int) -> int:
    """The most rows, at most `n`, that every layer's cache can be cut back to: `n` itself,
    else where the recurrent states were marked, else 0."""
    marks = {c.marked for c in cache if isinstance(c, RecurrentCache) and c.marked is not None}
    for keep in (n, *sorted(marks, reverse=True)):
        if keep <= n and can_cut(cache, keep):
            return keep
    return 0


def _install_hooks(layer: nn.Module, index: int, sink: _TapSink, memo: _LinearMemo) -> None:
    """Swap the layer's class for a subclass that records its output when tapped and hands a
    `RecurrentCache` it is given the way to run it again (its linear maps memoized).

    A class swap keeps every attribute the model reads off its layers (`layer_type`,
    `use_sliding`, ...) and works for any mlx-lm family; Gemma 4 layers return a tuple.
    """
    base = type(layer)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> Any:
        def redo(rows: int) -> None:
            memo.replaying = rows
            try:
                base.__call__(self, x[:, :rows], *args, **kwargs)
            finally:
                memo.replaying = None

        for arg in (*args, *kwargs.values()):
            if isinstance(arg, RecurrentCache):
                arg.remember(redo, x.shape[1])
        out = base.__call__(self, x, *args, **kwargs)
        if index in sink.tapped:
            sink.outputs[index] = out[0] if isinstance(out, tuple) else out
        return out

    layer.__class__ = type(f"Hooked{base.__name__}", (base,), {"__call__": __call__})


def text_model(model: nn.Module) -> nn.Module:
    """The causal LM itself: mlx-lm loads a multimodal checkpoint (Gemma 3/4, Qwen 3.5, ...)
    as a wrapper that keeps it as `language_model`."""
    while "language_model" in model:
        model = model.language_model
    return model


def _dense(layer: nn.Module) -> mx.array:
    if layer.get("scales") is None:
        return layer.weight
    return mx.dequantize(layer.weight, layer.scales, layer.get("biases"),
                         group_size=layer.group_size, bits=layer.bits, mode=layer.mode)


@dataclass
class BlockOutput:
    logits: mx.array  # [1, L, V]
    taps: mx.array | None  # [1, L, n_taps * H]


class Verifier:
    """Adapter over an mlx-lm model: block forward -> (logits, taps), exact cache rollback."""

    def __init__(self, model: nn.Module, tap_layer_ids: list[int] | None = None):
        self.model = model  # as loaded: what mlx-lm's own generation runs
        self.text = text_model(model)
        self.inner = self.text.model
        self.layers = self.text.layers
        self.num_layers = len(self.layers)
        self.hidden_size = int(self.text.args.hidden_size)
        self.vocab_size = int(self.text.args.vocab_size)
        self.softcap = getattr(self.text, "final_logit_softcapping", None) or getattr(
            self.text.args, "final_logit_softcapping", None
        )
        self._sink, self._memo = _TapSink(), _LinearMemo()
        self._hooked: set[int] = set()
        caches = self.make_cache()
        # whether some layer keeps a recurrent state (rolled back by running it again)
        self.recurrent = any(isinstance(c, RecurrentCache) for c in caches)
        if self.recurrent:  # any layer may be handed a RecurrentCache
            self._hook(range(self.num_layers))
        if self.recurrent and len(caches) == self.num_layers:  # cache i is layer i's
            for layer, c in zip(self.layers, caches, strict=True):
                if isinstance(c, RecurrentCache):
                    for _, m in layer.named_modules():
                        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
                            _memoize(m, self._memo)
        self.tap_layer_ids: list[int] = []
        if tap_layer_ids:
            self.set_taps(tap_layer_ids)

    def _hook(self, layer_ids: Iterable[int]) -> None:
        for i in set(layer_ids) - self._hooked:
            _install_hooks(self.layers[i], i, self._sink, self._memo)
            self._hooked.add(i)

    def set_taps(self, tap_layer_ids: list[int]) -> None:
        bad = [i for i in tap_layer_ids if not 0 <= i < self.num_layers]
        if bad:
            raise UserError(
                f"drafter taps target layers {bad} but the verifier has {self.num_layers} layers"
            )
        self._hook(tap_layer_ids)
        self.tap_layer_ids = list(tap_layer_ids)
        self._sink.tapped = set(tap_layer_ids)

    # --- cache -------------------------------------------------------------------------
    def make_cache(self) -> list[KVCache | RecurrentCache]:
        """One cache per slot the model declares (Gemma 4 shares some): a plain KVCache for
        attention, a RecurrentCache for a recurrent layer's state."""
        native = self.text.make_cache() if hasattr(self.text, "make_cache") else None
        if native is None:
            return [KVCache() for _ in range(self.num_layers)]
        caches: list[KVCache | RecurrentCache] = []
        for c in native:
            if type(c) in (KVCache, RotatingKVCache):
                caches.append(KVCache())
            elif isinstance(c, ArraysCache):
                caches.append(RecurrentCache(len(c.cache)))
            else:
                raise UserError(
                    f"model type {self.model.model_type!r} uses {type(c).__name__}, which cannot "
                    "be rolled back exactly; only attention (KV) and recurrent-state caches are "
                    "supported"
                )
        return caches

    @staticmethod
    def mark(cache: list[KVCache | RecurrentCache]) -> None:
        """Keep the recurrent states' present position to come back to (`RecurrentCache`)."""
        for c in cache:
            if isinstance(c, RecurrentCache):
                c.mark()

    @staticmethod
    def trim(cache: list[KVCache], n: int) -> None:
        """Drop the last `n` rows (a recurrent state: of the latest forward only)."""
        if n > 0:
            for c in cache:
                c.trim(n)

    # --- heads ---------------------------------------------------------------------------
    def embed(self, ids: mx.array) -> mx.array:
        """Plain embedding lookup, without any model-specific scale (the drafter's input)."""
        return self.inner.embed_tokens(ids)

    def head_layer(self) -> nn.Module:
        """The layer behind the output projection: the embedding when tied."""
        if getattr(self.text, "tie_word_embeddings", False) or not hasattr(
            self.text, "lm_head"
        ):
            return self.inner.embed_tokens
        return self.text.lm_head

    def raw_head(self, h: mx.array) -> mx.array:
        """Output projection without the final soft-cap (what the drafter reuses)."""
        layer = self.head_layer()
        if isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)):
            return layer.as_linear(h)
        return layer(h)

    def raw_head_rows(self, ids: mx.array) -> Callable[[mx.array], mx.array]:
        """`raw_head` restricted to vocabulary rows `ids`, gathered once (quantized too)."""
        layer = self.head_layer()
        rows = {k: layer[k][ids] for k in ("weight", "scales", "biases", "bias")
                if layer.get(k) is not None}
        mx.eval(rows)
        if "scales" in rows:
            return lambda h: mx.quantized_matmul(
                h, rows["weight"], rows["scales"], rows.get("biases"), transpose=True,
                group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
            )
        if "bias" in rows:
            return lambda h: h @ rows["weight"].T + rows["bias"]
        return lambda h: h @ rows["weight"].T

    def dense_matrices(self) -> tuple[mx.array, mx.array]:
        """(embedding, head) as float matrices, dequantized if needed (for reference tools)."""
        return _dense(self.inner.embed_tokens), _dense(self.head_layer())

    def head(self, h: mx.array) -> mx.array:
        logits = self.raw_head(h)
        if self.softcap:
            logits = mx.tanh(logits / self.softcap) * self.softcap
        return logits

    # --- forwards ------------------------------------------------------------------------
    def _hidden(
        self, ids: mx.array, cache: list[KVCache], with_taps: bool = True
    ) -> tuple[mx.array, mx.array | None]:
        self._sink.outputs.clear()
        h = self.inner(ids, cache=cache)
        taps = None
        if with_taps and self.tap_layer_ids:
            taps = mx.concatenate([self._sink.outputs[i] for i in self.tap_layer_ids], axis=-1)
        self._sink.outputs.clear()
        return h, taps

    def forward(self, ids: mx.array, cache: list[KVCache], with_taps: bool = True) -> BlockOutput:
        """Logits and taps for every row of `ids` ([1, L]); extends the cache by L."""
        h, taps = self._hidden(ids, cache, with_taps)
        return BlockOutput(self.head(h), taps)

    def prefill(
        self,
        ids: mx.array,
        cache: list[KVCache],
        on_taps: Callable[[mx.array], None] | None = None,
        chunk: int = PREFILL_CHUNK,
    ) -> mx.array:
        """Run the prompt in chunks; hand each chunk's taps on; return the last row's logits."""
        n = ids.shape[1]
        if n == 0:
            raise UserError("the prompt is empty")
        h = None
        for start in range(0, n, chunk):
            h, taps = self._hidden(ids[:, start : start + chunk], cache)
            if on_taps is not None and taps is not None:
                on_taps(taps)
            mx.eval(h, *[c.state for c in cache])
            mx.clear_cache()  # as mlx-lm prefills: a long prompt's chunk buffers go back
        return self.head(h[:, -1:, :])

    def check_adapter(self) -> None:
        """Fail loudly if this family's head, tap wiring or recurrent rollback differs from
        `model()` itself with mlx-lm's own caches."""
        ids = mx.array([[1, 2, 3, 4, 5, 6]])
        expect = self.model(ids, cache=make_prompt_cache(self.model))
        self._check_close(expect, self.forward(ids, self.make_cache()).logits, "logits")
        if self.recurrent:
            cache = self.make_cache()
            self.forward(mx.array([[1, 2, 3, 9, 9]]), cache)
            self.trim(cache, 2)
            got = self.forward(ids[:, 3:], cache).logits
            self._check_close(expect[:, 3:], got, "logits after rolling back two rows")

    def _check_close(self, expect: mx.array, got: mx.array, what: str) -> None:
        err = mx.abs(expect.astype(mx.float32) - got.astype(mx.float32)).max().item()
        scale = mx.abs(expect.astype(mx.float32)).max().item() + 1e-6
        if err > 1e-3 * scale:
            raise UserError(
                f"verifier adapter does not reproduce model type {self.model.model_type!r} "
                f"{what} (max diff {err:.3g}); this family is not supported"
            )
