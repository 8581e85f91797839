"""Medians of repeated timings, for the profiling scripts beside this one."""

from __future__ import annotations

import time
from collections.abc import Callable

import mlx_engine  # noqa: F401  (before mlx: the CPU build's BLAS set-up)
from mlx_engine.speculative import mx


def median_ms(fn: Callable[[], object], n: int = 30, warmup: int = 5) -> float:
    """Median wall time of `fn()` after `warmup` untimed calls."""
    times = []
    for i in range(n + warmup):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e3


def eval_ms(make: Callable[[], object], n: int = 30) -> float:
    """Median time of evaluating what `make` builds (the build itself not timed)."""

    def run() -> float:
        out = make()
        start = time.perf_counter()
        mx.eval(out)
        return time.perf_counter() - start

    for _ in range(5):
        run()
    return sorted(run() for _ in range(n))[n // 2] * 1e3
