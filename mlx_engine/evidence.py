"""Evidence records (schema v1): what ran, where, how fast, and whether it was lossless.

The bridge's gates and the README's tables read these files, so every record is validated
against the JSON Schema shipped beside this module before it is written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypedDict

import mlx.core as mx

from . import __version__, blas
from .engine import Engine, RunResult
from .host import chip
from .prompt_cache import common_prefix
from .speculative import DecodeStats

SCHEMA_PATH = Path(__file__).parent / "schemas" / "evidence.v1.json"
TIMING = ("decode_tok_s excludes the first token (prefill's); warm-up, and the width policy's "
          "round-cost calibration in it (params.round_cost_s), ran before any timed run and is "
          "charged to no arm")


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd,
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_sha(package: Path = Path(__file__).parent) -> str | None:
    """HEAD of the checkout this code runs from, `-dirty` when tracked files of the package
    differ from it (a number must lead back to the code that produced it; a docs edit while a
    bench runs does not change that code)."""
    sha = _git(package, "rev-parse", "HEAD")
    if not sha:
        return None
    dirty = _git(package, "status", "--porcelain", "--untracked-files=no", "--", ".")
    return f"{sha}-dirty" if dirty else sha


def source_sha256(package: Path = Path(__file__).parent) -> str:
    """sha256 over the package's Python sources (relative path + bytes, sorted): names the code
    where git cannot, e.g. a copy of the tree shipped to another machine with a stale `.git`."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def code_version() -> dict[str, str | None]:
    """git_sha() and source_sha256() of the code this process runs, read once: runs call it
    when they start, so an edit made while a long bench runs cannot relabel the code that ran."""
    return {"git_sha": git_sha(), "source_sha256": source_sha256()}


def backend() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if sys.platform == "darwin" else "cuda"


def device_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "chip": chip(),
        "mlx_version": mx.__version__,
        "backend": backend(),
        "blas": blas.detect().describe(),
        "mlx_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MLX_")},
    }


def output_sha256(tokens: list[int]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where two token streams differ (or one ends); None if equal.

    In bf16/fp16 two correct implementations can flip a near-tie argmax (kernels round by
    shape); where a stream departs tells a late near-tie from an early bug.
    """
    return None if a == b else common_prefix(a, b)


def histogram(values: list[int], size: int) -> list[int]:
    """hist[k] = how many values equal k (drafts accepted per block, block widths)."""
    hist = [0] * size
    for v in values:
        hist[v] += 1
    return hist


def timing(result: RunResult) -> dict[str, Any]:
    """An arm's speed: decode-only (tokens after the first) and end to end (prefill included)."""
    s = result.stats
    return {"decode_tok_s": s.decode_tok_s, "prefill_s": s.prefill_s, "e2e_tok_s": s.e2e_tok_s,
            "new_tokens": len(result.tokens)}


def time_split(stats: DecodeStats) -> dict[str, float | None]:
    return {"draft": stats.draft_s, "verify": stats.verify_s, "extend": stats.extend_s}


class Retrieval(TypedDict):
    """bench NIAH: whether the AR output holds the needle."""

    needle: str
    found: bool


class Profile(TypedDict):
    """bench: the separate profiled fused run (an extra sync per block) and its time split."""

    blocks: int
    decode_tok_s: float
    time_split_s: dict[str, float | None]


class ArmExtensions(TypedDict, total=False):
    """What a tool adds to one arm's timing."""

    repeat_decode_tok_s: list[float]  # bench --repeats: every repeat; the arm keeps the median
    profile: Profile


class SampleExtensions(TypedDict, total=False):
    """What a tool adds to one sample: the schema's optional sample keys. A given `lossless`
    replaces the computed one (the bench's also covers its repeats and the profiled run)."""

    lossless: bool
    source: str
    finish_reason: Literal["stop", "length"]
    mlx_lm: dict[str, Any] | None
    retrieval: Retrieval
    peers: dict[str, dict[str, Any]]
    server: dict[str, Any]


def _checked(extra: dict[str, Any] | None, kind: type) -> dict[str, Any]:
    """`extra` if its keys are the TypedDict's: a misspelt key fails here, not in the schema."""
    unknown = set(extra or {}) - set(kind.__annotations__)
    if unknown:
        raise ValueError(f"not {kind.__name__} keys: {', '.join(sorted(unknown))}")
    return dict(extra or {})


def sample_record(prompt_id: str, prompt_tokens: int, block_size: int | None,
                  ar: RunResult | None, fused: RunResult | None,
                  extensions: SampleExtensions | None = None,
                  ar_extra: ArmExtensions | None = None,
                  fused_extra: ArmExtensions | None = None) -> dict[str, Any]:
    """One prompt's timings for each arm that ran, the token-for-token comparison, and what
    a tool adds per sample and per arm."""
    ran = fused or ar
    record: dict[str, Any] = {
        "prompt_id": prompt_id,
        "prompt_tokens": prompt_tokens,
        "new_tokens": len(ran.tokens),
        "ar": None,
        "fused": None,
        "lossless": None if ar is None or fused is None else ar.tokens == fused.tokens,
        "first_divergence": None if ar is None or fused is None
        else first_divergence(ar.tokens, fused.tokens),
        "output_sha256": output_sha256(ran.tokens),
    }
    if ar is not None:
        record["ar"] = timing(ar) | _checked(ar_extra, ArmExtensions)
    if fused is not None:
        s = fused.stats
        record["fused"] = {
            **timing(fused),
            "mean_accept_len": s.mean_accept_len,
            "accept_hist": histogram(s.accepted, block_size or 1),
            "width_hist": histogram(s.widths, (block_size or 1) + 1),
            "ar_steps": s.ar_steps,
            "shadows": s.shadows,
            "blocks": s.blocks,
            "syncs_per_block": s.syncs_per_block,
            "time_split_s": time_split(s),
        } | _checked(fused_extra, ArmExtensions)
    return record | _checked(extensions, SampleExtensions)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fused_vs_ar(samples: list[dict[str, Any]]) -> list[float]:
    """Per sample with both arms timed: fused decode tok/s over AR's (same prompt)."""
    return [s["fused"]["decode_tok_s"] / s["ar"]["decode_tok_s"] for s in samples
            if s["ar"] and s["fused"] and s["ar"]["decode_tok_s"] > 0]


def per_round(taus_and_rounds: list[tuple[float, int]]) -> float | None:
    """Tokens per verify round over several runs: each run's tau weighted by its rounds (a
    median of taus would weigh a 9-round answer like a 40-round one)."""
    rounds = sum(n for _, n in taus_and_rounds)
    return sum(t * n for t, n in taus_and_rounds) / rounds if rounds else None


def aggregate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over samples; the speedup is the median of per-sample ratios (same prompt)."""
    ar = [s["ar"]["decode_tok_s"] for s in samples if s["ar"]]
    fused = [s["fused"]["decode_tok_s"] for s in samples if s["fused"]]
    compared = [s["lossless"] for s in samples if s["lossless"] is not None]
    return {
        "ar_decode_tok_s": median(ar),
        "fused_decode_tok_s": median(fused),
        "speedup_vs_ar": median(fused_vs_ar(samples)),
        "mean_accept_len": per_round([(s["fused"]["mean_accept_len"], s["fused"]["blocks"])
                                      for s in samples if s["fused"]]),
        "lossless_all": all(compared) if compared else None,
    }


def _header(engine: Engine, params: dict[str, Any], command: str | None) -> dict[str, Any]:
    """What every record starts with: the code, the device and the weights that ran."""
    m = engine.model_info
    tool = {"name": "kakeya-mlx", "version": __version__, **code_version()}
    if command:
        tool["command"] = command
    return {
        "schema_version": 1,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": tool,
        "device": device_info(),
        "verifier": {"id": m.id, "sha256": m.sha256, "dtype": m.dtype},
        "params": params,
    }


def _drafter(engine: Engine, block_size: int) -> dict[str, Any]:
    d = engine.drafter_info
    return {"id": d.id, "sha256": d.sha256, "dtype": d.dtype, "block_size": block_size}


def build_record(engine: Engine, params: dict[str, Any], samples: list[dict[str, Any]],
                 block_size: int | None, command: str | None = None,
                 workload: str | None = None,
                 aggregate_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A decoding record: header, samples, and the aggregate over them (plus what the tool
    aggregates of its own: `aggregate_extra`)."""
    record = {
        **_header(engine, params, command),
        "drafter": None if engine.drafter_info is None or block_size is None
        else _drafter(engine, block_size),
        "samples": samples,
        "aggregate": aggregate(samples) | (aggregate_extra or {}),
    }
    if workload is not None:
        record["workload"] = workload
    return record


def parity_record(engine: Engine, params: dict[str, Any], result: dict[str, Any],
                  command: str | None = None) -> dict[str, Any]:
    """A drafter-parity record: the MLX drafter against the torch reference, no decoding."""
    return {**_header(engine, params, command), "kind": "drafter-parity",
            "drafter": _drafter(engine, engine.drafter.config.block_size),
            "aggregate": result}


def validate(record: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError if the record does not follow schema v1."""
    import jsonschema

    jsonschema.validate(record, json.loads(SCHEMA_PATH.read_text()))


def write(record: dict[str, Any], path: Path) -> None:
    validate(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
