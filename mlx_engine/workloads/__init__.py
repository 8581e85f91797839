"""Bundled bench workloads: JSON-lines prompt files shipped in the package.

They are generated once by `scripts/make_workloads.py` and committed, so a bench run never
depends on the local Python's stdlib. One JSON object per line:
`{"id", "text", "source", "ignore_eos", "needle", "messages", "stop"}` — `needle` is the
value a NIAH prompt must retrieve (null elsewhere), `ignore_eos` forces decoding to
--max-tokens, `messages` is a chat prompt's conversation, rendered by the tokenizer's chat
template where it has one (`text` is then the same conversation in Gemma's turn format, for a
tokenizer without), and `stop` lists stop strings (a code-completion client's).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

DIR = Path(__file__).parent
NAMES = ("code", "code-natural", "short", "prose", "chat", "natural", "niah", "overgen")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    source: str
    ignore_eos: bool = False
    needle: str | None = None
    messages: list[dict[str, str]] | None = None
    stop: list[str] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def path_of(workload: str) -> Path:
    """A bundled workload's file, or `workload` itself when it names a .jsonl file."""
    if workload in NAMES:
        return DIR / f"{workload}.jsonl"
    path = Path(workload).expanduser()
    if path.suffix != ".jsonl":
        raise UserError(f"--workload must be one of {', '.join(NAMES)} or a .jsonl file, "
                        f"not {workload!r}")
    return path


def load(workload: str) -> list[Prompt]:
    path = path_of(workload)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read workload {path}: {exc}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompt = Prompt(**json.loads(line))
        except (ValueError, TypeError) as exc:
            raise UserError(f"{path}:{n}: not a workload record: {exc}") from None
        if not prompt.text.strip():
            raise UserError(f"{path}:{n}: empty prompt text")
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"workload {path} has no prompts")
    return prompts


def encode(engine, prompt: Prompt, chat_template: bool | None = False) -> list[int]:
    """A prompt's tokens: its conversation through the tokenizer's chat template where there
    is one, else its text (`chat_template` as `Engine.encode` takes it)."""
    use_messages = bool(prompt.messages) and engine.has_chat_template
    return engine.encode(prompt.messages if use_messages else prompt.text, chat_template)


def save(prompts: list[Prompt], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p.to_json() + "\n" for p in prompts), encoding="utf-8")
