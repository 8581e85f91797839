"""The other MLX DFlash runtimes as bench arms (`--peers dflash-mlx,zlab`).

Users choosing a DFlash runtime for MLX pick between ours, `dflash-mlx` and z-lab's `dflash`
(its MLX path), so the bench runs each peer's own decoding loop, unpatched, on the same
verifier dir and drafter dir as our arms. This module is glue only: how a peer is handed a
local model and drafter dir, the prompt ids, the token budget and the EOS ids; `how_called`
goes into the evidence. Stop strings end a peer's stream as they end mlx-lm's arm (no peer has
them). A peer that is not installed or refuses the pair becomes an unavailable arm with a
one-line reason, and a run that raises is recorded as failed: the bench goes on either way.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from . import evidence
from .engine import DTYPES, Engine, RunOptions, RunResult
from .errors import UserError
from .speculative import DecodeStats
from .stopping import StopStrings

INSTALL = {"dflash-mlx": "dflash-mlx==0.1.8", "zlab": "dflash==0.1.0"}
NAMES = tuple(INSTALL)


@dataclass
class PeerResult(RunResult):
    """A peer's tokens timed by the bench's clocks, its tau and what else it reports."""

    tau: float | None = None
    blocks: int | None = None  # verify forwards, to pool tau over prompts as ours is
    reported: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why the run produced no tokens


@dataclass
class Unavailable:
    """A peer that cannot run here: not installed, or it refused the pair at load."""

    name: str
    how_called: str
    why: str


def why(exc: BaseException) -> str:
    """One line: the exception, where it was raised (file:line) and its first message line."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {_import_path(frame.filename)}:{frame.lineno}" if frame is not None else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}{where}: {message}"


def _import_path(filename: str) -> str:
    """A module file as its package names it (`dflash_mlx/engine/target_ops.py`), relative to
    the deepest import root holding it: site-packages, Debian's dist-packages, a --target dir."""
    path = Path(filename).resolve()
    roots = [Path(p).resolve() for p in sys.path if p and Path(p).is_dir()]
    root = max((r for r in roots if path.is_relative_to(r)), key=lambda r: len(r.parts),
               default=None)
    return path.relative_to(root).as_posix() if root is not None else "/".join(path.parts[-2:])


class Peer(ABC):
    """A loaded peer. Subclasses stream their loop's new tokens, a list per yield, and put
    `tau`, `blocks` (its verify forwards) and anything else the peer reports into
    `reported` before each yield."""

    name = ""
    how_called = ""

    def __init__(self, engine: Engine):
        self.tokenizer = engine.tokenizer
        self.dtype = DTYPES[engine.model_info.dtype]

    @abstractmethod
    def stream(self, prompt: list[int], max_tokens: int, width: int | None, eos: list[int],
               reported: dict[str, Any]) -> Iterator[list[int]]: ...

    def run(self, prompt: list[int], opts: RunOptions) -> PeerResult:
        """Greedy, on the clocks of the mlx-lm arm: prefill until the first token, decode
        from it to the last. A fixed `--block-size` is handed on; `auto` leaves the peer at
        its default (the drafter's block)."""
        width = opts.block_size if isinstance(opts.block_size, int) else None
        eos = [] if opts.ignore_eos else sorted(self.tokenizer.eos_token_ids)
        stop = StopStrings(self.tokenizer, opts.stop)
        stats = DecodeStats(prompt_tokens=len(prompt))
        tokens: list[int] = []
        reported: dict[str, Any] = {}
        start = first = now = time.perf_counter()
        try:
            with contextlib.closing(self.stream(prompt, opts.max_tokens, width, eos,
                                                reported)) as chunks:
                for chunk in chunks:
                    if not chunk:  # z-lab's closing response carries no token
                        continue
                    now = time.perf_counter()
                    if not tokens:
                        stats.prefill_s, first = now - start, now
                    tokens += chunk
                    if (keep := stop.end(tokens, len(chunk))) is not None:
                        del tokens[keep:]
                        stats.finish_reason = "stop"
                        break
        except Exception as exc:  # a peer failing on one prompt must not end the bench
            return PeerResult([], stats, error=why(exc))
        stats.decode_s, stats.new_tokens = now - first, len(tokens)
        if tokens and tokens[-1] in eos:
            stats.finish_reason = "stop"
        return PeerResult(tokens, stats, tau=reported.pop("tau", None),
                          blocks=reported.pop("blocks", None), reported=reported)


class ZLab(Peer):
    """z-lab's `dflash` 0.1.0, MLX path (`dflash.model_mlx`)."""

    name = "zlab"
    how_called = (
        "dflash.model_mlx: model, _ = load(verifier_dir) (mlx_lm.load), set_dtype(verifier "
        "dtype); draft = load_draft(dir) with its snapshot_download returning a local view of "
        "the drafter dir (config.json + model*.safetensors: our draft_vocab.safetensors is no "
        "weight of its model); stream_generate(model, draft, tokenizer, prompt_ids, "
        "block_size=None (drafter's) or --block-size N, max_tokens) greedy, tokenizer with our "
        "EOS ids; tau = mean of its responses' `accepted` (tokens committed per block), pooled "
        "over prompts by block count")

    def __init__(self, engine: Engine):
        super().__init__(engine)
        from dflash import model_mlx

        self.lib = model_mlx
        self.model, _ = model_mlx.load(str(engine.model_info.path))
        self.model.set_dtype(self.dtype)
        with _weights_view(engine.drafter_info.path) as view, \
                mock.patch.object(model_mlx, "snapshot_download", lambda *_, **__: str(view)):
            self.draft = model_mlx.load_draft(str(view))

    def stream(self, prompt: list[int], max_tokens: int, width: int | None, eos: list[int],
               reported: dict[str, Any]) -> Iterator[list[int]]:
        tokenizer = copy.copy(self.tokenizer)
        tokenizer.eos_token_ids = eos
        accepted: list[int] = []
        for response in self.lib.stream_generate(self.model, self.draft, tokenizer, prompt,
                                                 block_size=width, max_tokens=max_tokens):
            if response.accepted is not None:
                accepted.append(response.accepted)
                reported.update(tau=statistics.mean(accepted), blocks=len(accepted))
            reported["generation_tps"] = response.generation_tps
            yield list(response.tokens)


class DFlashMLX(Peer):
    """`dflash-mlx` 0.1.8, called as its `dflash generate` CLI calls it (`run_generate`)."""

    name = "dflash-mlx"
    how_called = (
        "dflash_mlx: context = build_offline_runtime_context(); bundle = load_runtime_bundle("
        "model_ref=verifier_dir, draft_ref=drafter_dir, verify_config=context.verify); "
        "target set_dtype(verifier dtype); stream_dflash_generate(bundle's target/ops/"
        "tokenizer/draft/backend, prompt_tokens_override=prompt_ids, max_new_tokens, "
        "block_tokens=None (drafter's) or --block-size N, stop_token_ids=our EOS ids, "
        "runtime_context=context); tau = its tokens per cycle (generated_tokens / "
        "cycles_completed, SummaryEvent.tokens_per_cycle)")

    def __init__(self, engine: Engine):
        super().__init__(engine)
        from dflash_mlx.runtime.bundle import load_runtime_bundle
        from dflash_mlx.runtime.context import build_offline_runtime_context

        self.context = build_offline_runtime_context()
        self.bundle = load_runtime_bundle(model_ref=str(engine.model_info.path),
                                          draft_ref=str(engine.drafter_info.path),
                                          verify_config=self.context.verify)
        self.bundle.target_model.set_dtype(self.dtype)

    def stream(self, prompt: list[int], max_tokens: int, width: int | None, eos: list[int],
               reported: dict[str, Any]) -> Iterator[list[int]]:
        from dflash_mlx.engine.events import SummaryEvent, TokenEvent
        from dflash_mlx.runtime import stream_dflash_generate

        b = self.bundle
        events = stream_dflash_generate(
            target_model=b.target_model, target_ops=b.target_ops, tokenizer=b.tokenizer,
            draft_model=b.draft_model, draft_backend=b.draft_backend, prompt="",
            max_new_tokens=max_tokens, block_tokens=width, stop_token_ids=eos,
            prompt_tokens_override=prompt, runtime_context=self.context)
        with contextlib.closing(events):
            for event in events:
                if isinstance(event, TokenEvent):
                    if event.cycles_completed:
                        reported.update(tau=event.generated_tokens / event.cycles_completed,
                                        blocks=event.cycles_completed)
                    reported["acceptance_ratio"] = event.acceptance_ratio
                    yield [int(event.token_id)]
                elif isinstance(event, SummaryEvent):
                    reported.update(tau=event.tokens_per_cycle,
                                    acceptance_ratio=event.acceptance_ratio,
                                    fallback_ar=event.fallback_ar)


PEERS: dict[str, type[Peer]] = {"dflash-mlx": DFlashMLX, "zlab": ZLab}


@contextlib.contextmanager
def _weights_view(drafter: Path) -> Iterator[Path]:
    """A temporary dir of links to the drafter's config and model weights only."""
    with tempfile.TemporaryDirectory(prefix="kakeya-peer-draft-") as tmp:
        for path in [drafter / "config.json", *sorted(drafter.glob("model*.safetensors"))]:
            (Path(tmp) / path.name).symlink_to(path.resolve())
        yield Path(tmp)


def parse(spec: str | None) -> list[str]:
    """`dflash-mlx,zlab` -> the names, checked."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    if unknown := [n for n in names if n not in PEERS]:
        raise UserError(f"--peers: unknown peer {', '.join(unknown)}; known: {', '.join(NAMES)}")
    return list(dict.fromkeys(names))


def load(names: list[str], engine: Engine) -> list[Peer | Unavailable]:
    """Each named peer on the engine's verifier and drafter dirs, or why it cannot run."""
    loaded: list[Peer | Unavailable] = []
    for name in names:
        cls = PEERS[name]
        try:
            loaded.append(cls(engine))
        except ImportError as exc:
            loaded.append(Unavailable(name, cls.how_called, f"not installed ({why(exc)}); "
                                      f"pip install {INSTALL[name]!r} or '.[peers]'"))
        except Exception as exc:  # the peer refused this pair: record its own words
            loaded.append(Unavailable(name, cls.how_called, why(exc)))
    return loaded


def record(peer: Peer | Unavailable, run: PeerResult | None, ar: list[int]) -> dict[str, Any]:
    """One prompt's entry for a peer: its timing, tau and whether its tokens equal our AR's,
    or why it has none."""
    entry: dict[str, Any] = {"how_called": peer.how_called}
    if isinstance(peer, Unavailable):
        return entry | {"error": f"unavailable: {peer.why}"}
    if run is None or run.error is not None:
        return entry | {"error": run.error if run else "did not run"}
    return entry | {**evidence.timing(run), "tau": run.tau, "blocks": run.blocks,
                    "matches_ar": run.tokens == ar,
                    "first_divergence": evidence.first_divergence(ar, run.tokens),
                    "finish_reason": run.stats.finish_reason, "reported": run.reported}


def aggregate(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per peer: medians over the prompts it ran (speed ratios per prompt, as for our arms),
    how many of its outputs equal our AR's, how many runs raised, and the first error (or why
    it is unavailable) if some prompt has no tokens."""
    names = dict.fromkeys(n for s in samples for n in s.get("peers") or {})
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        entries = [(s, s["peers"][name]) for s in samples if name in (s.get("peers") or {})]
        ran = [(s, p) for s, p in entries if "error" not in p]
        timed = [(s, p) for s, p in ran if p["decode_tok_s"] > 0]
        errors = [p["error"] for _, p in entries if "error" in p]
        failed = [e for e in errors if not e.startswith("unavailable: ")]
        out[name] = {
            "how_called": entries[0][1]["how_called"],
            "ran": len(ran),
            "matches_ar": sum(p["matches_ar"] for _, p in ran),
            "decode_tok_s": evidence.median([p["decode_tok_s"] for _, p in ran]),
            "speedup_vs_ar": evidence.median([p["decode_tok_s"] / s["ar"]["decode_tok_s"]
                                              for s, p in timed if s["ar"]["decode_tok_s"] > 0]),
            "fused_vs_peer": evidence.median([s["fused"]["decode_tok_s"] / p["decode_tok_s"]
                                              for s, p in timed]),
            "tau": pooled_tau([p for _, p in ran]),
            "failed": len(failed),
            "error": errors[0] if errors else None,
        }
    return out


def pooled_tau(entries: list[dict[str, Any]]) -> float | None:
    """Tokens per verify forward over all prompts, counted as our arm's `mean_accept_len`."""
    return evidence.per_round([(p["tau"], p["blocks"]) for p in entries
                               if p["tau"] is not None and p.get("blocks")])


def summary(peers: dict[str, dict[str, Any]]) -> str:
    """The bench summary line's part for the peers."""
    def num(value: float | None, unit: str = "") -> str:
        return "n/a" if value is None else f"{value:.2f}{unit}"

    line = ""
    for name, a in peers.items():
        if not a["ran"]:
            line += f" | {name}: {a['error']}"
            continue
        failed = f", {a['failed']} failed" if a["failed"] else ""
        line += (f" | {name} {num(a['decode_tok_s'])} tok/s (fused "
                 f"{num(a['fused_vs_peer'], 'x')} it, tau {num(a['tau'])}, equal to AR "
                 f"{a['matches_ar']}/{a['ran']}{failed})")
    return line
