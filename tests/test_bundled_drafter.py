"""The bundled drafter for the offline verifier: intact, lossless, and equal to its torch twin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlx_engine import parity
from mlx_engine.errors import UserError
from mlx_engine.generate import main
from mlx_engine.sources import BUNDLED_DRAFTER, bundled_sha256, dir_sha256, resolve_drafter

pytestmark = pytest.mark.slow


def test_bundled_drafter_matches_its_recorded_sha256():
    assert dir_sha256(BUNDLED_DRAFTER) == bundled_sha256()
    assert resolve_drafter("default") == BUNDLED_DRAFTER


def test_a_damaged_bundled_drafter_is_refused(tmp_path, monkeypatch):
    from mlx_engine import sources

    copy = tmp_path / BUNDLED_DRAFTER.name
    shutil.copytree(BUNDLED_DRAFTER, copy)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    monkeypatch.setattr(sources, "BUNDLED_DRAFTER", copy)
    with pytest.raises(UserError, match="does not match its recorded sha256"):
        sources.resolve_drafter("default")


def test_offline_pair_is_lossless_on_held_out_code(tmp_path):
    out = tmp_path / "evidence.json"
    prompt = Path(__file__).parents[1] / "mlx_engine" / "workloads" / "example_prompt.py"
    # a fixed width: the adaptive policy's choice follows the machine's load, and a busy
    # machine may decode all of it in AR steps, which drafts no block to measure
    assert main(["--prompt-file", str(prompt), "--mode", "both", "--block-size", "16",
                 "--max-tokens", "64", "--ignore-eos", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["aggregate"]["lossless_all"] is True
    assert record["drafter"]["sha256"] == bundled_sha256()
    assert record["aggregate"]["mean_accept_len"] > 1.5  # a trained drafter, not a random one


def test_bundled_drafter_mlx_equals_torch_in_fp32(tmp_path):
    out = tmp_path / "parity.json"
    assert parity.main(["--n", "1", "--new-tokens", "24", "--stride", "6", "--json",
                        str(out)]) == 0
    assert json.loads(out.read_text())["aggregate"]["agreement"] == 1.0
