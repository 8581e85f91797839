"""What one row of sampling work costs on this device, over a vocabulary of Gemma's size: the
noise a sampled position draws, each sampling kind's filter, top-p's fast route (which the loops
take instead of the sort), and MLX's `exp` against numpy's.

    python scripts/sampling_costs.py [--vocab 262144] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from mlx_engine.sampling import (  # mx after mlx_engine
    GumbelMax,
    SamplingParams,
    filtered,
    mx,
    top_p_choice,
)


def ms_per_call(fn: Callable[[], object], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()

    logits = mx.random.normal((1, args.vocab)) * 3
    mx.eval(logits)
    print(f"{mx.default_device()}, one row of {args.vocab} logits, ms per call:")
    positions = iter(range(10**9))  # a new position each call: noise is kept per position
    sampler = GumbelMax(SamplingParams(1.0), 0, args.vocab)
    rows = {"noise (a new position)": lambda: mx.eval(sampler.noise(next(positions), 1))}
    for params in (SamplingParams(0.7), SamplingParams(0.7, top_k=50),
                   SamplingParams(0.7, top_p=0.95)):
        rows[f"filter, {params.kind}"] = lambda params=params: mx.eval(filtered(logits, params))
    noise = mx.random.gumbel(shape=(1, args.vocab))
    rows["top-p 0.95, fast route"] = lambda: mx.eval(top_p_choice(logits / 0.7, noise, 0.95))
    rows["mx.exp"] = lambda: mx.eval(mx.exp(logits))
    host = np.array(logits)
    rows["numpy exp"] = lambda: np.exp(host)
    for name, fn in rows.items():
        print(f"  {name:24s} {ms_per_call(fn, args.repeats):7.2f}")


if __name__ == "__main__":
    main()
