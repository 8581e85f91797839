"""Every shipped preset renders to an argv that its target CLI's own parser accepts, and the
README's first command runs as a preset here as it would on the Mac.

The presets are written against the engine's CLIs; a renamed or dropped flag must fail here,
on Linux, not on the Mac after a push.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

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
README = Path(__file__).parents[1] / "README.md"


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


@pytest.mark.slow
def test_the_readme_first_command_preset_runs_here_and_passes_its_gate(tmp_path, monkeypatch):
    """The preset a Mac runs for a new user's first command, run here through the bridge's own
    local path: its prompt file resolves in the checkout, the offline pair loads, and the gate
    reads the evidence it writes."""
    from bridge import cli

    monkeypatch.chdir(Path(__file__).parents[1])
    run = tmp_path / "run"
    assert cli.main(["local", "readme-first-command", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "passed" and summary["gate"]["passed"]
    evidence = json.loads((run / "artifacts" / "evidence.json").read_text())
    assert evidence["aggregate"]["lossless_all"] is True
    assert evidence["params"]["max_tokens"] == 128 and evidence["drafter"]["id"] == "default"


def test_the_readme_first_command_preset_runs_what_the_readme_says():
    """The preset repeats the README's quick-start command (it cannot read the README on the
    Mac): an edit to either without the other fails here. Only the evidence path differs."""
    line = re.search(r"^pip install -e \. && (python -m mlx_engine\.generate .*)$",
                     README.read_text(), re.MULTILINE)
    assert line, "README.md has no `pip install -e . && python -m mlx_engine.generate` line"
    readme = shlex.split(line.group(1))
    preset = PRESETS["readme-first-command"].command({}, Path("/out"), "req-1", {}).argv

    def without_json(argv: list[str]) -> list[str]:
        at = argv.index("--json")
        return argv[:at] + argv[at + 2:]

    assert without_json(preset) == without_json(readme)
    assert preset[preset.index("--json") + 1] == "/out/evidence.json"
