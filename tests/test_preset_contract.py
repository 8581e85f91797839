"""Every shipped preset renders to an argv that its target CLI's own parser accepts.

The presets are written against the engine's CLIs; a renamed or dropped flag must fail here,
on Linux, not on the Mac after a push.
"""

from __future__ import annotations

import argparse

import pytest

from bridge.presets import default_presets_dir, load_presets
from mlx_engine import bench, generate, parity, server_bench

PARSERS = {
    "mlx_engine.generate": generate.build_parser,
    "mlx_engine.bench": bench.build_parser,
    "mlx_engine.parity": parity.build_parser,
    "mlx_engine.server_bench": server_bench.build_parser,
}
PRESETS = load_presets(default_presets_dir())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_argv_parses_with_its_cli(name, tmp_path, monkeypatch):
    preset = PRESETS[name]
    params = preset.resolve_params({})
    command = preset.command(params, tmp_path, "req-1", {})
    argv = command.argv
    assert argv[:2] == ["python", "-m"]
    module = argv[2]
    if module not in PARSERS:
        assert module.startswith("bridge."), module
        return
    parser = PARSERS[module]()

    def fail(message: str) -> None:
        raise AssertionError(f"{name}: {module} rejects {argv[3:]}: {message}")

    monkeypatch.setattr(argparse.ArgumentParser, "error", lambda self, message: fail(message))
    parser.parse_args(argv[3:])
