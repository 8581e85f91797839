"""The workflow and setup_mac.sh pass their linters, and say what the security model needs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from bridge.gitbus import REQUEST_PREFIXES
from bridge.presets import default_presets_dir, load_presets

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "mac-bridge.yaml"
SETUP = ROOT / "setup_mac.sh"
ACTIONLINT_CONFIG = Path(__file__).with_name("actionlint.yaml")


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: pip install the test extras (see docs/bridge.md)"
    return path


def _run(*cmd: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def test_actionlint_passes():
    done = _run(_tool("actionlint"), "-config-file", str(ACTIONLINT_CONFIG), str(WORKFLOW))
    assert done.returncode == 0, done.stdout + done.stderr


def test_zizmor_passes():
    done = _run(_tool("zizmor"), "--offline", "--no-progress", str(WORKFLOW))
    assert done.returncode == 0, done.stdout + done.stderr


def test_workflow_encodes_the_security_model():
    doc = yaml.safe_load(WORKFLOW.read_text())
    on = doc[True]  # YAML 1.1 reads the key `on` as true
    assert on["push"]["branches"] == ["mac-bridge/**", "AgentMemory/mac-bridge-*"]
    assert REQUEST_PREFIXES == ("mac-bridge/", "AgentMemory/mac-bridge-")  # what the runner lists
    assert doc["permissions"] == {}
    assert doc["concurrency"]["cancel-in-progress"] is False
    (job,) = doc["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "macOS", "ARM64", "kakeya-mac-m4"]
    assert job["permissions"] == {"contents": "write"}
    assert 0 < job["timeout-minutes"] <= 360
    steps = job["steps"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False
    assert checkout["with"]["ref"] == "${{ github.event.repository.default_branch }}"
    assert any(s.get("uses", "").startswith("actions/upload-artifact@") for s in steps)
    for step in steps:
        assert "${{" not in step.get("run", ""), f"expression inside run: in {step['name']}"
        if "uses" in step:
            assert re.fullmatch(r"[\w-]+/[\w-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
    drain = next(s["run"] for s in steps if "bridge.executor" in s.get("run", ""))
    assert "--budget-s 16200" in drain and "git lfs" in WORKFLOW.read_text()
    longest = max(p.timeout_s for p in load_presets(default_presets_dir()).values())
    assert job["timeout-minutes"] * 60 > 16200 + longest  # budget + longest preset fit the job


def test_setup_mac_is_shellcheck_clean():
    done = _run(_tool("shellcheck"), str(SETUP))
    assert done.returncode == 0, done.stdout + done.stderr


def test_setup_mac_dry_run_prints_every_action_and_changes_nothing(hermetic, tmp_path):
    model = tmp_path / "gemma"
    model.mkdir()
    env = {**os.environ, "KAKEYA_RUNNER_TOKEN": "AAAA-registration-secret"}
    venv = tmp_path / "venv"
    done = _run("bash", str(SETUP), "--dry-run", "--repo-url", "https://github.com/o/r",
                "--verifier", str(model), "--venv", str(venv), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for action in (f"-m venv {venv}", f"{venv}/bin/python -m pip install --quiet -e {ROOT}[server]",
                   f"mkdir -p {hermetic}/kakeya-models",
                   f"ln -sfn {model} {hermetic}/kakeya-models/verifier",
                   "./config.sh --unattended --url https://github.com/o/r --token *** "
                   "--labels kakeya-mac-m4", "./svc.sh start", "kakeya_mac doctor",
                   f"write a random bridge key to {hermetic}/.config/kakeya-mac/bridge.key",
                   "sudo dscl . -create /Users/kakeya-sandbox UserShell /usr/bin/false",
                   "NOPASSWD: ALL\" to /etc/sudoers.d/kakeya-sandbox",
                   "chmod 0711 /Users/Shared/kakeya-mac",
                   "set KAKEYA_SANDBOX_USER=kakeya-sandbox in",
                   "sudo -n -u kakeya-sandbox " + str(venv) + "/bin/python -c",
                   "kakeya_mac local bridge-selftest", "dry run: nothing was changed"):
        assert action in out, action
    assert "AAAA-registration-secret" not in out + done.stderr
    assert list(hermetic.iterdir()) == [] and not venv.exists()  # nothing was created


def test_setup_mac_refuses_unknown_options():
    done = _run("bash", str(SETUP), "--dry-run", "--bogus")
    assert done.returncode == 1 and "unknown option: --bogus" in done.stderr
