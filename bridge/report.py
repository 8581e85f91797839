"""What a finished request leaves behind: summary.json, a README.md that reads well on GitHub, logs
(capped, placeholder values redacted) and artifacts, each with its sha256."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bridge.schema import schema_errors

MAX_LOG_BYTES = 4 * 1024 * 1024
MAX_COMMITTED_BYTES = 20 * 1024 * 1024
STDERR_TAIL_LINES = 40
_LEDGER = ("summary.json", "README.md")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text("utf-8"))


def new_summary(request_id: str, preset: str, runner: str, executor_sha: str | None,
                host: Mapping[str, Any]) -> dict[str, Any]:
    """A summary with every field present; the executor fills in what it learns."""
    now = utc_now()
    return {
        "version": 1, "request_id": request_id, "preset": preset, "status": "error",
        "params": {}, "requester": None, "request_sha": None, "base_sha": None,
        "executor_sha": executor_sha, "runner": runner, "host": dict(host),
        "started_at": now, "ended_at": now, "duration_s": 0.0, "exit_code": None,
        "timed_out": False, "argv": [], "gate": {"passed": False, "reasons": []},
        "aggregate": None, "artifacts": {}, "omitted": {},
    }


def finalize(run_dir: Path, summary: dict[str, Any], secrets: Mapping[str, str]) -> set[Path]:
    """Redact the logs, hash every file, write summary.json + README.md.

    `run_dir` holds only what the executor put there (copies made by `bridge.collect`). Returns
    the files too large to commit (they stay on disk for the workflow's artifact upload).
    """
    for log in sorted((run_dir / "logs").glob("*.log")):
        _redact(log, secrets)
    too_large = set()
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir).as_posix()
        if rel in _LEDGER:
            continue
        summary["artifacts"][rel] = _sha256(path)
        if path.stat().st_size > MAX_COMMITTED_BYTES:
            too_large.add(path)
            summary["omitted"][rel] = (f"larger than {MAX_COMMITTED_BYTES} bytes: "
                                       "workflow artifact only")
    if errors := schema_errors("summary.v1", summary):
        raise ValueError(f"summary does not match its schema: {errors}")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
    (run_dir / "README.md").write_text(markdown(summary, run_dir), "utf-8")
    return too_large


def _redact(path: Path, secrets: Mapping[str, str]) -> None:
    """Replace each resolved placeholder value by its name."""
    data = path.read_bytes()
    for name, value in secrets.items():
        if value and value != "default":
            data = data.replace(value.encode(), f"${{ENV:{name}}}".encode())
    path.write_bytes(data)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def aggregate_of(evidence: Any) -> dict[str, Any] | None:
    """The scalar metrics of an evidence record's `aggregate`, for summaries and tables."""
    agg = evidence.get("aggregate") if isinstance(evidence, dict) else None
    if not isinstance(agg, dict):
        return None
    return {k: v for k, v in agg.items() if v is None or isinstance(v, str | int | float | bool)}


def rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The facts a reader wants first, shared by the README table and the terminal view."""
    host = summary["host"]
    params = ", ".join(f"{k}={json.dumps(v)}" for k, v in summary["params"].items())
    return [
        ("status", summary["status"]),
        ("preset", summary["preset"]),
        ("params", params or "-"),
        ("exit code", str(summary["exit_code"])),
        ("timed out", str(summary["timed_out"]).lower()),
        ("duration", f"{summary['duration_s']:.1f}s"),
        ("request commit", str(summary["request_sha"])),
        ("base commit", str(summary["base_sha"])),
        ("executor commit", str(summary["executor_sha"])),
        ("runner", summary["runner"]),
        ("host", " / ".join(str(host.get(k)) for k in ("chip", "os", "python", "mlx"))),
        ("started", summary["started_at"]),
        ("ended", summary["ended_at"]),
    ]


def text(summary: Mapping[str, Any]) -> str:
    """The terminal view printed by `kakeya_mac run --wait` and `status ID`."""
    lines = [f"{summary['request_id']}: {summary['status'].upper()}"]
    lines += [f"  {k}: {v}" for k, v in rows(summary)[1:6]]
    lines += [f"  gate: {r}" for r in summary["gate"]["reasons"]]
    lines += [f"  {k} = {json.dumps(v)}" for k, v in (summary["aggregate"] or {}).items()]
    return "\n".join(lines)


def markdown(summary: Mapping[str, Any], run_dir: Path) -> str:
    status = summary["status"]
    out = [f"# mac-bridge result `{summary['request_id']}`", "",
           f"**{status.upper()}** - preset `{summary['preset']}`", "",
           "| | |", "|---|---|"]
    out += [f"| {k} | {_cell(v)} |" for k, v in rows(summary)]
    out += ["", "## Gate", ""]
    out += [f"- {r}" for r in summary["gate"]["reasons"]] or ["- passed"]
    if summary["aggregate"]:
        out += ["", "## Evidence aggregate", "", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {_cell(json.dumps(v))} |" for k, v in summary["aggregate"].items()]
    plots = sorted(p for p in summary["artifacts"] if p.endswith(".png"))
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).name}]({p})" for p in plots]
    out += ["", "## Command", "", "```", " ".join(summary["argv"]) or "(not run)", "```"]
    stderr = run_dir / "logs" / "stderr.log"
    if status != "passed" and stderr.is_file():
        tail = stderr.read_text("utf-8", "replace").splitlines()[-STDERR_TAIL_LINES:]
        if tail:
            out += ["", f"## stderr (last {STDERR_TAIL_LINES} lines)", "", "```", *tail, "```"]
    out += ["", "## Files", "", "| file | sha256 |", "|---|---|"]
    out += [f"| [{p}]({p}) | `{h}` |" for p, h in summary["artifacts"].items()]
    out += [f"| {p} | omitted: {why} |" for p, why in summary["omitted"].items()]
    return "\n".join(out) + "\n"


def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")
