"""Fixtures shared by the torch test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Shared CI boxes: torch's thread pool spin-waits badly under contention."""
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
