"""Hermetic git-bus fixtures: a bare repo is the remote, git reads no user or system config, and
the seed repository is this checkout's bridge/ and presets/ plus a tiny fake engine the test
presets run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from bridgetest import survivors

from bridge import cli, client, executor, gitbus
from bridge.presets import load_presets

ROOT = Path(__file__).resolve().parents[2]

TEST_PRESETS = {
    "test-marker.yaml": """
        name: test-marker
        description: Test preset that records its run; every param type.
        argv: [python, -m, fakeengine.marker, --out, "{out}", --id, "{request_id}",
               --note, "{note}", --lossless, "{lossless}", --count, "{count}",
               --ratio, "{ratio}", --level, "{level}", {when: flag, argv: [--flag]}]
        params:
          note: {type: str, pattern: "[a-z0-9 ._-]*", max_len: 64, default: hello}
          lossless: {type: enum, values: ["true", "false"], default: "true"}
          count: {type: int, min: 0, max: 100, default: 1}
          ratio: {type: float, min: 0.0, max: 1.0, default: 0.5}
          level: {type: enum, values: [low, high], default: low}
          flag: {type: bool, default: false}
        timeout_s: 60
        outputs: [{path: evidence.json}]
        gate:
          evidence: evidence.json
          checks:
            - {path: aggregate.lossless_all, op: "==", value: true}
    """,
    "test-runaway.yaml": """
        name: test-runaway
        description: Test preset that never ends and leaves descendants behind.
        argv: [python, -m, fakeengine.runaway, --pids, "{out}/pids.txt"]
        timeout_s: 3
        outputs: [{path: pids.txt}]
    """,
    "test-attack.yaml": """
        name: test-attack
        description: Test preset whose code attacks the runner (a request's code runs by design).
        argv: [python, -m, fakeengine.attack, --out, "{out}", --attack, "{attack}",
               --victim, "{victim}", --done, "{done}"]
        params:
          attack: {type: enum, values: [environ, reach, limits, daemons, hang, log-links, fifo,
                                        names, deep, many, hardlink]}
          victim: {type: str, pattern: "[a-zA-Z0-9-]*", max_len: 96, default: ""}
          done: {type: str, pattern: "[a-zA-Z0-9-]*", max_len: 96, default: ""}
        timeout_s: 60
    """,
}


def git(repo: Path, *args: str) -> str:
    return gitbus.git(repo, *args)


IDENTITY = {
    "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "Agent", "GIT_AUTHOR_EMAIL": "agent@example.com",
    "GIT_COMMITTER_NAME": "Agent", "GIT_COMMITTER_EMAIL": "agent@example.com",
}
BRIDGE_KEY = {"KAKEYA_BRIDGE_KEY": "test-bridge-key-shared-by-runners-and-clients"}


@pytest.fixture(autouse=True)
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No user/system git config, a fresh HOME, fixed identities; returns HOME."""
    home = tmp_path / "home"
    home.mkdir()
    for var in [v for v in os.environ if v.startswith(("KAKEYA_", "GIT_"))]:
        monkeypatch.delenv(var)
    for key, value in {**IDENTITY, **BRIDGE_KEY, "HOME": str(home),
                       "PYTHONPATH": str(ROOT)}.items():
        monkeypatch.setenv(key, value)
    return home


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """After every test, nothing this test started is still running."""
    yield
    left = survivors([p.pid for p in psutil.Process().children(recursive=True)])
    assert left == [], f"processes left running: {left}"


@pytest.fixture(scope="session")
def seeded_origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare remote holding this checkout's bridge/, presets/ and workflow plus a fake engine;
    built once, copied for each test."""
    tmp = tmp_path_factory.mktemp("seed")
    seed, origin = tmp / "seed", tmp / "origin.git"
    for sub in ("bridge", "presets"):
        shutil.copytree(ROOT / sub, seed / sub, ignore=shutil.ignore_patterns("__pycache__"))
    (seed / ".github" / "workflows").mkdir(parents=True)
    shutil.copy(ROOT / ".github" / "workflows" / "mac-bridge.yaml", seed / ".github" / "workflows")
    (seed / "mlx_engine").mkdir()
    (seed / "mlx_engine" / "__init__.py").write_text('"""engine stub for bridge tests"""\n')
    shutil.copy(ROOT / "mlx_engine" / "errors.py", seed / "mlx_engine")
    shutil.copytree(Path(__file__).with_name("fakeengine"), seed / "fakeengine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (seed / "README.md").write_text("seed\n")
    for args in (["init", "-q", "--bare", "-b", "main", str(origin)],
                 ["init", "-q", "-b", "main", str(seed)],
                 ["-C", str(seed), "add", "-A"],
                 ["-C", str(seed), "commit", "-q", "-m", "seed"],
                 ["-C", str(seed), "push", "-q", str(origin), "main"]):
        subprocess.run(["git", *args], check=True, env={**os.environ, **IDENTITY})
    return origin


@pytest.fixture
def presets_dir(tmp_path: Path) -> Path:
    """The shipped presets plus the test presets (which only the test seed repo can run)."""
    out = tmp_path / "presets"
    shutil.copytree(ROOT / "presets", out)
    for name, text in TEST_PRESETS.items():
        (out / name).write_text(textwrap.dedent(text))
    return out


class Bus:
    """A bare remote, the agent's clone, and helpers to act as client and runner."""

    def __init__(self, tmp: Path, presets_dir: Path, seeded_origin: Path) -> None:
        self.tmp = tmp
        self.presets_dir = presets_dir
        self.origin = tmp / "origin.git"
        self.agent = tmp / "agent"
        shutil.copytree(seeded_origin, self.origin)
        subprocess.run(["git", "clone", "-q", str(self.origin), str(self.agent)], check=True)

    @property
    def executions(self) -> list[str]:
        log = Path(os.environ["HOME"]) / "executions.log"
        return log.read_text().split() if log.exists() else []

    def config(self, name: str = "runner", **overrides) -> executor.Config:
        settings = {"remote": str(self.origin), "work": self.tmp / f"work-{name}",
                    "presets_dir": self.presets_dir, "runner_id": name, "kill_grace_s": 0.5,
                    "environ": dict(os.environ)}
        return executor.Config(**{**settings, **overrides})

    def kakeya(self, *args: str, capsys: pytest.CaptureFixture[str],
               cwd: Path | None = None) -> tuple[int, str, str]:
        """Run `kakeya_mac ARGS` in-process from the agent clone: (exit code, stdout, stderr)."""
        capsys.readouterr()
        previous = Path.cwd()
        os.chdir(cwd or self.agent)
        try:
            code = cli.main([*args, *self._presets_flag(args)])
        finally:
            os.chdir(previous)
        out, err = capsys.readouterr()
        return code, out, err

    def spawn(self, *args: str, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """`kakeya_mac ARGS` as its own process (for runs that must overlap)."""
        return subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", *args, *self._presets_flag(args)],
            cwd=cwd or self.agent, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env)

    def serve(self, runner_id: str, *args: str, work: str | None = None,
              env: dict[str, str] | None = None, **settings: object) -> subprocess.Popen[str]:
        """`kakeya_mac serve` for this bus as its own process, in work-<work or runner_id>;
        settings as in `config`."""
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
        return self.spawn("serve", "--remote", str(self.origin), "--runner-id", runner_id,
                          "--work", str(self.tmp / f"work-{work or runner_id}"),
                          "--kill-grace-s", "0.5", *flags, *args, env=env)

    def _presets_flag(self, args: tuple[str, ...]) -> list[str]:
        takes = {"run", "presets", "validate", "doctor", "local", "serve"}
        return ["--presets-dir", str(self.presets_dir)] if args and args[0] in takes else []

    def remote_branches(self, prefix: str = "") -> dict[str, str]:
        out = git(self.origin, "for-each-ref", "--format=%(refname:short) %(objectname)",
                  f"refs/heads/{prefix}")
        return dict(line.split() for line in out.splitlines())

    def result_file(self, request_id: str, path: str) -> bytes:
        return gitbus.git_bytes(self.origin, "cat-file", "blob",
                                f"refs/heads/{gitbus.RESULT_PREFIX}{request_id}:{path}")

    def submit(self, preset: str = "test-marker", *params: str) -> tuple[str, str]:
        """Push a request as `kakeya_mac run` does; (request id, request commit)."""
        request_id, _, sha = client.submit(self.agent, load_presets(self.presets_dir), preset,
                                           list(params), "origin", "mac-bridge/", "")
        return request_id, sha

    def summary(self, request_id: str) -> dict:
        return json.loads(self.result_file(request_id, "summary.json"))

    def push_manifests(self, manifests: dict[str, bytes]) -> None:
        """Push hand-made requests (any bytes as the manifest) in one push, as a client would."""
        head = git(self.agent, "rev-parse", "HEAD")
        specs = []
        for request_id, data in manifests.items():
            tree = gitbus.tree_with_file(self.agent, head, ".mac-bridge/request.json", data)
            sha = gitbus.commit(self.agent, tree, "hand-made request", [head])
            specs.append(f"{sha}:refs/heads/mac-bridge/{request_id}")
        git(self.agent, "push", "-q", str(self.origin), *specs)


@pytest.fixture
def bus(tmp_path: Path, presets_dir: Path, seeded_origin: Path) -> Bus:
    return Bus(tmp_path, presets_dir, seeded_origin)


@pytest.fixture
def kakeya(presets_dir: Path, capsys: pytest.CaptureFixture[str]):
    """`kakeya_mac ARGS --presets-dir <test presets>` in-process: (exit code, stdout, stderr)."""

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main([*args, "--presets-dir", str(presets_dir)])
        out, err = capsys.readouterr()
        return code, out, err

    return call


SANDBOX_UID = 64_000


def _runnable_by(python: str, uid: int) -> bool:
    try:
        return subprocess.run([python, "-c", ""], user=uid, group=uid, extra_groups=[],
                              capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.fixture
def sandboxed() -> Iterator[Callable[[int], dict]]:
    """Runner settings that run presets as an unprivileged uid (no account needed as root):
    `sandboxed(n)` for uid 64000+n, a scratch directory that uid can reach, and an interpreter it
    can run (this one, unless it lives under a private home such as /root)."""
    if os.geteuid() != 0:
        pytest.skip("switching presets to another uid needs a root runner here; a non-root "
                    "runner goes through sudo, which setup_mac.sh configures on the Mac")
    python = next((p for p in (sys.executable, "/usr/bin/python3") if _runnable_by(p, SANDBOX_UID)),
                  None)
    if python is None:
        pytest.skip("no Python interpreter here is runnable by an unprivileged uid")
    scratch = Path(tempfile.mkdtemp(prefix="kakeya-sandbox-", dir="/tmp"))
    scratch.chmod(0o711)

    def settings(n: int = 0) -> dict:
        return {"sandbox_user": str(SANDBOX_UID + n), "scratch": scratch / str(n),
                "preset_python": python}

    yield settings
    sandboxed_left = [p.pid for p in psutil.process_iter(["uids"])
                      if SANDBOX_UID <= p.info["uids"].real < SANDBOX_UID + 10]
    assert survivors(sandboxed_left) == [], "processes of a sandbox user left running"
    subprocess.run(["/bin/rm", "-rf", str(scratch)], check=False)
