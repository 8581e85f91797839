"""Which BLAS MLX's CPU backend runs on, and giving it a fast one on Linux by default.

MLX's Linux CPU wheel ships a reference BLAS, tens of times slower than a tuned one: there,
verifying L tokens costs about L decode steps, so no speculative method can win. MLX binds its
`cblas_*gemm` calls when its library loads, so whatever library defines those symbols first in
the process's global scope wins. `preload()` runs from `import mlx_engine`, before MLX loads,
and puts OpenBLAS there:

1. scipy-openblas32 (a dependency: an optimised OpenBLAS needing no Fortran runtime) behind
   the package's CBLAS shim (`blas_shim.c`, built at install), which maps the unprefixed names
   MLX calls onto its `scipy_`-prefixed ones;
2. else Debian's `libopenblas0-pthread`, if installed (it exports the plain names).

A BLAS already in `LD_PRELOAD` is left alone (it comes first anyway); `KAKEYA_BLAS=reference`
keeps the reference BLAS, to measure it. On macOS MLX uses Accelerate and nothing is loaded.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

SIZE = 512
KNOWN = ("openblas", "mkl", "blis", "accelerate")
OPT_OUT = "KAKEYA_BLAS"  # =reference: keep MLX's own BLAS


@dataclass(frozen=True)
class Preload:
    """What `preload()` did: the library it loaded, or why it loaded none."""

    library: str | None
    source: str  # "scipy-openblas32 X via the CBLAS shim", "Debian libopenblas0-pthread", ...
    reason: str | None = None  # why nothing was loaded (a line the warning repeats)


_preload = Preload(None, "not attempted", "mlx_engine.blas.preload() did not run")


def openblas_path() -> Path:
    """Where Debian's `libopenblas0-pthread` puts the library on this architecture."""
    return Path(f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libopenblas.so.0")


def preload_command() -> str:
    return f"LD_PRELOAD={openblas_path()}"


def shim_path() -> Path | None:
    """The built CBLAS shim beside this module (absent where no C compiler was at install)."""
    here = Path(__file__).parent
    return next((p for s in EXTENSION_SUFFIXES if (p := here / f"_cblas_shim{s}").is_file()),
                None)


def _load_global(path: str | Path) -> None:
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def _scipy_openblas() -> Preload | None:
    shim = shim_path()
    if shim is None:
        return None
    try:
        import scipy_openblas32
    except ImportError:
        return None
    lib_dir = Path(scipy_openblas32.get_lib_dir())
    library = next(iter(sorted(lib_dir.glob("libscipy_openblas*.so*"))), None)
    if library is None:
        return None
    _load_global(library)
    _load_global(shim)
    return Preload(str(library), f"scipy-openblas32 {scipy_openblas32.__version__} via the "
                                 "CBLAS shim")


def _debian_openblas() -> Preload | None:
    if not openblas_path().is_file():
        return None
    _load_global(openblas_path())
    return Preload(str(openblas_path()), "Debian libopenblas0-pthread")


def _no_preload_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.environ.get(OPT_OUT) == "reference":
        return f"{OPT_OUT}=reference"
    if _preloaded_blas() is not None:
        return "LD_PRELOAD names one"
    if "mlx.core" in sys.modules:
        return "mlx was imported before mlx_engine"
    return None


def preload() -> Preload:
    """Put OpenBLAS first in the process's symbol lookup, before MLX loads (idempotent)."""
    global _preload
    if _preload.library is not None:
        return _preload
    reason = _no_preload_reason()
    if reason is not None:
        _preload = Preload(None, "none", reason)
        if "mlx was imported" in reason:
            warnings.warn(f"MLX keeps its slow reference CPU BLAS: {reason}; import "
                          "mlx_engine before mlx", stacklevel=2)
        return _preload
    try:
        found = _scipy_openblas() or _debian_openblas()
    except OSError as exc:  # a library that exists but does not load
        found = Preload(None, "none", f"loading OpenBLAS failed: {exc}")
    _preload = found or Preload(
        None, "none", "no CBLAS shim was built at install (no C compiler?) and Debian's "
                      "libopenblas0-pthread is not installed")
    return _preload


@dataclass
class BlasInfo:
    kind: str  # "openblas", "mkl", "blis", "accelerate", "reference", "unknown", or "gpu"
    gflops: float | None  # fp32 SIZE^3 matmul on the CPU; None when not on the CPU
    library: str | None
    source: str | None = None

    @property
    def slow(self) -> bool:
        return self.kind == "reference"

    def describe(self) -> str:
        if self.gflops is None:
            return self.kind
        lib = f" ({self.source or self.library})" if self.source or self.library else ""
        return f"{self.kind}{lib}, {self.gflops:.1f} GFLOP/s fp32 {SIZE}^3"


def _preloaded_blas() -> str | None:
    """A tuned BLAS in LD_PRELOAD (a BLAS that is merely mapped, like numpy's symbol-prefixed
    OpenBLAS, is not what MLX calls)."""
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
    import mlx.core as mx

    with mx.stream(mx.cpu):
        a = mx.random.normal((size, size))
        b = mx.random.normal((size, size))
        mx.eval(a @ b)
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
            mx.eval(a @ b)
            runs += 1
    return 2 * size**3 * runs / elapsed / 1e9


@functools.cache
def detect() -> BlasInfo:
    """The BLAS MLX's CPU matmuls run on (known from what was loaded before MLX, not guessed
    from a speed a loaded machine can halve), with its measured speed (once per process)."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return BlasInfo("gpu", None, None)
    gflops = matmul_gflops()
    if sys.platform == "darwin":
        return BlasInfo("accelerate", gflops, None)
    if (library := _preloaded_blas()) is not None:
        name = Path(library).name.lower()
        return BlasInfo(next(k for k in KNOWN if k in name), gflops, library, "LD_PRELOAD")
    if _preload.library is not None:
        return BlasInfo("openblas", gflops, _preload.library, _preload.source)
    if (bundled := _bundled_blas()) is not None:  # the mlx-cpu wheel's own
        return BlasInfo("reference", gflops, bundled)
    return BlasInfo("unknown", gflops, None)


def warning(info: BlasInfo) -> str | None:
    """One line telling why MLX is on its reference BLAS and how to fix it, or None."""
    if not info.slow:
        return None
    reason = _preload.reason or "the preloaded library was not used"
    if OPT_OUT in reason:
        fix = f"unset {OPT_OUT}"
    elif "mlx was imported" in reason:
        fix = "import mlx_engine before mlx"
    elif openblas_path().is_file():
        fix = f"rerun with {preload_command()}"
    else:
        fix = ("reinstall with a C compiler present (pip install builds the CBLAS shim) or "
               "apt-get install libopenblas0-pthread")
    return (f"warning: MLX runs on its reference CPU BLAS ({info.gflops:.1f} GFLOP/s; "
            f"{reason}): speculative decoding cannot win there; {fix}")


def reexec_with_openblas(module: str, argv: list[str]) -> None:
    """Restart `python -m module argv` with Debian's OpenBLAS preloaded (no-op if it is)."""
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
