"""Presets: the trusted, reviewed commands a request may name (presets/<name>.yaml).

A request only picks a preset and fills its typed params; the argv template, the timeout, the
outputs and the gate all come from the trusted checkout. `${ENV:NAME}` placeholders exist only here
and resolve on the runner against ENV_ALLOWLIST, so a request can neither name nor read any other
variable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bridge.safety import Rejected, unsafe_reason
from bridge.schema import schema_errors
from mlx_engine.errors import UserError

BUILTINS = ("out", "request_id")
DEFAULT_STR_LEN = 256
_TOKEN = re.compile(r"\$\{ENV:([A-Za-z0-9_]*)\}|\{([a-z_][a-z0-9_]*)\}")
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_BOOL_TEXT = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

# Former preset name -> current name. Accepted through kakeya-mlx 0.1.x so that requests and
# scripts written against the old names keep running; removed in 0.2 (docs/bridge.md).
RENAMED = {
    "k3-fused-allmlx-code": "bench-code",
    "k3-fused-allmlx-natural": "bench-natural",
    "k3-step2-fused-allmlx": "bench-overgen",
    "k3-step1-incremental": "ar-baseline",
    "k3-drafter-parity": "drafter-parity",
    "k3-fused-singlefused-probe": "graph-mode-probe",
}


class PresetError(UserError):
    """A preset file is malformed: the repository's fault, never the request's."""


def models_root(environ: Mapping[str, str]) -> Path:
    """$KAKEYA_MODELS, else ~/kakeya-models: the stable runner-local place setup_mac.sh links."""
    if value := environ.get("KAKEYA_MODELS"):
        return Path(value).expanduser()
    return Path(environ.get("HOME") or Path.home()) / "kakeya-models"


def _model(var: str, linked_name: str) -> Callable[[Mapping[str, str]], str]:
    """$VAR, else ~/kakeya-models/<linked_name> when linked, else the embedded offline pair."""

    def resolve(environ: Mapping[str, str]) -> str:
        if value := environ.get(var):
            return value
        linked = models_root(environ) / linked_name
        return str(linked) if linked.exists() else "default"

    return resolve


ENV_ALLOWLIST: dict[str, Callable[[Mapping[str, str]], str]] = {
    "KAKEYA_MODELS": lambda environ: str(models_root(environ)),
    "KAKEYA_VERIFIER": _model("KAKEYA_VERIFIER", "verifier"),
    "KAKEYA_DRAFTER": _model("KAKEYA_DRAFTER", "drafter"),
}


def default_presets_dir() -> Path:
    """presets/ beside the bridge package: the trusted checkout's copy when run from one."""
    return Path(__file__).resolve().parent.parent / "presets"


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    values: tuple[str, ...] = ()
    pattern: str | None = None
    max_len: int = DEFAULT_STR_LEN
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    def check(self, value: Any) -> Any:
        """`value` as the command will get it; ValueError(reason) when it is refused."""
        if self.type == "bool":
            if type(value) is not bool:
                raise ValueError(f"expected true or false, got {_short(value)}")
            return value
        if self.type in ("int", "float"):
            return self._check_number(value)
        if type(value) is not str:
            raise ValueError(f"expected a string, got {_short(value)}")
        if reason := unsafe_reason(value):
            raise ValueError(reason)
        if self.type == "enum" and value not in self.values:
            raise ValueError(f"{_short(value)} is not one of {', '.join(self.values)}")
        if self.type == "str":
            if len(value) > self.max_len:
                raise ValueError(f"longer than {self.max_len} characters")
            if not re.fullmatch(self.pattern or "", value, flags=re.ASCII):
                raise ValueError(f"{_short(value)} does not match {self.pattern}")
        return value

    def _check_number(self, value: Any) -> int | float:
        # bool is an int subclass in Python and 5.0 is not an integer: both are type confusion here.
        if self.type == "int" and type(value) is not int:
            raise ValueError(f"expected an integer, got {_short(value)}")
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {_short(value)}")
        if self.min is not None and value < self.min:
            raise ValueError(f"{_short(value)} is below the minimum {self.min:g}")
        if self.max is not None and value > self.max:
            raise ValueError(f"{_short(value)} is above the maximum {self.max:g}")
        return float(value) if self.type == "float" else value

    def parse_text(self, text: str) -> Any:
        """A `--param k=v` value typed as the preset says, then checked like a manifest value."""
        if self.type == "int" and _INT_TEXT.fullmatch(text):
            return self.check(int(text))
        if self.type == "float" and _FLOAT_TEXT.fullmatch(text):
            return self.check(float(text))
        if self.type == "bool" and text.lower() in _BOOL_TEXT:
            return _BOOL_TEXT[text.lower()]
        if self.type in ("enum", "str"):
            return self.check(text)
        raise ValueError(f"{_short(text)} is not a valid {self.type}")


@dataclass(frozen=True)
class Output:
    path: str
    optional: bool = False


@dataclass(frozen=True)
class Check:
    path: str
    op: str
    value: Any
    when: Mapping[str, Any]


@dataclass(frozen=True)
class Gate:
    evidence: str
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Command:
    argv: list[str]
    shown: list[str]  # what logs and summaries show: ${ENV:NAME} in place of its value
    secrets: dict[str, str]  # resolved placeholder values, redacted from captured logs


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    argv: tuple[str | Mapping[str, Any], ...]
    params: Mapping[str, Param]
    timeout_s: int
    outputs: tuple[Output, ...]
    gate: Gate | None

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Typed values for every param (defaults filled in); Rejected lists every problem."""
        reasons = [
            f"params.{key}: unknown parameter for preset {self.name}"
            for key in given
            if key not in self.params
        ]
        resolved: dict[str, Any] = {}
        for name, param in self.params.items():
            if name not in given:
                if param.required:
                    reasons.append(f"params.{name}: required")
                else:
                    resolved[name] = param.default
                continue
            try:
                resolved[name] = param.check(given[name])
            except ValueError as exc:
                reasons.append(f"params.{name}: {exc}")
        if reasons:
            raise Rejected(reasons)
        return resolved

    def command(
        self, params: Mapping[str, Any], out_dir: Path, request_id: str, environ: Mapping[str, str]
    ) -> Command:
        """The argv for resolved params; one substitution pass, so values are never re-scanned."""
        values = {name: _as_text(value) for name, value in params.items()}
        values.update(out=str(out_dir), request_id=request_id)
        secrets = {name: ENV_ALLOWLIST[name](environ) for name in self.env_names()}
        argv: list[str] = []
        shown: list[str] = []
        for template in self._templates(params):
            argv.append(_TOKEN.sub(lambda m: secrets[m[1]] if m[1] is not None else values[m[2]],
                                   template))
            shown.append(_TOKEN.sub(lambda m: m[0] if m[1] is not None else values[m[2]], template))
        return Command(argv, shown, secrets)

    def env_names(self) -> list[str]:
        return sorted({m[1] for t in self._all_templates() for m in _TOKEN.finditer(t) if m[1]})

    def _templates(self, params: Mapping[str, Any]) -> list[str]:
        out: list[str] = []
        for item in self.argv:
            if isinstance(item, str):
                out.append(item)
            elif params[item["when"]] is True:
                out.extend(item["argv"])
        return out

    def _all_templates(self) -> list[str]:
        return [t for item in self.argv
                for t in ([item] if isinstance(item, str) else item["argv"])]


def load_presets(directory: Path) -> dict[str, Preset]:
    """Every presets/*.yaml, by name; one malformed file fails the whole set loudly."""
    if not directory.is_dir():
        raise PresetError(f"presets directory not found: {directory} (pass --presets-dir)")
    return {p.name: p for p in map(load_preset, sorted(directory.glob("*.yaml")))}


def find_preset(presets: Mapping[str, Preset], name: str) -> Preset | None:
    """The preset called `name`, or the one a former name now belongs to."""
    return presets.get(name) or presets.get(RENAMED.get(name, name))


def former_names(name: str) -> list[str]:
    return [old for old, new in RENAMED.items() if new == name]


def load_preset(path: Path) -> Preset:
    try:
        doc = yaml.safe_load(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PresetError(f"{path}: {exc}") from None
    if errors := schema_errors("preset.v1", doc):
        raise PresetError(f"{path}: {'; '.join(errors)}")
    preset = _build(doc)
    if problems := _lint(preset, path.stem):
        raise PresetError(f"{path}: {'; '.join(problems)}")
    return preset


def _build(doc: Mapping[str, Any]) -> Preset:
    params = {
        name: Param(name=name, **{k: tuple(v) if k == "values" else v for k, v in spec.items()})
        for name, spec in (doc.get("params") or {}).items()
    }
    gate = doc.get("gate")
    return Preset(
        name=doc["name"],
        description=doc["description"].strip(),
        argv=tuple(doc["argv"]),
        params=params,
        timeout_s=doc["timeout_s"],
        outputs=tuple(Output(**o) for o in doc.get("outputs") or ()),
        gate=None if gate is None else Gate(
            evidence=gate["evidence"],
            checks=tuple(Check(c["path"], c["op"], c["value"], c.get("when") or {})
                         for c in gate["checks"]),
        ),
    )


def _lint(preset: Preset, stem: str) -> list[str]:
    """Cross-field rules the JSON Schema cannot say."""
    problems = [] if preset.name == stem else [f"name {preset.name!r} differs from file name"]
    for template in preset._all_templates():
        for m in _TOKEN.finditer(template):
            if m[1] is not None and m[1] not in ENV_ALLOWLIST:
                problems.append(f"${{ENV:{m[1]}}} is not in the allowlist {sorted(ENV_ALLOWLIST)}")
            if m[2] is not None and m[2] not in preset.params and m[2] not in BUILTINS:
                problems.append(f"argv uses {{{m[2]}}}, which is no param")
    for item in preset.argv:
        when = None if isinstance(item, str) else preset.params.get(item["when"])
        if not isinstance(item, str) and getattr(when, "type", None) != "bool":
            problems.append(f"argv 'when: {item['when']}' must name a bool param")
    for param in preset.params.values():
        problems += [f"params.{param.name}: {p}" for p in _lint_param(param)]
    outputs = {o.path for o in preset.outputs}
    if preset.gate is not None:
        if preset.gate.evidence not in outputs:
            problems.append(f"gate evidence {preset.gate.evidence!r} is not among outputs")
        for check in preset.gate.checks:
            problems += [f"gate when: {p}" for p in _lint_when(preset, check.when)]
    return problems


def _lint_param(param: Param) -> list[str]:
    if param.name in BUILTINS:
        return ["reserved name"]
    if param.type == "str":
        try:
            re.compile(param.pattern or "")
        except re.error as exc:
            return [f"bad pattern: {exc}"]
    if param.type in ("int", "float") and param.min is not None and param.max is not None \
            and param.min > param.max:
        return ["min is above max"]
    problems = [f"enum value {v!r}: {r}" for v in param.values if (r := unsafe_reason(v))]
    if param.default is not None:
        try:
            param.check(param.default)
        except ValueError as exc:
            problems.append(f"default: {exc}")
    return problems


def _lint_when(preset: Preset, when: Mapping[str, Any]) -> list[str]:
    problems = []
    for name, value in when.items():
        param = preset.params.get(name)
        if param is None:
            problems.append(f"{name} is no param")
            continue
        try:
            param.check(value)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
    return problems


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

