"""`Engine.generate`: responses, stop strings, and a prompt cache that stays lossless."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import mlx.core as mx
import pytest
from tiny import WINDOW, drafter_config, prompt_tokens, save_model_dir, save_random_drafter

from mlx_engine import engine as engine_module
from mlx_engine.engine import Engine, RunOptions
from mlx_engine.errors import UserError
from mlx_engine.policy import NeverShadows, WidthScript
from mlx_engine.prompt_cache import PromptCache
from mlx_engine.proposer import DFlashDraftSource

BLOCK = 8
PROMPT = prompt_tokens(3 * WINDOW, seed=21)  # past the tiny targets' sliding window
OPTS = RunOptions(max_tokens=40, ignore_eos=True, block_size=BLOCK)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("api")
    model = save_model_dir(root / "model")
    draft = save_random_drafter(root / "draft", drafter_config(6, block_size=BLOCK))
    return Engine.load(str(model), str(draft))


def _text(engine: Engine, tokens: list[int]) -> str:
    """What the streamed text should be: EOS ids are not shown (as mlx-lm does)."""
    return engine.tokenizer.decode([t for t in tokens if t not in engine.stop_ids(False)])


def _collect(responses) -> tuple[list[int], str, list]:
    responses = list(responses)
    tokens = [t for r in responses for t in r.tokens]
    return tokens, "".join(r.text for r in responses), responses


def test_responses_carry_tokens_text_and_final_stats(engine):
    tokens, text, responses = _collect(engine.generate(PROMPT, options=OPTS))
    assert tokens == engine.run("ar", PROMPT, OPTS).tokens
    assert len(tokens) == 40 and len(responses) > 1
    assert all(r.finish_reason is None and r.stats is None for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == "length" and last.stats.new_tokens == 40
    assert last.stats.rounds == last.stats.blocks + last.stats.ar_steps > 0
    assert last.stats.decode_tok_s > 0 and last.stats.prefill_tok_s > 0
    assert text == _text(engine, tokens)


class OracleSource(DFlashDraftSource):
    """Drafts the true continuation (known from an AR run), so every draft is accepted."""

    reference: ClassVar[list[int]] = []

    def propose(self, anchor, block_size, sampler, position):
        real = super().propose(anchor, block_size, sampler, position)
        g = self.context_len - len(PROMPT)
        truth = self.reference[g + 1 : g + block_size]
        return real * 0 + mx.array(truth, dtype=mx.int32)


def test_from_draft_counts_the_accepted_drafts(engine, monkeypatch):
    OracleSource.reference = engine.run("ar", PROMPT, RunOptions(60, ignore_eos=True)).tokens
    monkeypatch.setattr(engine_module, "DFlashDraftSource", OracleSource)
    tokens, _, responses = _collect(engine.generate(PROMPT, options=OPTS, mode="fused"))
    assert tokens == OracleSource.reference[:40]
    assert responses[0].from_draft == 0  # prefill's token is the verifier's
    # a full round: all but the bonus token; the last round, cut at max_tokens: all drafts
    assert [r.from_draft for r in responses[1:]] == [min(len(r.tokens), BLOCK - 1)
                                                     for r in responses[1:]]


def test_stop_string_ends_the_text_before_it(engine):
    full = engine.run("ar", PROMPT, OPTS)
    words = _text(engine, full.tokens).split()
    stop = f"{words[6]} {words[7][:2]}"  # spans two tokens: held back, then cut
    expected = _text(engine, full.tokens)
    expected = expected[: expected.index(stop)]
    for mode in ("fused", "ar"):
        tokens, text, responses = _collect(engine.generate(
            PROMPT, options=RunOptions(40, ignore_eos=True, block_size=BLOCK, stop=(stop,)),
            mode=mode))
        assert text == expected and stop not in text
        assert responses[-1].finish_reason == "stop"
        assert tokens == full.tokens[: len(tokens)]  # up to the token that completes it
        assert stop in _text(engine, tokens) and stop not in _text(engine, tokens[:-1])


def test_bad_requests_raise_user_error_before_anything_runs(engine):
    with pytest.raises(UserError, match="max_tokens"):
        engine.generate(PROMPT, options=RunOptions(max_tokens=0))
    with pytest.raises(UserError, match="prompt is empty"):
        engine.generate([])
    with pytest.raises(UserError, match="between 2 and"):
        engine.generate(PROMPT, options=RunOptions(block_size=BLOCK + 1))

    class OldPolicy:  # a width policy written before shadow drafts existed
        max_width = BLOCK

        def next_width(self) -> int:
            return BLOCK

        def record(self, width: int, accepted: int, seconds: float) -> None:
            pass

    with pytest.raises(UserError, match=r"lacks shadow_due, observe_shadow.*NeverShadows"):
        engine.generate(PROMPT, options=RunOptions(block_size=OldPolicy()))
    upgraded = type("Upgraded", (NeverShadows, OldPolicy), {})()
    run = engine.run("fused", PROMPT, RunOptions(12, ignore_eos=True, block_size=upgraded))
    assert run.tokens == engine.run("ar", PROMPT, RunOptions(12, ignore_eos=True)).tokens


def test_a_conversation_without_a_chat_template_takes_the_plain_form(engine):
    """A base model's tokenizer has no template: turns become mlx-lm server's plain form."""
    assert not engine.has_chat_template
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    plain = "ASSISTANT's RULE: Be brief.\nUSER: Hi\nASSISTANT:"
    assert engine.encode(turns) == list(engine.tokenizer.encode(plain))


def _cold_ar(engine: Engine, prompt: list[int], n: int = 24) -> list[int]:
    return engine.run("ar", prompt, RunOptions(n, ignore_eos=True))


@pytest.mark.parametrize("mode", ["fused", "ar"])
def test_prompt_cache_reuse_equals_a_cold_ar_run(engine, mode):
    """Turns of one conversation, each longer than the sliding window: the second prefills
    only what the first did not hold, and decodes exactly what a cold AR run decodes."""
    cache = PromptCache()
    opts = RunOptions(24, ignore_eos=True, block_size=BLOCK)
    first, _, done = _collect(engine.generate(PROMPT, options=opts, mode=mode,
                                              prompt_cache=cache))
    assert first == _cold_ar(engine, PROMPT).tokens and done[-1].stats.cached_tokens == 0
    second = PROMPT + first + prompt_tokens(10, seed=22)
    tokens, _, done = _collect(engine.generate(second, options=opts, mode=mode,
                                               prompt_cache=cache))
    assert done[-1].stats.cached_tokens >= len(PROMPT) + len(first) - 1 > 2 * WINDOW
    assert tokens == _cold_ar(engine, second).tokens
    # a prompt that departs mid-way reuses exactly the common part
    branch = second[:30] + prompt_tokens(20, seed=23)
    common = next(i for i, (a, b) in enumerate(zip(branch, second, strict=False)) if a != b)
    tokens, _, done = _collect(engine.generate(branch, options=opts, mode=mode,
                                               prompt_cache=cache))
    assert done[-1].stats.cached_tokens == common >= 30
    assert tokens == _cold_ar(engine, branch).tokens
    # the same prompt again: everything but its last token comes from the cache
    tokens, _, done = _collect(engine.generate(branch, options=opts, mode=mode,
                                               prompt_cache=cache))
    assert done[-1].stats.cached_tokens == len(branch) - 1
    assert tokens == _cold_ar(engine, branch).tokens


def test_prompt_cache_after_a_stop_and_an_abandoned_run(engine):
    """Rows past what a run returned (drafts beyond a stop string; a consumer that stopped
    reading) are cut, so the next turn is still exact."""
    cache = PromptCache()
    full = _cold_ar(engine, PROMPT, 40).tokens
    stop = engine.tokenizer.decode(full[9:10])
    opts = RunOptions(40, ignore_eos=True, block_size=BLOCK, stop=(stop,))
    stopped, _, _ = _collect(engine.generate(PROMPT, options=opts, prompt_cache=cache))
    nxt = PROMPT + stopped + prompt_tokens(6, seed=24)
    tokens, _, done = _collect(engine.generate(nxt, options=OPTS, prompt_cache=cache))
    assert done[-1].stats.cached_tokens >= len(PROMPT)
    assert tokens == _cold_ar(engine, nxt, 40).tokens
    responses = engine.generate(PROMPT + full[:5], options=OPTS, prompt_cache=cache)
    next(responses), next(responses)
    responses.close()  # as the server does when a client goes away
    again = PROMPT + full + prompt_tokens(6, seed=25)
    tokens, _, done = _collect(engine.generate(again, options=OPTS, prompt_cache=cache))
    assert done[-1].stats.cached_tokens > len(PROMPT)
    assert tokens == _cold_ar(engine, again, 40).tokens


def test_a_fused_run_closed_during_ar_steps_keeps_their_drafter_rows(engine):
    """AR steps inside the fused loop extend the drafter's context once per segment; a
    consumer that stops mid-segment must still leave whole rows for the next turn."""
    cache = PromptCache()
    ar_steps = RunOptions(max_tokens=40, ignore_eos=True, block_size=WidthScript([1]))
    responses = engine.generate(PROMPT, options=ar_steps, prompt_cache=cache)
    got = [t for _, r in zip(range(6), responses, strict=False) for t in r.tokens]
    responses.close()
    again = PROMPT + got + prompt_tokens(6, seed=26)
    tokens, _, done = _collect(engine.generate(again, options=OPTS, prompt_cache=cache))
    assert done[-1].stats.cached_tokens >= len(PROMPT) + len(got) - 1
    assert tokens == _cold_ar(engine, again, 40).tokens


def test_ar_rows_are_not_reused_by_a_fused_run(engine):
    """AR runs compute no drafter context: a fused run after one prefills from scratch."""
    cache = PromptCache()
    _collect(engine.generate(PROMPT, options=OPTS, mode="ar", prompt_cache=cache))
    tokens, _, done = _collect(engine.generate([*PROMPT, 5, 6], options=OPTS, mode="fused",
                                               prompt_cache=cache))
    assert done[-1].stats.cached_tokens == 0
    assert tokens == _cold_ar(engine, [*PROMPT, 5, 6], 40).tokens


def test_generate_cli_prints_the_streamed_text(engine, tmp_path: Path, capsys):
    from mlx_engine.generate import main

    text = " ".join(engine.tokenizer.decode([t]) for t in PROMPT)
    assert main(["--model", str(engine.model_info.path), "--draft",
                 str(engine.drafter_info.path), "--prompt", text, "--raw", "--max-tokens", "16",
                 "--ignore-eos", "--no-warmup", "--block-size", "4"]) == 0
    out = capsys.readouterr().out
    ids = engine.encode(text, chat_template=False)
    assert out == _text(engine, _cold_ar(engine, ids, 16).tokens) + "\n"


def test_each_graph_mode_runs_on_round_costs_timed_in_it(engine, monkeypatch):
    """Where the host waits differs between graph modes, so does what a round costs: an
    engine used in both times each mode once and keeps the two apart."""
    monkeypatch.setattr(engine_module, "CALIBRATION_SECONDS", 0.0)
    monkeypatch.setattr(engine, "round_costs", {})
    timed, calibrate = [], engine.calibrate

    def counted(graph, sampling):
        timed.append(graph)
        return calibrate(graph, sampling)

    monkeypatch.setattr(engine, "calibrate", counted)
    two_phase, single = RunOptions(graph="two-phase"), RunOptions(graph="single")
    for opts in (two_phase, single, two_phase, single):
        assert engine.policy(opts).costs is engine.costs(opts)
    assert timed == ["two-phase", "single"]
    assert engine.costs(two_phase) is not engine.costs(single)


def test_a_seeded_sample_is_ars_under_the_adaptive_policy(engine):
    """The adaptive policy's widths follow measured time; a seeded sample does not: it is
    the AR sample of that seed, every time, and its round costs are measured apart."""
    from mlx_engine.sampling import SamplingParams

    opts = RunOptions(24, sampling=SamplingParams(temp=1.0), seed=3, ignore_eos=True)
    ar = engine.run("ar", PROMPT, opts).tokens
    assert all(engine.run("fused", PROMPT, opts).tokens == ar for _ in range(3))
    assert engine.costs(opts) is not None
    assert engine.run("ar", PROMPT, RunOptions(24, ignore_eos=True)).tokens != ar
