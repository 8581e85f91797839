"""Did a run pass? Exit code, timeout, required outputs, then the preset's evidence checks."""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.presets import Check, Preset

MAX_EVIDENCE_BYTES = 64 * 1024 * 1024
_OPS = {"==": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge,
        "<": operator.lt, "<=": operator.le}
_MISSING = object()


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: list[str]
    evidence: Any  # the parsed evidence JSON, or None


def judge(preset: Preset, params: Mapping[str, Any], out_dir: Path, exit_code: int | None,
          timed_out: bool) -> Verdict:
    reasons = []
    if timed_out:
        reasons.append(f"timed out after {preset.timeout_s}s")
    elif exit_code != 0:
        reasons.append(f"exit code {exit_code}")
    reasons += [f"missing output {o.path}" for o in preset.outputs
                if not o.optional and not (out_dir / o.path).is_file()]
    evidence = None
    if preset.gate is not None and (out_dir / preset.gate.evidence).is_file():
        evidence, problem = _load(out_dir / preset.gate.evidence)
        if problem:
            reasons.append(problem)
        else:
            reasons += [r for c in preset.gate.checks
                        if _applies(c, params) and (r := _failure(c, evidence))]
    return Verdict(not reasons, reasons, evidence)


def _load(path: Path) -> tuple[Any, str | None]:
    if path.stat().st_size > MAX_EVIDENCE_BYTES:
        return None, f"{path.name} is larger than {MAX_EVIDENCE_BYTES} bytes"
    try:
        return json.loads(path.read_text("utf-8")), None
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"{path.name} is not valid JSON: {exc}"


def _applies(check: Check, params: Mapping[str, Any]) -> bool:
    return all(params.get(k) == v for k, v in check.when.items())


def _failure(check: Check, evidence: Any) -> str | None:
    """A one-line reason when the check fails, None when it holds."""
    got = _lookup(evidence, check.path)
    want = f"{check.path} {check.op} {json.dumps(check.value)}"
    if got is _MISSING:
        return f"{want}: missing from evidence"
    if not _comparable(got, check.value, check.op):
        return f"{want}: got {json.dumps(got)}"
    return None if _OPS[check.op](got, check.value) else f"{want}: got {json.dumps(got)}"


def _lookup(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _MISSING
    return doc


def _comparable(got: Any, want: Any, op: str) -> bool:
    """Same kind of value: true is not 1, and only numbers are ordered."""
    def is_number(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    if op in ("==", "!="):
        return (is_number(got) and is_number(want)) or type(got) is type(want)
    return is_number(got) and is_number(want)
