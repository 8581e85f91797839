"""The verifier: any mlx-lm causal LM, driven one block at a time.

One target forward over a block returns the logits AND the hidden states of the layers the
drafter taps, so the drafter's context needs no second pass. The prompt cache is plain
`KVCache` on every layer: mlx-lm's models keep building sliding-window masks from the cache
offset, so attention is exactly what the native `RotatingKVCache` layout computes, while
rolling back rejected draft rows is an O(1) `trim` on every layer (a wrapped ring cannot be
trimmed: once it has wrapped, its rows are no longer in position order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .errors import UserError

PREFILL_CHUNK = 512


class _TapSink:
    """Collects the outputs of tapped layers during one forward, in layer order."""

    def __init__(self) -> None:
        self.outputs: dict[int, mx.array] = {}


def _install_tap(layer: nn.Module, index: int, sink: _TapSink) -> None:
    """Swap the layer's class for a subclass that records its output hidden state.

    A class swap keeps every attribute the model reads off its layers (`layer_type`,
    `use_sliding`, ...) and works for any mlx-lm family; Gemma 4 layers return a tuple.
    """
    base = type(layer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = base.__call__(self, *args, **kwargs)
        sink.outputs[index] = out[0] if isinstance(out, tuple) else out
        return out

    layer.__class__ = type(f"Tapped{base.__name__}", (base,), {"__call__": __call__})


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
        self.model = model
        self.inner = model.model
        self.num_layers = len(model.layers)
        self.hidden_size = int(model.args.hidden_size)
        self.vocab_size = int(model.args.vocab_size)
        self.softcap = getattr(model, "final_logit_softcapping", None) or getattr(
            model.args, "final_logit_softcapping", None
        )
        self._sink = _TapSink()
        self.tap_layer_ids: list[int] = []
        if tap_layer_ids:
            self.set_taps(tap_layer_ids)

    def set_taps(self, tap_layer_ids: list[int]) -> None:
        bad = [i for i in tap_layer_ids if not 0 <= i < self.num_layers]
        if bad:
            raise UserError(
                f"drafter taps target layers {bad} but the verifier has {self.num_layers} layers"
            )
        for i in tap_layer_ids:
            if i not in self.tap_layer_ids:
                _install_tap(self.model.layers[i], i, self._sink)
        self.tap_layer_ids = list(tap_layer_ids)

    # --- cache -------------------------------------------------------------------------
    def make_cache(self) -> list[KVCache]:
        """One plain KVCache per cache slot the model declares (Gemma 4 shares some)."""
        native = self.model.make_cache() if hasattr(self.model, "make_cache") else None
        if native is None:
            return [KVCache() for _ in range(self.num_layers)]
        for c in native:
            if type(c) not in (KVCache, RotatingKVCache):
                raise UserError(
                    f"model type {self.model.model_type!r} uses {type(c).__name__}, which cannot "
                    "be rolled back exactly; only attention (KV) caches are supported"
                )
        return [KVCache() for _ in native]

    @staticmethod
    def trim(cache: list[KVCache], n: int) -> None:
        if n > 0:
            for c in cache:
                c.trim(n)

    # --- heads ---------------------------------------------------------------------------
    def embed(self, ids: mx.array) -> mx.array:
        """Plain embedding lookup, without any model-specific scale (the drafter's input)."""
        return self.inner.embed_tokens(ids)

    def head_layer(self) -> nn.Module:
        """The layer behind the output projection: the embedding when tied."""
        if getattr(self.model, "tie_word_embeddings", False) or not hasattr(
            self.model, "lm_head"
        ):
            return self.inner.embed_tokens
        return self.model.lm_head

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
        """Fail loudly if this family's head or tap wiring differs from `model()` itself."""
        ids = mx.array([[1, 2, 3, 4]])
        expect = self.model(ids, cache=[KVCache() for _ in self.make_cache()])
        got = self.forward(ids, self.make_cache()).logits
        err = mx.abs(expect.astype(mx.float32) - got.astype(mx.float32)).max().item()
        scale = mx.abs(expect.astype(mx.float32)).max().item() + 1e-6
        if err > 1e-3 * scale:
            raise UserError(
                f"verifier adapter does not reproduce model type {self.model.model_type!r} "
                f"logits (max diff {err:.3g}); this family is not supported"
            )
