"""Prompt kinds and the mixing recipe: each kind cuts what its use looks like (torch-free)."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from mlx_engine.errors import UserError
from mlx_engine.training.data import split_files
from mlx_engine.training.kinds import GEMMA_TURNS, KINDS, Source, sample_prompts
from mlx_engine.training.mix import build_prompt_cache, parse_mix, split_counts

MODULE = '''"""A module of helpers.

It holds a few functions. Each one is small, and each one is documented at length so
that the prose kind has sentences to cut at: this is the second sentence. And a third.
"""
import os
from pathlib import Path


def add_numbers(a, b):
    """Return the sum of two numbers given as arguments."""
    total = int(a) + int(b) + sum((0, 0, 0, 0, 0, 0))
    if total > 100:
        total = total - 100
    return total


def _private(x):
    """Not a public helper, so never a chat request."""
    return x
'''


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / f"m{k}.py" for k in range(3)]
    for p in paths:
        p.write_text(MODULE)
    return paths


def chars(texts: list[str]) -> list[list[int]]:
    return [[ord(c) for c in t] for t in texts]


def text(ids: list[int]) -> str:
    return "".join(map(chr, ids[1:]))


def test_chat_prompts_are_requests_in_gemma_turns_from_public_docstrings(files):
    prompts = sample_prompts(KINDS["chat"], files, chars, 12, random.Random(0), 1)
    head, tail = GEMMA_TURNS.split("{}")
    for p in prompts:
        request = text(p)
        assert request.startswith(head) and request.endswith(tail)
        assert "`add_numbers`" in request and "Return the sum of two numbers" in request
        assert "_private" not in request
    assert len({text(p) for p in prompts}) > 1  # several request templates


def test_short_prompts_end_inside_a_line_after_a_cut_mark(files):
    kind = replace(KINDS["short"], lengths=(30,))
    for p in sample_prompts(kind, files, chars, 10, random.Random(1), 1):
        assert len(p) == 30
        last = text(p).rsplit("\n", 1)[-1]
        assert last.endswith(("= ", "return ", "(")) and last.strip()


def test_prose_prompts_are_docstring_text_up_to_a_sentence_end(files):
    kind = replace(KINDS["prose"], lengths=(40,))
    for p in sample_prompts(kind, files, chars, 10, random.Random(2), 1):
        assert len(p) == 40 and text(p)[-1] in ".:"
        assert text(p) in MODULE.replace('"""', "")


HEADERS = ('def add_numbers(a, b):\n    """Return the sum of two numbers given as arguments."""\n',
           'def _private(x):\n    """Not a public helper, so never a chat request."""\n')


def test_snippets_are_small_modules_that_end_at_a_documented_functions_body(files):
    snippets = [text(p) for p in sample_prompts(KINDS["snippet"], files, chars, 30,
                                                random.Random(3), 1)]
    for s in snippets:
        blocks = s.split("\n\n\n")
        assert blocks[0] in ("import os", "import os\nfrom pathlib import Path")
        header = next(h for h in HEADERS if s.endswith(h))
        assert len(blocks) in (2, 3) and blocks[-1] == header
        if len(blocks) == 3:  # a whole definition that stands before the function
            assert header == HEADERS[1] and blocks[1].startswith("def add_numbers")
            assert blocks[1].endswith("return total")
    assert {len(s.split("\n\n\n")) for s in snippets} == {2, 3}
    assert KINDS["snippet"].max_tokens == 128 and not KINDS["snippet"].stop  # the README's


GUARDED = MODULE + '''

if __name__ == "__main__":
    print(add_numbers(1, 2))
'''


def test_tails_are_answered_by_the_end_of_their_file(tmp_path: Path):
    """After a module's `__main__` guard line, or where a function that closes the file
    starts its body: nothing but the answer follows in the file."""
    closing, guarded, method = (tmp_path / f"{n}.py" for n in ("closing", "guarded", "method"))
    body = "    y = x\n    y += 1\n    return y\n"  # long enough to be a body start
    closing.write_text(MODULE.replace("    return x\n", body))
    guarded.write_text(GUARDED)
    last = "        y = self.x\n        # a comment\n        y += 1\n        return y\n"
    first = body.replace("    ", "        ")  # a method's body, not the file's last
    method.write_text(f"class C:\n    def a(self):\n{first}\n    def b(self):\n{last}")
    ends = {}
    for path in (closing, guarded, method):
        lines = path.read_text().splitlines(True)
        for cut in Source(path).tail_cuts:
            ends["".join(lines[cut:])] = path.name
    assert ends == {body: "closing.py", "    print(add_numbers(1, 2))\n": "guarded.py",
                    last: "method.py"}
    prompts = [text(p) for p in sample_prompts(KINDS["tail"], [closing, guarded], chars, 20,
                                               random.Random(0), 1)]
    assert {p.endswith('"""Not a public helper, so never a chat request."""\n')
            or p.endswith('if __name__ == "__main__":\n') for p in prompts} == {True}
    assert len(set(prompts)) > 2  # cut to several lengths


def test_a_file_that_goes_on_after_its_last_function_has_no_closing_tail(files):
    assert Source(files[0]).tail_cuts == []  # `_private` is too short to be a body start
    assert "tail" in parse_mix("tail=1")


def test_every_kind_has_a_place_in_the_evaluations_seed_order():
    from mlx_engine.eval_drafter import DEFAULT_KINDS, README_KIND, SEED_ORDER

    assert sorted(SEED_ORDER) == sorted([*KINDS, README_KIND])
    assert set(DEFAULT_KINDS) <= set(SEED_ORDER)


class CharTokenizer:
    """Just what the mixing recipe asks of a tokenizer: one id per character."""

    bos_token_id, eos_token_id, unk_token_id = 1, 2, None

    def __call__(self, texts: list[str], add_special_tokens: bool) -> dict:
        return {"input_ids": chars(texts)}

    def __len__(self) -> int:
        return 0x110000

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[None]:
        return [None for _ in tokens]


def test_snippets_for_training_come_from_train_files_only(tmp_path: Path):
    for k in range(60):  # each file's functions are named after it
        (tmp_path / f"m{k}.py").write_text(
            MODULE.replace("add_numbers", f"add_{k}_").replace("_private", f"_private_{k}_"))
    train, held = split_files(tmp_path)
    assert train and held
    cache = build_prompt_cache(CharTokenizer(), 40, 10, 32, 64, seed=0,
                               mix=parse_mix("snippet=1"), mask_token_id=3, root=tmp_path)
    for files, held_out in ((train, False), (held, True)):
        allowed = {int(f.stem[1:]) for f in files}
        for i in cache.indices(held_out):
            named = {int(n) for n in re.findall(r"def _?\w+?_(\d+)_\(", text(cache.prompts[i]))}
            assert named and named <= allowed


def test_long_prompts_that_no_file_can_fill_are_one_error(files):
    with pytest.raises(UserError, match="could not cut 2 long prompts"):
        sample_prompts(KINDS["long"], files, chars, 2, random.Random(0), 1)


def test_the_mix_is_normalised_and_shared_out_exactly():
    mix = parse_mix("function_body=3,chat=1,prose=0")
    assert mix == {"function_body": 0.75, "chat": 0.25}
    assert split_counts(10, mix) == {"function_body": 8, "chat": 2}
    assert sum(split_counts(7, parse_mix("excerpt=1,long=1,short=1")).values()) == 7
    for bad in ("poetry=1", "chat=x", "chat=-1", "chat=0"):
        with pytest.raises(UserError):
            parse_mix(bad)


def test_a_source_finds_each_kinds_spots(files):
    src = Source(files[0])
    assert src.body_starts and src.short_spots
    assert [(k, n) for k, n, _ in src.docstrings] == [
        ("module", ""), ("function", "add_numbers"), ("function", "_private")]
