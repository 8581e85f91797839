"""Verifiers with recurrent layers (Qwen 3.5's gated-delta linear attention), loaded through
mlx-lm's multimodal wrapper as the real checkpoints are: rolled back by running the layer
again, exact through the engine and its prompt cache. The loops' own checks for the hybrids
are in `test_lossless.py` (`qwen3_5`, `qwen3_5_moe`, `qwen3_next`)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import speculative_generate_step
from tiny import (
    drafter_config,
    load_script,
    make_target,
    prompt_tokens,
    save_model_dir,
    save_random_drafter,
)

from mlx_engine.engine import Engine, RunOptions
from mlx_engine.errors import UserError
from mlx_engine.prompt_cache import PromptCache
from mlx_engine.verifier import RecurrentCache, Verifier

OPTS = RunOptions(max_tokens=32, ignore_eos=True, block_size=8)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("hybrid")
    model = save_model_dir(root / "model", "qwen3_5")
    draft = save_random_drafter(root / "draft", drafter_config(6, block_size=8))
    return Engine.load(str(model), str(draft))


def test_the_hybrid_layout_keeps_a_recurrent_state_beside_kv_rows(engine):
    kinds = [type(c).__name__ for c in engine.verifier.make_cache()]
    assert kinds == ["RecurrentCache", "RecurrentCache", "KVCache"] * 2
    assert engine.verifier.recurrent


def test_a_state_drops_rows_of_its_latest_forward_only():
    verifier = Verifier(make_target("qwen3_5"))
    cache = verifier.make_cache()
    state = cache[0]
    verifier.forward(mx.array([[3, 4, 5, 6]]), cache)
    verifier.forward(mx.array([[7, 8, 9]]), cache)
    assert state.offset == 7 and state.can_trim(3) and not state.can_trim(4)
    with pytest.raises(ValueError, match="latest forward"):
        state.trim(4)
    verifier.trim(cache, 2)
    assert state.offset == 5 and not state.can_trim(1)  # one rollback per forward
    # what is left is the state of [3, 4, 5, 6, 7]: the next logits equal a cold forward's
    got = verifier.forward(mx.array([[10]]), cache).logits[0, -1]
    want = verifier.forward(mx.array([[3, 4, 5, 6, 7, 10]]), verifier.make_cache()).logits[0, -1]
    assert mx.allclose(got, want, atol=1e-4)


def test_a_rollback_after_a_verify_reads_no_weights(monkeypatch):
    """The kept rows' linear outputs come from the verify itself; a forward longer than a
    verify (a prefill chunk) keeps none, and its rollback computes them again, still exact."""
    verifier = Verifier(make_target("qwen3_5"))
    calls: list[int] = []
    linear = nn.Linear.__call__

    def counted(self, x):
        calls.append(1)
        return linear(self, x)

    monkeypatch.setattr(nn.Linear, "__call__", counted)
    for rows, verify in ((17, True), (100, False)):  # a 16-draft verify; a prefill's chunk
        cache, ids = verifier.make_cache(), prompt_tokens(rows, seed=rows)
        verifier.forward(mx.array([ids]), cache)
        calls.clear()
        verifier.trim(cache, 3)
        assert (calls == []) == verify
        got = verifier.forward(mx.array([[5]]), cache).logits[0, -1]
        cold = verifier.forward(mx.array([[*ids[:-3], 5]]), verifier.make_cache()).logits[0, -1]
        assert mx.allclose(got, cold, atol=1e-4)


def test_fused_runs_equal_ar_through_the_engine(engine):
    prompt = prompt_tokens(40, seed=3)
    ar = engine.run("ar", prompt, OPTS).tokens
    assert len(set(ar)) > 5
    for width in (2, 8, None):  # None: the width policy, AR steps included
        assert engine.run("fused", prompt, RunOptions(32, ignore_eos=True, block_size=width)
                          ).tokens == ar


@pytest.mark.parametrize("mode", ["fused", "ar"])
def test_the_prompt_cache_reuses_whole_rows_or_the_previous_prompt(engine, mode):
    """A recurrent state cannot be cut back to any prefix: the next turn reuses every row when
    it starts with all of them, else the previous prompt's rows (the states were marked at its
    end), else nothing; all exact."""
    cache = PromptCache()

    def turn(prompt: list[int]) -> tuple[list[int], int]:
        out = list(engine.generate(prompt, options=OPTS, mode=mode, prompt_cache=cache))
        tokens = [t for r in out for t in r.tokens]
        assert tokens == engine.run("ar", prompt, OPTS).tokens
        return tokens, out[-1].stats.cached_tokens

    prompt = prompt_tokens(40, seed=5)
    first, cached = turn(prompt)
    assert cached == 0
    second = prompt + first + prompt_tokens(6, seed=6)
    answer, cached = turn(second)
    assert cached >= len(prompt) + len(first) - 1
    rerendered = second + prompt_tokens(len(answer), seed=9) + prompt_tokens(6, seed=7)
    _, cached = turn(rerendered)
    assert cached == len(second)
    _, cached = turn(second[:20] + prompt_tokens(10, seed=8))
    assert cached == 0


def test_a_family_whose_rollback_is_wrong_is_refused(monkeypatch):
    verifier = Verifier(make_target("qwen3_5"))
    verifier.check_adapter()
    monkeypatch.setattr(RecurrentCache, "trim", lambda self, n: n)  # keeps the dropped rows
    with pytest.raises(UserError, match="rolling back"):
        verifier.check_adapter()


def test_mlx_lm_speculative_decoding_refuses_a_hybrid_model():
    """What users have without this engine: mlx-lm cannot trim the recurrent state."""
    model = make_target("qwen3_5")
    with pytest.raises(ValueError, match="trimmable"):
        next(speculative_generate_step(mx.array(prompt_tokens(20)), model,
                                       make_target("qwen3_5", seed=5), num_draft_tokens=4))


def test_the_rollback_cost_script_times_every_kept_count(capsys):
    load_script("rollback_cost.py").main(["--shape", "tiny", "--width", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiny shape, float32") and lines[1].startswith("AR step")
    kept = [int(line.split("keep")[1].split(":")[0]) for line in lines[2:]]
    assert kept == [4, 3, 2, 1] and all(line.endswith("AR steps") for line in lines[2:])
