"""Fixtures shared by the test modules; MLX's BLAS set up as the CLIs have it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import mlx_engine  # noqa: F401  (before any test imports mlx: MLX binds its BLAS on load)


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Shared CI boxes: torch's thread pool spin-waits badly under contention."""
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def one_calibration_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny model's calibration pass takes a tenth of a second: one pass, not two seconds'
    worth, per engine (test_bench's pooling test sets the floor itself)."""
    monkeypatch.setattr("mlx_engine.engine.CALIBRATION_SECONDS", 0.0)
