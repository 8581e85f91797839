"""The host self-test reports what a runner offers, and fails only on what it must have."""

from __future__ import annotations

import json
import sys

from bridge import selftest
from mlx_engine import host


def test_report_on_this_host(tmp_path, capsys):
    models = tmp_path / "models"
    (models / "verifier").mkdir(parents=True)
    (models / "drafter").symlink_to(tmp_path / "missing")
    out = tmp_path / "report.json"
    assert selftest.main(["--json", str(out), "--models", str(models)]) == 0
    doc = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == doc
    assert doc["schema"] == "kakeya-bridge-selftest/v1" and doc["ok"] is True
    assert doc["python"]["version"] == doc["host"]["python"]
    assert doc["mlx"]["importable"] is True and doc["mlx"]["version"] == doc["host"]["mlx"]
    assert doc["memory_bytes"] > 0 and doc["host"]["chip"]
    assert doc["models"] == {"root": str(models), "exists": True, "entries": [
        {"name": "drafter", "symlink": True, "resolves": False},
        {"name": "verifier", "symlink": False, "resolves": True}]}
    expected_metal = doc["mlx"]["metal"] if sys.platform == "darwin" else None
    assert doc["checks"]["metal_ok"] == expected_metal


def test_missing_metal_fails_on_a_mac(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(selftest, "mlx_status", lambda: {"importable": True, "metal": False})
    monkeypatch.setattr(selftest, "sysctl", lambda name: None)
    monkeypatch.setattr(host, "sysctl", lambda name: None)
    doc = selftest.report(tmp_path)
    assert doc["checks"]["metal_ok"] is False and doc["ok"] is False
