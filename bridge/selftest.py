"""Host self-test: what a runner can offer (chip, memory, OS, Python, mlx, Metal, model dirs).

`python -m bridge.selftest --json P [--models DIR]`; the bridge-selftest preset runs it first on a
new runner. mlx is imported only here and only optionally, so the report is written on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from bridge.presets import models_root
from mlx_engine.errors import cli_entry
from mlx_engine.host import chip, sysctl

SCHEMA = "kakeya-bridge-selftest/v1"


def host_info() -> dict[str, Any]:
    """Cheap facts for every summary: no mlx import, no GPU touched."""
    return {
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "chip": chip(),
        "python": platform.python_version(),
        "mlx": _version("mlx"),
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        value = sysctl("hw.memsize")
        return int(value) if value and value.isdigit() else None


def mlx_status() -> dict[str, Any]:
    try:
        import mlx.core as mx
    except Exception as exc:  # a broken install is a finding to report, not a crash
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}", "metal": False}
    return {"importable": True, "version": _version("mlx"), "metal": bool(mx.metal.is_available()),
            "default_device": str(mx.default_device())}


def models_status(root: Path) -> dict[str, Any]:
    entries = []
    if root.is_dir():
        for child in sorted(root.iterdir())[:50]:
            entries.append({"name": child.name, "symlink": child.is_symlink(),
                            "resolves": child.exists()})
    return {"root": str(root), "exists": root.is_dir(), "entries": entries}


def report(models_root: Path) -> dict[str, Any]:
    mlx = mlx_status()
    checks = {
        "python_ok": sys.version_info >= (3, 10),
        "mlx_ok": mlx["importable"],
        # Metal is the point of a Mac runner; elsewhere it is not applicable rather than failed.
        "metal_ok": mlx["metal"] if sys.platform == "darwin" else None,
    }
    return {
        "schema": SCHEMA,
        "host": host_info(),
        "memory_bytes": _memory_bytes(),
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "mlx": mlx,
        "models": models_status(models_root),
        "checks": checks,
        "ok": all(v for v in checks.values() if v is not None),
    }


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.selftest", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--models", type=Path, default=models_root(os.environ),
                        help="model directory to list (default: $KAKEYA_MODELS or ~/kakeya-models)")
    args = parser.parse_args(argv)
    doc = report(args.models)
    text = json.dumps(doc, indent=2)
    if args.json:
        args.json.write_text(text + "\n", "utf-8")
    print(text)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
