"""Prompt kinds: what use looks like, cut from offline text (the stdlib's sources and docstrings).

A drafter trained on one prompt shape narrows to it (high tau on that shape, far lower on
anything else), so training mixes several kinds, each cut the way its use looks: code
completion at a function body, long prompts past the verifier's 512-token sliding window,
chat requests in Gemma's turn format, prose (docstrings), short inline completions, small
modules that end at a documented function's body (the README example's shape), file tails
whose answer ends the file (the verifier's EOS included), and plain excerpts. The same
cutters serve training (train files) and evaluation (held-out files), so a kind's held-out
prompts are the training prompts' twins from files never trained on. A kind also says how
its use stops (stop strings besides EOS, an answer cap): the evaluation runs it that way.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import UserError
from .data import function_body_starts

LENGTH_STEP = 64  # code prompt lengths step by this: equal lengths batch without padding
CHARS_PER_TOKEN = 8  # generous: texts are cut to length after tokenizing
GEMMA_TURNS = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
SHORT_CUTS = ("= ", "return ", "(")
SENTENCE_END = re.compile(r"[.:]\s")
NOT_PROSE = re.compile(r"^\s*(>>>|\$|[-=]{3,})", re.M)  # doctests, shell lines, rules
SNIPPET_IMPORTS = 4  # at most this many of a module's import lines open a snippet
SNIPPET_DEF_LINES = 25  # the longest definition that may stand before the function
SNIPPET_HEADER_LINES = 20  # the longest `def` line + docstring
SNIPPET_BODY_LINES = 12  # the longest body: the answer is a short, complete function
CHAT_REQUESTS = (  # the first is the bench's chat workload's
    "Write a Python {kind} `{name}`. {summary}",
    "Write a Python {kind} named `{name}` that does this: {summary}",
    "In Python, how would you implement `{name}`? {summary}",
    "Explain what a Python {kind} called `{name}` should do, given: {summary}",
)


class Source:
    """One source file, parsed lazily: its lines and the spots each kind cuts at."""

    def __init__(self, path: Path):
        self.path = path

    @cached_property
    def lines(self) -> list[str]:
        return self.path.read_text(encoding="utf-8", errors="replace").splitlines(True)

    @cached_property
    def body_starts(self) -> list[int]:
        return function_body_starts(self.lines)

    @cached_property
    def short_spots(self) -> list[tuple[int, int]]:
        return [(i, col) for i, line in enumerate(self.lines)
                if (col := short_spot(line)) is not None]

    @cached_property
    def tail_cuts(self) -> list[int]:
        """Where the answer runs to the end of the file: after the line of its last `if
        __name__` guard, and where the body of a function (or method) that closes the file
        starts."""
        guard = last_guard(self.lines)
        closing = [i for i in self.body_starts[-1:] if runs_to_the_end(self.lines, i)]
        return ([] if guard is None else [guard + 1]) + closing

    @cached_property
    def docstrings(self) -> list[tuple[str, str, str]]:
        return docstrings("".join(self.lines))

    @cached_property
    def outline(self) -> Outline:
        return outline(self.lines)


@dataclass(frozen=True)
class Outline:
    """A module's top level, as much as a snippet needs: its one-line imports, its short
    definitions (line spans), and the `def` + docstring line spans of its documented
    functions whose body is short."""

    imports: tuple[str, ...] = ()
    definitions: tuple[tuple[int, int], ...] = ()
    headers: tuple[tuple[int, int], ...] = ()


def outline(lines: Sequence[str]) -> Outline:
    """The top level of a module's source lines (an empty outline if it does not parse)."""
    try:
        tree = ast.parse("".join(lines))
    except (SyntaxError, ValueError):
        return Outline()
    imports, definitions, headers = [], [], []
    for node in tree.body:
        end = node.end_lineno or node.lineno
        if isinstance(node, (ast.Import, ast.ImportFrom)) and end == node.lineno:
            imports.append(lines[node.lineno - 1])
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
        if end - start <= SNIPPET_DEF_LINES:
            definitions.append((start, end))
        doc_end = node.body[0].end_lineno or node.body[0].lineno
        if (not isinstance(node, ast.ClassDef) and ast.get_docstring(node) is not None
                and len(node.body) > 1 and doc_end - start <= SNIPPET_HEADER_LINES
                and end - doc_end <= SNIPPET_BODY_LINES):
            headers.append((start, doc_end))
    return Outline(tuple(imports), tuple(definitions), tuple(headers))


def docstrings(text: str) -> list[tuple[str, str, str]]:
    """(kind, name, docstring) of a module's own, classes' and functions', in file order."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    kinds = {ast.Module: "module", ast.ClassDef: "class"}
    return [(kinds.get(type(n), "function"), getattr(n, "name", ""), doc) for n in nodes
            if (doc := ast.get_docstring(n)) is not None]


def last_guard(lines: Sequence[str]) -> int | None:
    """The line of a module's last `if __name__` guard: most of what follows ends the file."""
    return next((i for i in reversed(range(len(lines)))
                 if lines[i].startswith("if __name__")), None)


def runs_to_the_end(lines: Sequence[str], start: int) -> bool:
    """The block whose first line is `start` ends with the file: no later line of code is
    indented less than its first."""
    code = [line for line in lines[start:] if line.strip() and not line.lstrip().startswith("#")]
    indents = [len(line) - len(line.lstrip()) for line in code]
    return bool(code) and min(indents) >= indents[0]


def short_spot(line: str) -> int | None:
    """Where to cut a line of code for an inline completion: after its first cut mark."""
    code = line.strip()
    if not 40 <= len(code) <= 100 or code.startswith(("#", '"', "'")):
        return None
    return next((line.index(c) + len(c) for c in SHORT_CUTS if c in line), None)


def chat_summary(kind: str, name: str, doc: str) -> str | None:
    """A public function's or class's one-sentence docstring summary, fit for a request."""
    summary = next(iter(doc.strip().splitlines()), "").strip()
    if (kind == "module" or name.startswith(("_", "test", "setUp", "tearDown"))
            or "Test" in name or not 20 <= len(summary) <= 120 or not summary.endswith(".")):
        return None
    return summary


def text_from(lines: Sequence[str], start: int, chars: int) -> str:
    """Whole lines from `start` until at least `chars` characters (or the end)."""
    end, n = start, 0
    while end < len(lines) and n < chars:
        n += len(lines[end])
        end += 1
    return "".join(lines[start:end])


def text_before(lines: Sequence[str], end: int, chars: int) -> str:
    """Whole lines before `end`, going back until at least `chars` characters (or the start)."""
    start, n = end, 0
    while start > 0 and n < chars:
        start -= 1
        n += len(lines[start])
    return "".join(lines[start:end])


# --- cutters: (source, rng, chars wanted) -> the prompt's text, or None if it has no spot ----
Cutter = Callable[[Source, random.Random, int], str | None]


def _excerpt(src: Source, rng: random.Random, chars: int) -> str | None:
    return text_from(src.lines, rng.randrange(len(src.lines)), chars) if src.lines else None


def _function_body(src: Source, rng: random.Random, chars: int) -> str | None:
    starts = src.body_starts
    return text_before(src.lines, rng.choice(starts), chars) if starts else None


def _tail(src: Source, rng: random.Random, chars: int) -> str | None:
    cuts = src.tail_cuts
    return text_before(src.lines, rng.choice(cuts), chars) if cuts else None


def _inline(src: Source, rng: random.Random, chars: int) -> str | None:
    if not src.short_spots:
        return None
    i, col = rng.choice(src.short_spots)
    return text_before(src.lines, i, chars) + src.lines[i][:col]


def _prose(src: Source, rng: random.Random, chars: int) -> str | None:
    """A docstring's text up to one of its sentence ends (no doctest or shell lines)."""
    docs = [d for _, _, d in src.docstrings if len(d) >= chars // 2]
    if not docs:
        return None
    doc = rng.choice(docs)
    ends = [m.end() for m in SENTENCE_END.finditer(doc) if m.end() >= chars // 2]
    if not ends:
        return None
    text = doc[: rng.choice(ends)].rstrip()
    return None if NOT_PROSE.search(text) else text


def _snippet(src: Source, rng: random.Random, chars: int) -> str | None:
    """A small module like the README's example: the first few of the file's imports,
    perhaps one short definition that stands before the function in the file, then a
    documented top-level function's `def` line and docstring; the answer is its body."""
    parts = src.outline
    if not parts.headers:
        return None
    start, end = rng.choice(parts.headers)
    blocks = []
    if parts.imports:
        blocks.append("".join(parts.imports[: rng.randint(1, SNIPPET_IMPORTS)]))
    before = [span for span in parts.definitions if span[1] <= start]
    if before and rng.random() < 0.5:
        first, last = rng.choice(before)
        blocks.append("".join(src.lines[first:last]))
    blocks.append("".join(src.lines[start:end]))
    return "\n\n\n".join(b.rstrip("\n") for b in blocks) + "\n"


def _chat(src: Source, rng: random.Random, chars: int) -> str | None:
    picks = [(kind, name, s) for kind, name, doc in src.docstrings
             if (s := chat_summary(kind, name, doc)) is not None]
    if not picks:
        return None
    kind, name, summary = rng.choice(picks)
    return rng.choice(CHAT_REQUESTS).format(kind=kind, name=name, summary=summary)


@dataclass(frozen=True)
class Kind:
    """A prompt kind: how it is cut, to which token lengths, and how its use stops.

    `lengths` () keeps each prompt's natural length (a chat request); otherwise prompts are
    cut to one of them (BOS included), at their start when `keep_end` (the end is the point:
    a body, a cut line) else at their end. `template` wraps the text (chat turns)."""

    name: str
    cut: Cutter
    lengths: tuple[int, ...]
    keep_end: bool = True
    template: str = "{}"
    stop: tuple[str, ...] = ()
    max_tokens: int = 96


def code_lengths(min_tokens: int, max_tokens: int) -> tuple[int, ...]:
    return tuple(range(min_tokens, max_tokens + 1, LENGTH_STEP))


CODE_LENGTHS = code_lengths(64, 512)
KINDS = {k.name: k for k in (
    Kind("excerpt", _excerpt, CODE_LENGTHS, keep_end=False),
    Kind("function_body", _function_body, CODE_LENGTHS, stop=HUMANEVAL_STOPS),
    Kind("long", _function_body, (1024, 1536, 2048, 3072, 4096), stop=HUMANEVAL_STOPS,
         max_tokens=64),
    Kind("chat", _chat, (), template=GEMMA_TURNS),
    Kind("prose", _prose, (32, 64, 96, 128)),
    Kind("short", _inline, (64, 128, 256), stop=("\n",), max_tokens=32),
    Kind("snippet", _snippet, (), max_tokens=128),
    Kind("tail", _tail, CODE_LENGTHS, max_tokens=64),
)}


def sample_prompts(
    kind: Kind,
    files: Sequence[Path],
    encode_batch: Callable[[list[str]], list[list[int]]],
    n: int,
    rng: random.Random,
    bos_id: int | None,
    sources: dict[Path, Source] | None = None,
) -> list[list[int]]:
    """n prompts of `kind` from random spots of random files: BOS + the kind's text, cut to a
    length drawn from `kind.lengths` (BOS included) so that equal lengths batch without
    padding; spots too short for the drawn length are drawn again."""
    sources = {} if sources is None else sources
    prefix = [bos_id] if bos_id is not None else []
    prompts: list[list[int]] = []
    attempts = 0
    while len(prompts) < n:
        attempts += 1
        if attempts > 20 * n + 100:
            raise UserError(f"could not cut {n} {kind.name} prompts from the corpus")
        want = [(rng.choice(files), rng.choice(kind.lengths) if kind.lengths else 0)
                for _ in range(min(n - len(prompts), 256))]
        texts = []
        for path, length in want:
            src = sources.setdefault(path, Source(path))
            text = kind.cut(src, rng, CHARS_PER_TOKEN * length)
            texts.append("" if text is None else kind.template.format(text))
        for (_, length), text, ids in zip(want, texts, encode_batch(texts), strict=True):
            body = length - len(prefix)
            if not text or len(ids) < body:
                continue
            if length:
                ids = ids[-body:] if kind.keep_end else ids[:body]
            prompts.append(prefix + ids)
    return prompts[:n]
