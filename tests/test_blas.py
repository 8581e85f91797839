"""MLX's CPU BLAS: a fast one by default on Linux (no step by hand), named when it is not."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from mlx_engine import blas

PROBE = ("import json, mlx_engine.blas as b; i = b.detect(); "
         "print(json.dumps({'kind': i.kind, 'gflops': i.gflops, 'source': i.source, "
         "'warning': b.warning(i)}))")


def _probe(code: str = PROBE, **env: str) -> tuple[dict, str]:
    """Run `code` in a fresh interpreter as a plain install would (no LD_PRELOAD)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.OPT_OUT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                    reason="the default-BLAS promise is for Linux x86-64 (macOS has Accelerate)")
def test_default_install_gives_mlx_a_fast_blas():
    info, _ = _probe()
    assert info["kind"] == "openblas", info
    assert "scipy-openblas32" in info["source"] and info["warning"] is None
    # measured, not just named: OpenBLAS runs a 512^3 matmul many times faster. One thread
    # each, so that other load slows both probes alike (OpenBLAS threads spinning for a core
    # another process holds slow it tenfold, the single-threaded reference hardly).
    one, _ = _probe(OPENBLAS_NUM_THREADS="1")
    reference, _ = _probe(**{blas.OPT_OUT: "reference"})
    assert reference["kind"] == "reference"
    assert one["gflops"] > 4 * reference["gflops"], (one, reference)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only: macOS has Accelerate")
def test_reference_blas_is_named_with_its_cause():
    info, _ = _probe(**{blas.OPT_OUT: "reference"})
    assert info["kind"] == "reference" and f"{blas.OPT_OUT}=reference" in info["warning"]
    late = "import mlx.core, warnings; warnings.simplefilter('always'); import mlx_engine; " + PROBE
    info, err = _probe(late)
    assert info["kind"] == "reference" and "import mlx_engine before mlx" in info["warning"]
    assert "import mlx_engine before mlx" in err  # the Python API user hears it at import


def test_blas_detection_is_sensible(monkeypatch):
    info = blas.detect()
    assert info.kind in {"openblas", "mkl", "blis", "accelerate", "reference", "unknown", "gpu"}
    if info.kind != "gpu":
        assert info.gflops > 0 and "GFLOP/s" in info.describe()
    assert (blas.warning(info) is not None) == (info.kind == "reference")
    reference = blas.BlasInfo("reference", 2.5, None)
    assert "LD_PRELOAD=" in blas.warning(reference) or "apt-get" in blas.warning(reference)
    monkeypatch.setenv("LD_PRELOAD", "/opt/x/libopenblas.so.0")
    assert blas._preloaded_blas() == "/opt/x/libopenblas.so.0"


def test_openblas_flag_reexecs_or_explains():
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    proc = subprocess.run([sys.executable, "-m", "mlx_engine.bench", "--openblas",
                           "--workload", "bogus"], capture_output=True, text=True, env=env,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
