"""Which BLAS MLX's CPU backend runs on, and how to interpose OpenBLAS.

MLX's Linux CPU wheel ships a reference BLAS (~2.5 GFLOP/s): there, verifying L tokens costs
about L decode steps, so no speculative method can win and CPU timings mean nothing. Debian's
`libopenblas0-pthread` exports the same unprefixed CBLAS symbols, so `LD_PRELOAD` of it
replaces the reference one at process start (hence a re-exec: it cannot be swapped later).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

REFERENCE_GFLOPS = 20.0  # the reference BLAS does ~2.5; any tuned BLAS does well over 20
SIZE = 512
KNOWN = ("openblas", "mkl", "blis", "accelerate")


def openblas_path() -> Path:
    """Where Debian's `libopenblas0-pthread` puts the library on this architecture."""
    return Path(f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libopenblas.so.0")


def preload_command() -> str:
    return f"LD_PRELOAD={openblas_path()}"


@dataclass
class BlasInfo:
    kind: str  # "openblas", "mkl", "blis", "accelerate", "reference", "unknown", or "gpu"
    gflops: float | None  # fp32 SIZE^3 matmul on the CPU; None when not on the CPU
    library: str | None

    @property
    def slow(self) -> bool:
        return self.kind == "reference"

    def describe(self) -> str:
        if self.gflops is None:
            return self.kind
        lib = f" ({self.library})" if self.library else ""
        return f"{self.kind}{lib}, {self.gflops:.1f} GFLOP/s fp32 {SIZE}^3"


def _preloaded_blas() -> str | None:
    """A tuned BLAS in LD_PRELOAD: the only way one replaces the wheel's (a BLAS that is merely
    mapped, like numpy's symbol-prefixed OpenBLAS, is not what MLX calls)."""
    for path in os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":"):
        if any(k in Path(path).name.lower() for k in KNOWN):
            return path
    return None


def _bundled_blas() -> str | None:
    """The BLAS the mlx-cpu wheel ships (mlx_cpu.libs/libblas-*.so), if it is mapped."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return next((line.split()[-1] for line in maps.splitlines()
                 if "mlx_cpu.libs/libblas" in line), None)


def matmul_gflops(size: int = SIZE, seconds: float = 0.2) -> float:
    """Measured fp32 matmul throughput on the CPU (after one untimed warm-up)."""
    with mx.stream(mx.cpu):
        a = mx.random.normal((size, size))
        b = mx.random.normal((size, size))
        mx.eval(a @ b)
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
            mx.eval(a @ b)
            runs += 1
    return 2 * size**3 * runs / elapsed / 1e9


def detect() -> BlasInfo:
    if mx.default_device() != mx.cpu:
        return BlasInfo("gpu", None, None)
    gflops = matmul_gflops()
    if sys.platform == "darwin":
        return BlasInfo("accelerate", gflops, None)
    library = _preloaded_blas()
    if library is not None:
        name = Path(library).name.lower()
        return BlasInfo(next(k for k in KNOWN if k in name), gflops, library)
    if gflops < REFERENCE_GFLOPS:
        return BlasInfo("reference", gflops, _bundled_blas())
    return BlasInfo("unknown", gflops, None)


def warning(info: BlasInfo) -> str | None:
    """One line telling how to get a real BLAS, or None when the CPU BLAS is fine."""
    if not info.slow:
        return None
    fix = (f"rerun with --openblas or {preload_command()}" if openblas_path().is_file()
           else "apt-get install libopenblas0-pthread, then rerun with --openblas")
    return (f"warning: MLX runs on its reference CPU BLAS ({info.gflops:.1f} GFLOP/s): "
            f"speculative decoding cannot win there; {fix}")


def reexec_with_openblas(module: str, argv: list[str]) -> None:
    """Restart `python -m module argv` with OpenBLAS preloaded (no-op if it already is)."""
    from .errors import UserError

    lib = openblas_path()
    if str(lib) in os.environ.get("LD_PRELOAD", "").split(":"):
        return
    if not lib.is_file():
        raise UserError(f"--openblas: {lib} not found; apt-get install libopenblas0-pthread")
    preload = ":".join(p for p in (str(lib), os.environ.get("LD_PRELOAD")) if p)
    env = dict(os.environ, LD_PRELOAD=preload)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
