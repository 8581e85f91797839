"""Generate the bench's bundled workloads (mlx_engine/workloads/*.jsonl) — run once, commit.

Every prompt comes from stdlib files that `mlx_engine.training.data.is_held_out` keeps out of
drafter training, so the bench never measures a drafter on its own training text.

- code: a file's text up to the start of a function body (after the `def` line and its
  docstring), 200-1500 chars, one function per file.
- code-natural: the same cut at a top-level function, stopped as code-completion clients stop
  a base model, at the end of the function (HumanEval's stop strings): a natural stop.
- short: a line of code cut after its first `= `, `return ` or `(`, stopped at the end of the
  line (inline completion): short answers.
- prose: the first part of a long docstring (English text, no code), cut at a sentence end.
- chat: "Write a Python function `name` that <its docstring's first line>" as a user turn
  (`messages`; `text` renders it in Gemma 3's turn format, which the offline verifier's
  tokenizer has tokens for but no template: it is a base model, and answers loosely).
- natural: file tails cut at or just before the `if __name__ == "__main__":` guard; kept only
  if the offline verifier's greedy output (no chat template: a base model) ends with EOS
  within NATURAL_CAP tokens. Gemma 3 270M rarely ends a document otherwise.
- niah: held-out code concatenated to 1.1k-2.6k tokens (real Gemma tokenizer), a needle line
  `SECRET_KEY = "<word>-<word>-<n>"` at depths 10..90%, and a question at the end whose
  answer is the needle's value.
- overgen: the natural prompts, forced past their EOS (`ignore_eos`).

    python scripts/make_workloads.py [--only code,niah] [--out mlx_engine/workloads]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from mlx_engine import workloads
from mlx_engine.training.data import (
    DEF_LINE,
    function_body_starts,
    held_out_files,
    stdlib_root,
)
from mlx_engine.training.kinds import (
    CHAT_REQUESTS,
    GEMMA_TURNS,
    HUMANEVAL_STOPS,
    NOT_PROSE,
    SENTENCE_END,
    chat_summary,
    docstrings,
    last_guard,
    short_spot,
)
from mlx_engine.workloads import Prompt

SEED = 20250501
CODE_N, CODE_CHARS = 40, (200, 1500)
NATURAL_N, NATURAL_CAP, NATURAL_CHARS = 24, 40, 900
CODE_NATURAL_N = 24
SHORT_N = 24
PROSE_N, PROSE_CHARS = 24, (250, 700)
CHAT_N = 24
NIAH_TOKENS, NIAH_DEPTHS = (1100, 1600, 2100, 2600), (0.1, 0.3, 0.5, 0.7, 0.9)
NIAH_QUESTION = '\n\n# The secret key set above, checked:\nassert SECRET_KEY == "'
WORDS = ["amber", "falcon", "cobalt", "delta", "ember", "fjord", "granite", "harbor", "indigo",
         "juniper", "kestrel", "lantern", "meadow", "nectar", "onyx", "pepper", "quartz",
         "raven", "saffron", "thistle", "umber", "velvet", "willow", "yonder", "zephyr",
         "basalt", "cinder", "dune"]

def _relpath(path: Path) -> str:
    return path.relative_to(stdlib_root()).as_posix()


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines(True)


def _tail(text: str, max_chars: int) -> str:
    """The last <= max_chars of text, starting at a line boundary."""
    if len(text) <= max_chars:
        return text
    cut = text[-max_chars:]
    return cut[cut.find("\n") + 1 :]


def code_prompts(files: list[Path], rng: random.Random) -> list[Prompt]:
    prompts, endings = [], set()
    for path in files:
        lines = _lines(path)
        cuts = function_body_starts(lines)
        rng.shuffle(cuts)
        for cut in cuts:
            text = _tail("".join(lines[:cut]), CODE_CHARS[1])
            if len(text) >= CODE_CHARS[0] and text[-300:] not in endings:  # no boilerplate twins
                endings.add(text[-300:])
                prompts.append(Prompt(f"code-{len(prompts):02d}", text,
                                      f"{_relpath(path)}:{cut + 1}"))
                break
        if len(prompts) == CODE_N:
            break
    return prompts


def natural_candidates(files: list[Path]) -> list[Prompt]:
    """Tails ending right after, or right before, the file's `if __name__` guard."""
    out = []
    for path in files:
        lines = _lines(path)
        guard = last_guard(lines)
        if guard is None:
            continue
        for cut in (guard + 1, guard):
            text = _tail("".join(lines[:cut]), NATURAL_CHARS)
            out.append(Prompt(f"natural-{len(out):02d}", text, f"{_relpath(path)}:{cut + 1}"))
    return out


def code_natural_prompts(files: list[Path], taken: set[str]) -> list[Prompt]:
    """A top-level function per file, cut where its body starts, with HumanEval's stops."""
    prompts = []
    for path in files:
        lines = _lines(path)
        cuts = [c for c in function_body_starts(lines)
                if f"{_relpath(path)}:{c + 1}" not in taken and _top_level_def(lines, c)]
        if cuts:
            text = _tail("".join(lines[: cuts[0]]), CODE_CHARS[1])
            prompts.append(Prompt(f"code-natural-{len(prompts):02d}", text,
                                  f"{_relpath(path)}:{cuts[0] + 1}", stop=list(HUMANEVAL_STOPS)))
        if len(prompts) == CODE_NATURAL_N:
            break
    return prompts


def _top_level_def(lines: list[str], body_start: int) -> bool:
    """The function whose body starts at `body_start` is defined at column 0."""
    head = next(m for line in reversed(lines[:body_start]) if (m := DEF_LINE.match(line)))
    return head.group(1) == ""


def short_prompts(files: list[Path], rng: random.Random) -> list[Prompt]:
    """A line of code per file, cut after its first `= `, `return ` or `(`; stop at its end."""
    prompts = []
    for path in files:
        lines = _lines(path)
        spots = [(i, col) for i, line in enumerate(lines)
                 if (col := short_spot(line)) is not None]
        if spots:
            i, col = rng.choice(spots)
            text = _tail("".join(lines[:i]), NATURAL_CHARS) + lines[i][:col]
            prompts.append(Prompt(f"short-{len(prompts):02d}", text, f"{_relpath(path)}:{i + 1}",
                                  stop=["\n"]))
        if len(prompts) == SHORT_N:
            break
    return prompts


def natural_prompts(candidates: list[Prompt]) -> list[Prompt]:
    """Candidates whose greedy output from the offline verifier ends with EOS."""
    from tqdm import tqdm

    from mlx_engine.engine import Engine, RunOptions

    random.Random(SEED).shuffle(candidates)  # a mix of files and of both cut points
    engine = Engine.load("default", None)
    kept = []
    bar = tqdm(candidates, desc="natural: checking EOS", file=sys.stderr)
    for p in bar:
        result = engine.run("ar", engine.encode(p.text, False), RunOptions(NATURAL_CAP))
        if result.stats.finish_reason == "stop":
            kept.append(Prompt(f"natural-{len(kept):02d}", p.text, p.source))
            bar.set_postfix(kept=len(kept))
            if len(kept) == NATURAL_N:
                break
    return kept


def prose_prompts(files: list[Path]) -> list[Prompt]:
    """The first sentences of the longest docstring of each file, as plain text."""
    prompts = []
    for path in files:
        docs = [d for _, _, d in docstrings("".join(_lines(path)))
                if len(d) >= 2 * PROSE_CHARS[0]]
        if not docs:
            continue
        doc = max(docs, key=len)
        ends = [m.end() for m in SENTENCE_END.finditer(doc)
                if PROSE_CHARS[0] <= m.end() <= PROSE_CHARS[1]]
        if ends and not NOT_PROSE.search(doc[: ends[-1]]):
            prompts.append(Prompt(f"prose-{len(prompts):02d}", doc[: ends[-1]].rstrip(),
                                  f"{_relpath(path)}:docstring"))
        if len(prompts) == PROSE_N:
            break
    return prompts


def chat_prompts(files: list[Path]) -> list[Prompt]:
    """A request per file built from a public function's or class's docstring summary."""
    prompts = []
    for path in files:
        for kind, name, doc in docstrings("".join(_lines(path))):
            if (summary := chat_summary(kind, name, doc)) is None:
                continue
            request = CHAT_REQUESTS[0].format(kind=kind, name=name, summary=summary)
            messages = [{"role": "user", "content": request}]
            prompts.append(Prompt(f"chat-{len(prompts):02d}", GEMMA_TURNS.format(request),
                                  f"{_relpath(path)}:{name}", messages=messages))
            break
        if len(prompts) == CHAT_N:
            break
    return prompts


def niah_prompts(files: list[Path], rng: random.Random, n: int = 12) -> list[Prompt]:
    from tokenizers import Tokenizer

    from mlx_engine.gguf.convert import default_verifier_dir

    tokenizer = Tokenizer.from_file(str(default_verifier_dir() / "tokenizer.json"))
    prompts = []
    for k in range(n):
        target = NIAH_TOKENS[k % len(NIAH_TOKENS)]
        depth = NIAH_DEPTHS[k % len(NIAH_DEPTHS)]
        pool = rng.sample(files, len(files))
        parts, used, count = [], [], 0
        while count < target:
            path = pool.pop()
            text = "".join(_lines(path))[:6000]
            parts.append(f"# ---- {_relpath(path)} ----\n{text.rstrip()}\n\n")
            used.append(_relpath(path))
            count = len(tokenizer.encode("".join(parts)).ids)
        lines = "".join(parts).splitlines(True)
        lines = lines[: _fit(lines, tokenizer, target)]
        at = int(len(lines) * depth)
        while at < len(lines) and (not lines[at].strip() or lines[at][0] in " \t#)]}"):
            at += 1  # a top-level statement boundary, so the needle reads as real code
        needle = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randrange(10, 100)}"
        text = ("".join(lines[:at]) + f'SECRET_KEY = "{needle}"\n' + "".join(lines[at:])
                + NIAH_QUESTION)
        prompts.append(Prompt(f"niah-{k:02d}", text, ",".join(used), needle=needle))
    return prompts


def _fit(lines: list[str], tokenizer, target: int) -> int:
    """Fewest leading lines holding >= target tokens (binary search)."""
    lo, hi = 1, len(lines)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.encode("".join(lines[:mid])).ids) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(workloads.NAMES))
    p.add_argument("--out", type=Path, default=workloads.DIR)
    args = p.parse_args()
    only = args.only.split(",")
    files = held_out_files()
    made: dict[str, list[Prompt]] = {}
    if "code" in only:
        made["code"] = code_prompts(random.Random(SEED).sample(files, len(files)),
                                    random.Random(SEED))
    if "niah" in only:
        made["niah"] = niah_prompts(files, random.Random(SEED + 1))
    if "code-natural" in only:
        taken = {p.source for p in workloads.load("code")}
        made["code-natural"] = code_natural_prompts(
            random.Random(SEED + 5).sample(files, len(files)), taken)
    if "short" in only:
        made["short"] = short_prompts(random.Random(SEED + 2).sample(files, len(files)),
                                      random.Random(SEED + 2))
    if "prose" in only:
        made["prose"] = prose_prompts(random.Random(SEED + 3).sample(files, len(files)))
    if "chat" in only:
        made["chat"] = chat_prompts(random.Random(SEED + 4).sample(files, len(files)))
    if "natural" in only or "overgen" in only:
        natural = natural_prompts(natural_candidates(files))
        made["natural"] = natural
        made["overgen"] = [Prompt(f"overgen-{i:02d}", q.text, q.source, ignore_eos=True)
                           for i, q in enumerate(natural)]
    for name, prompts in made.items():
        if name in only:
            workloads.save(prompts, args.out / f"{name}.jsonl")
            print(f"{name}: {len(prompts)} prompts -> {args.out / f'{name}.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
