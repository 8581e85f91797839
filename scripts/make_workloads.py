"""Generate the bench's bundled workloads (mlx_engine/workloads/*.jsonl) — run once, commit.

Every prompt comes from stdlib files that `mlx_engine.training.data.is_held_out` keeps out of
drafter training, so the bench never measures a drafter on its own training text.

- code: a file's text up to the start of a function body (after the `def` line and its
  docstring), 200-1500 chars, one function per file.
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
from mlx_engine.training.data import function_body_starts, held_out_files, stdlib_root
from mlx_engine.workloads import Prompt

SEED = 20250501
CODE_N, CODE_CHARS = 40, (200, 1500)
NATURAL_N, NATURAL_CAP, NATURAL_CHARS = 24, 40, 900
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
        guards = [i for i, line in enumerate(lines) if line.startswith("if __name__")]
        if not guards:
            continue
        for cut in (guards[-1] + 1, guards[-1]):
            text = _tail("".join(lines[:cut]), NATURAL_CHARS)
            out.append(Prompt(f"natural-{len(out):02d}", text, f"{_relpath(path)}:{cut + 1}"))
    return out


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


def niah_prompts(files: list[Path], rng: random.Random, n: int = 12) -> list[Prompt]:
    from tokenizers import Tokenizer

    from mlx_engine.convert_gguf import default_verifier_dir

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
