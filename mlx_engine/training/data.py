"""Training data: code prompts from the interpreter's own sources, split by file, cached.

Real code is always available offline: the running interpreter's standard library. Files
are split into train / held-out by a hash of their path relative to the stdlib root, so the
split is the same on every machine and Python version, and any evaluation that draws its
prompts from `held_out_files()` never sees a file the drafter was trained on.

The drafter must predict what THIS target emits, so each prompt is paired with the target's
own greedy continuation (filled in by a torch generator; this module stays torch-free so the
MLX bench can import the split). Everything lands in one `.npz` token cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

HELD_OUT_PERCENT = 10
MAX_FILE_BYTES = 400_000
DEF_LINE = re.compile(r"^(\s*)(async\s+)?def\s+\w+\(.*\).*:\s*(#.*)?$")
DOCSTRING_OPEN = re.compile(r'^\s*[rRbBuU]?("""|\'\'\')')
MIN_BODY_LINES = 3


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relpath: str) -> bool:
    """Deterministic file-level split: ~HELD_OUT_PERCENT% of paths, independent of machine."""
    digest = hashlib.sha256(relpath.encode()).hexdigest()
    return int(digest[:8], 16) % 100 < HELD_OUT_PERCENT


def code_files(root: Path | None = None) -> list[Path]:
    """All .py sources under root (default: the stdlib), site-packages excluded, sorted."""
    root = root or stdlib_root()
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if "site-packages" in rel or "__pycache__" in rel:
            continue
        if p.is_file() and 0 < p.stat().st_size <= MAX_FILE_BYTES:
            files.append(p)
    if not files:
        raise UserError(f"no Python sources found under {root}")
    return files


def split_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train, held_out) source files."""
    root = root or stdlib_root()
    train, held = [], []
    for p in code_files(root):
        (held if is_held_out(p.relative_to(root).as_posix()) else train).append(p)
    return train, held


def held_out_files(root: Path | None = None) -> list[Path]:
    """Files no drafter trained here has seen: draw evaluation / bench prompts from these."""
    return split_files(root)[1]


def find_mask_token(tokenizer: Any) -> int:
    """A reserved, never-trained vocabulary row (`<unusedN>`): the target's embedding and head
    already have it, so no row is added (an added row would be neither trained nor exported)."""
    vocab = tokenizer.get_vocab()
    unused = sorted(i for tok, i in vocab.items() if tok.startswith("<unused"))
    if not unused:
        raise UserError("the tokenizer has no <unusedN> token; pass --mask-token-id")
    return unused[0]


def function_body_starts(lines: Sequence[str]) -> list[int]:
    """Indices of the lines where a function body starts (after the `def` line and its
    docstring), for functions with >= MIN_BODY_LINES body lines: where a code-completion
    prompt ends, as in the bench's code workload."""
    starts = []
    for i, line in enumerate(lines):
        if (m := DEF_LINE.match(line)) and (start := _body_start(lines, i, len(m.group(1)))):
            starts.append(start)
    return starts


def _body_start(lines: Sequence[str], i: int, indent: int) -> int | None:
    start = i + 1
    if start < len(lines) and (m := DOCSTRING_OPEN.match(lines[start])):
        quote, first = m.group(1), lines[start][m.end() :]
        end = start if quote in first else next(
            (j for j in range(start + 1, len(lines)) if quote in lines[j]), None)
        if end is None:
            return None
        start = end + 1
    body = 0
    for line in lines[start:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body += bool(line.strip())
    return start if body >= MIN_BODY_LINES else None


@dataclass
class TokenCache:
    """Prompts, the target's greedy continuations, which prompts are held out, and each
    prompt's kind (`training.kinds`; an old cache has excerpts and function bodies only)."""

    prompts: list[list[int]]
    held_out: list[bool]
    meta: dict[str, Any]
    continuations: list[list[int]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.kinds:
            self.kinds = ["excerpt"] * len(self.prompts)

    def indices(self, held_out: bool, kind: str | None = None) -> list[int]:
        rows = zip(self.held_out, self.kinds, strict=True)
        return [i for i, (h, k) in enumerate(rows)
                if h == held_out and (kind is None or k == kind)]

    def kind_names(self) -> list[str]:
        """The kinds present, in order of first appearance."""
        return list(dict.fromkeys(self.kinds))

    def has_continuations(self, gen_tokens: int) -> bool:
        return bool(self.continuations) and self.meta.get("gen_tokens") == gen_tokens

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (in this order), continuations included."""
        self.prompts = [self.prompts[i] for i in rows]
        self.held_out = [self.held_out[i] for i in rows]
        self.kinds = [self.kinds[i] for i in rows]
        if self.continuations:
            self.continuations = [self.continuations[i] for i in rows]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"held_out": np.asarray(self.held_out, dtype=bool),
                  "kinds": np.asarray(self.kinds, dtype=str)}
        arrays.update(_pack("prompts", self.prompts))
        if self.continuations:
            arrays.update(_pack("continuations", self.continuations))
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, meta=np.asarray(json.dumps(self.meta)), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> TokenCache:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"token cache {path} does not exist")
        try:
            with np.load(path) as z:
                meta = json.loads(str(z["meta"]))
                prompts = _unpack(z, "prompts")
                conts = _unpack(z, "continuations") if "continuations_flat" in z else []
                held = z["held_out"].tolist()
                kinds = (z["kinds"].tolist() if "kinds" in z else
                         [("function_body" if body else "excerpt")
                          for body in z["at_function_body"].tolist()]
                         if "at_function_body" in z else [])
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot read token cache {path}: {exc}") from None
        return cls(prompts, held, meta, conts, kinds)


def _pack(name: str, rows: list[list[int]]) -> dict[str, np.ndarray]:
    lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(lengths.sum()))
    return {f"{name}_flat": flat, f"{name}_lengths": lengths}


def _unpack(z: Any, name: str) -> list[list[int]]:
    flat, lengths = z[f"{name}_flat"], z[f"{name}_lengths"]
    if len(lengths) == 0:
        return []
    return [part.tolist() for part in np.split(flat, np.cumsum(lengths)[:-1])]


def fill_continuations(
    cache: TokenCache,
    generate: Callable[[list[list[int]], int, float | None], list[list[int] | None]],
    gen_tokens: int,
    time_limit: float | None = None,
) -> int:
    """Pair every prompt with the target's greedy continuation; returns how many were dropped.

    `generate(prompts, n, deadline)` gives None for prompts it had no time for. Held-out
    prompts go first and always complete; training prompts run until `time_limit` seconds
    after the start, and those left without a continuation are dropped from the cache, so a
    GPU lease bounds generation instead of cutting the whole run short.
    """
    deadline = None if time_limit is None else time.monotonic() + time_limit
    held, train = cache.indices(held_out=True), cache.indices(held_out=False)
    conts = dict(zip(held, generate([cache.prompts[i] for i in held], gen_tokens, None),
                     strict=True))
    conts.update(zip(train, generate([cache.prompts[i] for i in train], gen_tokens, deadline),
                     strict=True))
    keep = [i for i in range(len(cache.prompts)) if conts[i] is not None]
    cache.continuations = [conts[i] for i in range(len(cache.prompts))]
    cache.keep(keep)
    cache.meta["gen_tokens"] = gen_tokens
    dropped = len(conts) - len(keep)
    cache.meta["dropped_without_continuation"] = dropped
    return dropped
