"""Where a verify's time goes on a GPU: host graph build vs evaluation, by block length.

Run on the lent machine after `lease.sh bench` has installed MLX and converted the verifier:

    PYTHONPATH=/tmp/mlx-site:$PWD:... python3 scripts/gpu/profile_forward.py [MODEL]

Prints, for the converted float32 Gemma 3 270M on a 300-token cache: a forward of L rows timed
as building the lazy graph and evaluating it; the same forward's body and head separately;
one decoder layer; a pipelined AR step; then bare kernels — a (L, 640) x (640, N) matmul and
`scaled_dot_product_attention` — for L = 1 (what an AR step runs) up to 16 (a verify).
Medians of repeated timings; each bare eval includes MLX's fixed per-eval cost.
"""

from __future__ import annotations

import argparse
import time

from timing import eval_ms, median_ms, mx

from mlx_engine.verifier import Verifier

TAPS = [1, 6, 10, 15]


def forward_row(verifier: Verifier, cache: list, length: int) -> str:
    ids = mx.array([list(range(5, 5 + length))])

    def build():
        out = verifier.forward(ids, cache)
        verifier.trim(cache, length)
        return out

    def full():
        out = build()
        mx.eval(out.logits, out.taps)

    built = median_ms(lambda: (build(), mx.synchronize()))
    evaluated = eval_ms(lambda: [*vars(build()).values()])
    return (f"L={length:2d} build+eval {median_ms(full):.2f} ms | build only {built:.2f}"
            f" | eval after build {evaluated:.2f}")


def parts_row(verifier: Verifier, cache: list, length: int) -> str:
    ids = mx.array([list(range(5, 5 + length))])
    layer = verifier.model.layers[0]
    x = mx.random.normal((1, length, verifier.hidden_size))

    def body():
        h, _ = verifier._hidden(ids, cache, with_taps=False)
        verifier.trim(cache, length)
        return h

    def one_layer():
        out = layer(x, "causal" if length > 1 else None, cache[0])
        cache[0].trim(length)
        return out

    h = body()
    mx.eval(h, x)
    return (f"L={length:2d} body {eval_ms(body):.2f} ms"
            f" | head {eval_ms(lambda: verifier.head(h)):.2f} | layer 0 {eval_ms(one_layer):.2f}")


def ar_step(verifier: Verifier, cache: list, n: int = 64) -> float:
    """ms per token of AR decoding pipelined like mlx-lm's generate_step."""

    def step(token: mx.array) -> mx.array:
        logits = verifier.forward(token.reshape(1, 1), cache, with_taps=False).logits
        return mx.argmax(logits[0, -1])

    nxt = step(mx.array([5]))
    mx.async_eval(nxt)
    start = time.perf_counter()
    for _ in range(n):
        cur = nxt
        nxt = step(cur)
        mx.async_eval(nxt)
        cur.item()
    nxt.item()
    per_token = (time.perf_counter() - start) / n * 1e3
    verifier.trim(cache, n + 1)
    return per_token


def matmul_ms(rows: int, cols: int, length: int, dtype: mx.Dtype) -> float:
    w = mx.random.normal((cols, rows)).astype(dtype)
    x = mx.random.normal((1, length, rows)).astype(dtype)
    mx.eval(w, x)
    return eval_ms(lambda: x @ w.T, 50)


def sdpa_row(length: int, dtype: mx.Dtype) -> str:
    q = mx.random.normal((1, 4, length, 256)).astype(dtype)
    k = mx.random.normal((1, 1, 316, 256)).astype(dtype)
    v = mx.random.normal((1, 1, 316, 256)).astype(dtype)
    mx.eval(q, k, v)

    def sdpa(mask):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.0625, mask=mask)

    return (f"sdpa {dtype} L={length}: none {eval_ms(lambda: sdpa(None), 50):.3f}"
            f" causal {eval_ms(lambda: sdpa('causal'), 50):.3f}"
            f" | elementwise op {eval_ms(lambda: q + 1, 50):.3f}")


def kernels() -> None:
    for dtype in (mx.float32, mx.bfloat16):
        for rows, cols in ((640, 2048), (2048, 640), (640, 262144)):
            cells = [f"L{n} {matmul_ms(rows, cols, n, dtype):.3f}" for n in (1, 2, 4, 8, 16)]
            print(f"matmul {dtype} {rows}->{cols}: " + " ".join(cells))
        for length in (1, 2, 16):
            print(sdpa_row(length, dtype))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="/tmp/g3-f32", help="mlx-lm Gemma 3 270M dir")
    from mlx_lm import load  # after timing's mlx_engine: the CPU build's BLAS set-up

    model, _ = load(p.parse_args().model)
    model.set_dtype(mx.float32)
    verifier = Verifier(model, TAPS)
    cache = verifier.make_cache()
    verifier.prefill(mx.array([list(range(100, 400))]), cache)
    for length in (1, 2, 4, 8, 16):
        print(forward_row(verifier, cache, length))
    for length in (1, 2, 16):
        print(parts_row(verifier, cache, length))
    ar_step(verifier, cache)
    print(f"AR pipelined step {ar_step(verifier, cache):.2f} ms")
    kernels()


if __name__ == "__main__":
    main()
