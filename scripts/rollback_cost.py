"""What rolling back a recurrent (linear-attention) verifier costs, against an AR step.

    python scripts/rollback_cost.py [--shape 0.8b|4b|tiny] [--dtype float32] [--width 16]

Builds a Qwen 3.5-style hybrid of the given shape with random weights (the costs do not depend
on them), prefills a 256-token prompt, then times, as medians of evaluated graphs: an AR step
(one row), a verify of `--width` rows that keeps them all, and verifies that keep k rows and
drop the rest, which restores every recurrent layer's state and runs the layer again over the k
rows kept (`RecurrentCache`). Prints each in milliseconds and in AR steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mlx_engine.verifier import Verifier, mx  # mx after mlx_engine: its BLAS

# About the text dimensions of Qwen 3.5 0.8B and 4B (hidden size, layers, MLP, linear-attention
# heads): with random weights, a model of that shape costs what the real one does.
SHAPES = {
    "0.8b": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=3584,
                 num_attention_heads=8, num_key_value_heads=2, linear_num_value_heads=16,
                 tie_word_embeddings=True),
    "4b": dict(hidden_size=2560, num_hidden_layers=32, intermediate_size=9216,
               num_attention_heads=16, num_key_value_heads=4, linear_num_value_heads=32,
               tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128,  # for the tests
                 num_attention_heads=4, num_key_value_heads=2, linear_num_value_heads=4,
                 linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                 head_dim=16, vocab_size=512, tie_word_embeddings=False),
}
COMMON = dict(model_type="qwen3_5", vocab_size=248320, head_dim=256, linear_num_key_heads=16,
              linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
              full_attention_interval=4, rms_norm_eps=1e-6,
              rope_parameters={"type": "default", "rope_theta": 1e7,
                               "partial_rotary_factor": 0.25})
PROMPT = 256
REPEATS = 7


def build(shape: str, dtype: str) -> Verifier:
    from mlx_lm.models import qwen3_5

    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict({**COMMON, **SHAPES[shape]}))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return Verifier(model)


def median_ms(verifier: Verifier, cache: list, rows: int, drop: int) -> float:
    """One forward of `rows` rows, then drop `drop` of them, evaluated; the cache is put back
    to where it was after each timing."""
    ids = mx.array([[7 + i for i in range(rows)]])
    start = cache[0].offset
    verifier.mark(cache)  # what a recurrent state goes back to after each timing
    times = []
    for _ in range(REPEATS + 1):  # the first builds what later ones reuse: not counted
        begin = time.perf_counter()
        out = verifier.forward(ids, cache)
        mx.eval(out.logits, out.taps)
        verifier.trim(cache, drop)
        mx.eval([c.state for c in cache])
        times.append(time.perf_counter() - begin)
        for c in cache:
            c.trim(c.offset - start)
    return 1e3 * statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.8b")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--width", type=int, default=16)
    args = p.parse_args(argv)
    verifier = build(args.shape, args.dtype)
    verifier.set_taps([1, verifier.num_layers // 2, verifier.num_layers - 2])
    cache = verifier.make_cache()
    verifier.prefill(mx.array([list(range(10, 10 + PROMPT))]), cache)
    print(f"{args.shape} shape, {args.dtype}, {mx.default_device()}, {PROMPT}-token prompt")
    ar = median_ms(verifier, cache, 1, 0)
    print(f"AR step (1 row): {ar:.1f} ms")
    w = args.width
    for keep in (w, w - 1, w // 2, 1):
        ms = median_ms(verifier, cache, w, w - keep)
        print(f"verify {w} rows, keep {keep:2d}: {ms:.1f} ms = {ms / ar:.2f} AR steps")


if __name__ == "__main__":
    main()
