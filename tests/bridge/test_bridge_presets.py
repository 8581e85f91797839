"""Presets, placeholders, the gate and the string rules, without git."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from bridge import manifest
from bridge.gate import judge
from bridge.presets import (
    ENV_ALLOWLIST,
    RENAMED,
    Param,
    PresetError,
    default_presets_dir,
    find_preset,
    load_preset,
    load_presets,
)
from bridge.safety import Rejected, unsafe_reason

SHIPPED = {"bridge-selftest", "bench-code", "bench-natural", "bench-overgen", "bench-sampled",
           "bench-workload", "readme-first-command", "ar-baseline", "drafter-parity",
           "graph-mode-probe", "server-throughput"}


def test_shipped_presets_load_and_render_with_the_offline_pair(hermetic):
    presets = load_presets(default_presets_dir())
    assert set(presets) >= SHIPPED
    for preset in presets.values():
        params = preset.resolve_params({})
        command = preset.command(params, Path("/out"), f"{preset.name}-x", {"HOME": str(hermetic)})
        assert command.argv[:2] == ["python", "-m"]
        for flag in ("--model", "--draft"):
            if flag in command.argv:
                assert command.argv[command.argv.index(flag) + 1] == "default"
                assert command.shown[command.shown.index(flag) + 1].startswith("${ENV:KAKEYA_")
        assert preset.timeout_s < 330 * 60  # shorter than the workflow job's timeout-minutes


def test_placeholders_resolve_on_the_runner_only(hermetic):
    preset = load_presets(default_presets_dir())["bench-code"]
    params = preset.resolve_params({})
    argv = preset.command(params, Path("/o"), "r", {"HOME": str(hermetic)}).argv
    assert argv[argv.index("--model") + 1] == "default"
    (hermetic / "kakeya-models" / "verifier").mkdir(parents=True)
    argv = preset.command(params, Path("/o"), "r", {"HOME": str(hermetic)}).argv
    assert argv[argv.index("--model") + 1] == str(hermetic / "kakeya-models" / "verifier")
    env = {"HOME": str(hermetic), "KAKEYA_VERIFIER": "/models/gemma", "KAKEYA_DRAFTER": "/d"}
    command = preset.command(params, Path("/o"), "r", env)
    assert command.argv[command.argv.index("--model") + 1] == "/models/gemma"
    assert command.secrets == {"KAKEYA_DRAFTER": "/d", "KAKEYA_VERIFIER": "/models/gemma"}
    assert "/models/gemma" not in " ".join(command.shown)
    assert set(ENV_ALLOWLIST) == {"KAKEYA_MODELS", "KAKEYA_VERIFIER", "KAKEYA_DRAFTER"}


def test_former_names_resolve_to_the_renamed_presets():
    presets = load_presets(default_presets_dir())
    assert set(RENAMED.values()) <= set(presets) and not set(RENAMED) & set(presets)
    for old, new in RENAMED.items():
        assert find_preset(presets, old) is presets[new]
    assert find_preset(presets, "k3-fused-allmlx-code").name == "bench-code"  # the mission's
    assert find_preset(presets, "no-such-preset") is None


def _manifest(preset: str, request_id: str) -> dict:
    return {"version": 1, "request_id": request_id, "preset": preset, "params": {"n": 4},
            "created_at": "2026-06-11T12:00:00Z", "requester": "agent@example.com",
            "base_sha": "0" * 40}


def test_a_request_under_a_former_name_is_valid_and_runs_the_renamed_preset():
    presets = load_presets(default_presets_dir())
    old = "k3-fused-allmlx-code-20260611T120000Z-0123abcd"
    request = manifest.validate(_manifest("k3-fused-allmlx-code", old), presets)
    assert request.preset is presets["bench-code"] and request.params["n"] == 4
    new = "bench-code-20260611T120000Z-0123abcd"
    assert manifest.validate(_manifest("bench-code", new), presets).preset is presets["bench-code"]
    with pytest.raises(Rejected, match="must start with the preset name 'k3-fused-allmlx-code'"):
        manifest.validate(_manifest("k3-fused-allmlx-code", new), presets)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    return path


BASE = """
    name: p
    description: d
    argv: [python, -m, mod, --x, "{x}", {when: loud, argv: [--loud]}]
    params:
      x: {type: str, pattern: ".*", default: "a"}
      loud: {type: bool, default: false}
    timeout_s: 10
    outputs: [{path: e.json}]
    gate: {evidence: e.json, checks: [{path: a.b, op: "==", value: true}]}
"""


def test_substitution_is_one_pass_and_bool_flags_are_conditional(tmp_path):
    preset = load_preset(_write(tmp_path, BASE))
    argv = preset.command({"x": "{out}", "loud": False}, Path("/o"), "r", {}).argv
    assert argv == ["python", "-m", "mod", "--x", "{out}"]
    argv = preset.command({"x": "b", "loud": True}, Path("/o"), "r", {}).argv
    assert argv[-1] == "--loud"


@pytest.mark.parametrize(("old", "new", "reason"), [
    ("name: p", "name: q", "differs from file name"),
    ('"{x}"', '"${ENV:AWS_SECRET}"', "is not in the allowlist"),
    ('"{x}"', '"{y}"', "argv uses {y}, which is no param"),
    ("argv: [python,", "argv: [bash,", "'python' was expected"),
    ("when: loud", "when: x", "must name a bool param"),
    ('default: "a"', "default: -a", "default: starts with '-'"),
    ("path: e.json}]\n", "path: other.json}]\n", "not among outputs"),
    ("timeout_s: 10", "timeout_s: 0", "timeout_s"),
    ("loud: {type: bool", "out: {type: bool", "reserved name"),
])
def test_malformed_presets_fail_loudly(tmp_path, old, new, reason):
    assert old in BASE
    with pytest.raises(PresetError) as err:
        load_preset(_write(tmp_path, BASE.replace(old, new, 1)))
    assert reason in str(err.value)


def test_gate_verdicts(tmp_path):
    preset = load_preset(_write(tmp_path, BASE))
    out = tmp_path / "out"
    out.mkdir()
    params = {"x": "a", "loud": False}
    assert judge(preset, params, out, 0, False).reasons == ["missing output e.json"]
    for value, passed in ((True, True), (1, False), (False, False), ("true", False)):
        (out / "e.json").write_text(json.dumps({"a": {"b": value}}))
        assert judge(preset, params, out, 0, False).passed is passed, value
    (out / "e.json").write_text(json.dumps({"a": {}}))
    assert judge(preset, params, out, 0, False).reasons == ["a.b == true: missing from evidence"]
    (out / "e.json").write_text("{not json")
    assert "e.json is not valid JSON" in judge(preset, params, out, 0, False).reasons[0]
    (out / "e.json").write_text(json.dumps({"a": {"b": True}}))
    assert judge(preset, params, out, 3, False).reasons == ["exit code 3"]
    assert judge(preset, params, out, -9, True).reasons == ["timed out after 10s"]


def test_gate_checks_can_depend_on_params(hermetic, tmp_path):
    preset = load_presets(default_presets_dir())["drafter-parity"]
    (tmp_path / "evidence.json").write_text(json.dumps({"aggregate": {"agreement": 0.95}}))
    fp32 = judge(preset, {"dtype": "float32"}, tmp_path, 0, False)
    bf16 = judge(preset, {"dtype": "bfloat16"}, tmp_path, 0, False)
    assert fp32.reasons == ["aggregate.agreement == 1.0: got 0.95"] and bf16.passed


@pytest.mark.parametrize(("value", "reason"), [
    ("ok value", None), ("Wait... what", None), ("a/b", None),
    ("-x", "starts with '-'"), ("\u2010x", "starts with '-'"), ("\u2212x", "starts with '-'"),
    ("a\x00b", "control"), ("a\u200bb", "control"),
    ("../x", "traversal"), ("a\\..\\b", "traversal"),
    ("/etc", "absolute"), ("~root", "absolute"), ("C:\\x", "absolute"),
    ("${ENV:HOME}", "placeholders"), ("\uff04{ENV:HOME}", "placeholders"),
])
def test_unsafe_reason(value, reason):
    got = unsafe_reason(value)
    assert (got is None) if reason is None else (reason in got)


def test_cli_text_is_typed_strictly():
    count = Param("count", "int", default=1, min=0, max=100)
    assert count.parse_text("+7") == 7
    for text in ("７", "1e2", "0x10", "1.0", ""):
        with pytest.raises(ValueError):
            count.parse_text(text)
    ratio = Param("ratio", "float", default=0.5, min=0.0, max=1.0)
    assert ratio.parse_text(".25") == 0.25
    with pytest.raises(ValueError):
        ratio.parse_text("nan")
    flag = Param("flag", "bool", default=False)
    assert flag.parse_text("YES") is True and flag.parse_text("0") is False
