"""Drafter training: objective pieces, data split, a CPU smoke run, export, tau, MLX parity."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mlx_engine.errors import UserError  # noqa: E402
from mlx_engine.training.data import (  # noqa: E402
    TokenCache,
    code_files,
    find_mask_token,
    held_out_files,
    is_held_out,
    split_files,
    stdlib_root,
)
from mlx_engine.training.loop import lr_factor  # noqa: E402
from mlx_engine.training.objective import (  # noqa: E402
    IGNORE,
    decay_weights,
    default_gamma,
    dflash_loss,
    make_blocks,
    sample_anchors,
)

SMOKE_STEPS = 50
SMOKE_ARGS = [
    "--tiny-random-target", "--device", "cpu", "--quiet", "--seed", "0",
    "--num-prompts", "48", "--eval-prompts", "6", "--min-prompt-tokens", "32",
    "--max-prompt-tokens", "64", "--gen-tokens", "40", "--gen-batch-size", "32",
    "--block-size", "8", "--num-layers", "2", "--head-dim", "16", "--num-heads", "4",
    "--num-kv-heads", "2", "--intermediate-size", "128", "--batch-size", "8",
    "--anchors-per-seq", "8", "--seq-len", "128", "--lr", "1e-2", "--log-every", "5",
    "--ckpt-every", "25", "--export-dtype", "float16", "--function-prompts", "0.5",
]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --- objective ---------------------------------------------------------------------------
def test_decay_weights_follow_dflash():
    w = decay_weights(16, 7.0)
    assert w.shape == (15,)
    assert w[0] == 1.0
    torch.testing.assert_close(w, torch.exp(-torch.arange(15.0) / 7.0))
    assert all(w[i] > w[i + 1] for i in range(14))
    assert (default_gamma(16), default_gamma(10), default_gamma(8)) == (7.0, 5.0, 4.0)


def test_anchors_are_distinct_and_every_block_has_a_label():
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for _ in range(200):
        b = rng.randint(1, 4)
        first = torch.tensor([rng.randint(0, 40) for _ in range(b)])
        lengths = first + torch.tensor([rng.randint(0, 40) for _ in range(b)])
        n = rng.randint(1, 24)
        anchors, keep = sample_anchors(first, lengths, n, gen)
        assert anchors.shape == keep.shape == (b, n)
        for r in range(b):
            kept = anchors[r][keep[r]].tolist()
            room = max(0, int(lengths[r]) - 1 - int(first[r]))
            assert len(kept) == min(n, room) == len(set(kept))
            assert all(first[r] <= a and a + 1 <= lengths[r] - 1 for a in kept)


def test_blocks_are_anchor_then_masks_and_labels_follow():
    tokens = torch.arange(100, 130)[None]
    block_ids, labels = make_blocks(tokens, torch.tensor([[3, 20]]), 4, mask_token_id=7)
    assert block_ids.tolist() == [[103, 7, 7, 7, 120, 7, 7, 7]]
    assert labels.tolist() == [[[104, 105, 106], [121, 122, 123]]]


def test_labels_past_a_sequence_end_are_ignored_and_carry_no_loss():
    tokens = torch.tensor([[10, 11, 12, 1, 0, 0], [20, 21, 22, 23, 24, 25]])  # row 0 ends at EOS
    anchors = torch.tensor([[2], [3]])
    block_ids, labels = make_blocks(tokens, anchors, 4, mask_token_id=7,
                                    lengths=torch.tensor([4, 6]))
    assert block_ids.tolist() == [[12, 7, 7, 7], [23, 7, 7, 7]]
    assert labels.tolist() == [[[1, IGNORE, IGNORE]], [[24, 25, IGNORE]]]
    torch.manual_seed(0)
    v, h = 30, 8
    hidden, head = torch.randn(2, 4, h), torch.randn(v, h)
    keep = torch.ones(2, 1, dtype=torch.bool)
    w = decay_weights(4, 2.0)
    loss, stats = dflash_loss(hidden, lambda x: x @ head.T, labels, keep, w)
    logits = hidden[:, 1:] @ head.T  # [2, 3, v]
    ce = [torch.nn.functional.cross_entropy(logits[r, k], torch.tensor(y))
          for r, k, y in ((0, 0, 1), (1, 0, 24), (1, 1, 25))]
    expected = (ce[0] * w[0] + ce[1] * w[0] + ce[2] * w[1]) / (2 * w[0] + w[1])
    torch.testing.assert_close(loss, expected)
    assert math.isnan(stats.accuracy[2])  # no block reaches its third position


def test_loss_is_decay_weighted_ce_over_kept_blocks():
    torch.manual_seed(0)
    b, n, block, h, v = 2, 3, 4, 8, 11
    hidden = torch.randn(b, n * block, h)
    head = torch.randn(v, h)
    labels = torch.randint(0, v, (b, n, block - 1))
    keep = torch.tensor([[True, False, True], [True, True, False]])
    w = decay_weights(block, 2.0)
    loss, stats = dflash_loss(hidden, lambda x: x @ head.T, labels, keep, w, chunk_rows=5)
    logits = (hidden.view(b, n, block, h)[:, :, 1:] @ head.T)[keep]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, v), labels[keep].reshape(-1), reduction="none"
    ).view(-1, block - 1)
    torch.testing.assert_close(loss, (ce * w).sum() / (w.sum() * keep.sum()))
    hits = logits.argmax(-1) == labels[keep]
    assert stats.accuracy == pytest.approx(hits.float().mean(0).tolist())
    assert stats.accept == pytest.approx(hits.long().cumprod(-1).sum(-1).float().mean().item())


def test_an_epoch_order_is_a_permutation_whose_steps_share_a_length():
    from mlx_engine.training.loop import LENGTH_WINDOW, length_grouped_order

    rng = random.Random(0)
    lengths = [rng.choice([100, 4000]) for _ in range(4 * LENGTH_WINDOW * 3)]
    order = length_grouped_order(lengths, 4, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))
    steps = [order[k : k + 4] for k in range(0, len(order), 4)]
    mixed = sum(len({lengths[i] for i in step}) > 1 for step in steps)
    assert mixed <= 3  # at most one step per window straddles the two lengths
    again = length_grouped_order(lengths, 4, torch.Generator().manual_seed(0))
    assert again == order


def test_lr_warms_up_then_decays_to_the_floor():
    assert lr_factor(0.0, 0.04, 0.1) < 0.01
    assert lr_factor(0.04, 0.04, 0.1) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.04, 0.1) == pytest.approx(0.1)
    values = [lr_factor(p / 100, 0.04, 0.1) for p in range(4, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


# --- data --------------------------------------------------------------------------------
def test_held_out_split_is_by_path_hash_and_disjoint():
    root = stdlib_root()
    train, held = split_files(root)
    assert held == held_out_files(root)
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == code_files(root)
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15
    assert all(is_held_out(p.relative_to(root).as_posix()) for p in held)
    assert is_held_out("json/decoder.py") == is_held_out("json/decoder.py")


FUNCTIONS = '''import os


def short(x):
    return x


async def documented(a, b):
    """One line
    and another."""
    c = a + b
    d = c * 2
    return d


class K:
    def method(self):  # a comment
        if self:
            pass
        return 1

    def inner_short(self): return 2
'''


def test_function_body_starts_skip_docstrings_and_short_bodies():
    from mlx_engine.training.data import function_body_starts

    lines = FUNCTIONS.splitlines(True)
    starts = function_body_starts(lines)
    assert [lines[i - 1].strip() for i in starts] == [
        'and another."""', "def method(self):  # a comment"]
    assert [lines[i].strip() for i in starts] == ["c = a + b", "if self:"]


def test_function_prompts_end_where_a_body_starts(tmp_path: Path):
    from dataclasses import replace

    from mlx_engine.training.data import function_body_starts
    from mlx_engine.training.kinds import KINDS, sample_prompts

    files = []
    for k in range(3):
        files.append(tmp_path / f"m{k}.py")
        files[-1].write_text(FUNCTIONS * (k + 2))

    def encode_batch(texts):
        return [[ord(c) for c in t] for t in texts]

    kind = replace(KINDS["function_body"], lengths=(20, 84))
    prompts = sample_prompts(kind, files, encode_batch, 40, random.Random(0), 1)
    heads = [  # each file's text up to each body start
        "".join(lines[:i]) for f in files
        for lines in [f.read_text().splitlines(True)] for i in function_body_starts(lines)]
    assert len(prompts) == 40 and all(p[0] == 1 and len(p) in (20, 84) for p in prompts)
    for p in prompts:
        text = "".join(map(chr, p[1:]))
        assert any(head.endswith(text) for head in heads), text


def test_prompt_cache_mixes_the_kinds_and_keeps_them_through_generation(tmp_path: Path):
    from mlx_engine.reference.tiny_target import build_tiny_target
    from mlx_engine.reference.torch_target import load_tokenizer
    from mlx_engine.training.data import fill_continuations
    from mlx_engine.training.mix import build_prompt_cache, parse_mix

    build_tiny_target(tmp_path / "t", seed=0)
    tok = load_tokenizer(tmp_path / "t")
    mix = parse_mix("excerpt=0.5,function_body=0.25,chat=0.25")
    cache = build_prompt_cache(tok, 20, 8, 32, 64, seed=3, mix=mix)
    assert [len(cache.indices(False, k)) for k in ("excerpt", "function_body", "chat")] == [
        10, 5, 5]
    assert [len(cache.indices(True, k)) for k in ("excerpt", "function_body", "chat")] == [
        4, 2, 2]
    assert cache.kinds[:20] != sorted(cache.kinds[:20])  # shuffled
    assert all(len(cache.prompts[i]) in (32, 64) for i in cache.indices(False, "excerpt"))
    chat = tok.decode(cache.prompts[cache.indices(False, "chat")[0]])
    assert chat.startswith("<bos><start_of_turn>user\n") and chat.endswith("<start_of_turn>model\n")
    plain = build_prompt_cache(tok, 20, 8, 32, 64, seed=3, mix=parse_mix("excerpt=1"))
    assert set(plain.kinds) == {"excerpt"}

    def generate(prompts, n, deadline):  # no time for the last training prompt
        return [[7] * n if deadline is None or i < len(prompts) - 1 else None
                for i, _ in enumerate(prompts)]

    kinds = [cache.kinds[i] for i in range(len(cache.prompts)) if i != 19]
    assert fill_continuations(cache, generate, 2, time_limit=60.0) == 1
    assert cache.kinds == kinds
    cache.save(tmp_path / "c.npz")
    again = TokenCache.load(tmp_path / "c.npz")
    assert again.kinds == kinds and again.meta["mix"] == mix


def test_token_cache_round_trip(tmp_path: Path):
    cache = TokenCache([[2, 5, 6], [2, 7]], [False, True], {"seed": 1, "gen_tokens": 3},
                       [[8, 9, 1], []])
    cache.save(tmp_path / "c.npz")
    again = TokenCache.load(tmp_path / "c.npz")
    assert (again.prompts, again.held_out, again.meta, again.continuations) == (
        cache.prompts, cache.held_out, cache.meta, cache.continuations)
    assert again.indices(held_out=True) == [1] and again.has_continuations(3)
    assert again.kinds == ["excerpt", "excerpt"]  # a cache without kinds: excerpts
    with pytest.raises(UserError, match="does not exist"):
        TokenCache.load(tmp_path / "missing.npz")


def test_an_old_cache_reads_its_function_body_flags_as_kinds(tmp_path: Path):
    TokenCache([[2, 5], [2, 7]], [False, True], {}).save(tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "kinds"}
    np.savez(tmp_path / "old.npz", at_function_body=np.asarray([True, False]), **arrays)
    assert TokenCache.load(tmp_path / "old.npz").kinds == ["function_body", "excerpt"]


def test_generation_time_limit_drops_only_training_prompts():
    from mlx_engine.training.data import fill_continuations

    cache = TokenCache([[1], [2], [3], [4], [5]], [False, True, False, False, True], {})
    seen: list[tuple[list[list[int]], bool]] = []

    def generate(prompts, n, deadline):  # runs out of time after one training prompt
        seen.append((prompts, deadline is not None))
        if deadline is None:
            return [[p[0] * 10] * n for p in prompts]
        return [[p[0] * 10] * n if i == 0 else None for i, p in enumerate(prompts)]

    assert fill_continuations(cache, generate, 2, time_limit=60.0) == 2
    assert seen == [([[2], [5]], False), ([[1], [3], [4]], True)]  # held-out first, no limit
    assert cache.prompts == [[1], [2], [5]] and cache.held_out == [False, True, True]
    assert cache.continuations == [[10, 10], [20, 20], [50, 50]]
    assert cache.meta == {"gen_tokens": 2, "dropped_without_continuation": 2}


def test_mask_token_is_a_reserved_unused_row():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    assert find_mask_token(Tok({"<pad>": 0, "<unused1>": 9, "<unused0>": 6, "a": 7})) == 6
    with pytest.raises(UserError, match="--mask-token-id"):
        find_mask_token(Tok({"<pad>": 0, "a": 1}))


# --- the CPU smoke run -------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    from mlx_engine.train_drafter import main

    out = tmp_path_factory.mktemp("smoke")
    assert main(["--out", str(out), "--steps", str(SMOKE_STEPS), *SMOKE_ARGS]) == 0
    return out


def test_smoke_run_loss_falls(smoke: Path):
    log = json.loads((smoke / "train_log.json").read_text())
    losses = [h["loss"] for h in log["history"]]
    assert log["steps_done"] == SMOKE_STEPS and len(losses) == SMOKE_STEPS // 5
    assert sum(losses[-2:]) / 2 < 0.7 * losses[0], losses
    assert (smoke / "loss_curve.png").stat().st_size > 1000
    taus = {(r["prompts"], r["block_size"]): r for r in log["held_out_tau"]}
    assert set(taus) == {(k, b) for k in ("all", "excerpt", "function_body") for b in (4, 8)}
    assert all(r["tau"] >= 1.0 for r in taus.values())
    for b in (4, 8):  # --function-prompts 0.5 of the 6 held-out prompts end at a body
        assert [taus[k, b]["sequences"] for k in ("excerpt", "function_body", "all")] == [3, 3, 6]
        assert taus["all", b]["tau"] == taus["all", b]["tokens"] / taus["all", b]["rounds"]


def test_export_is_z_lab_format_and_reloads(smoke: Path):
    from mlx_engine.reference.torch_drafter import SHARD_BYTES, TorchDFlashDrafter

    export = smoke / "drafter"
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["dflash_config"]["mask_token_id"] == 4  # <unused0> of the tiny tokenizer
    assert config["dflash_config"]["target_layer_ids"] == [1, 3]  # 6 target layers, 2 taps
    files = list(export.glob("*.safetensors"))
    assert files and all(f.stat().st_size < SHARD_BYTES for f in files)
    drafter = TorchDFlashDrafter.from_pretrained(export)
    assert drafter.config.block_size == 8


def test_resume_continues_from_the_checkpoint(smoke: Path):
    from mlx_engine.train_drafter import main

    before = json.loads((smoke / "train_log.json").read_text())["history"]
    assert main(["--out", str(smoke), "--steps", str(SMOKE_STEPS + 10), "--resume",
                 *SMOKE_ARGS]) == 0
    log = json.loads((smoke / "train_log.json").read_text())
    assert log["steps_done"] == SMOKE_STEPS + 10
    assert log["history"][: len(before)] == before
    assert "generate_s" not in log["timings"]  # the token cache was reused


def test_greedy_continue_past_its_deadline_starts_no_batch(smoke: Path):
    from mlx_engine.reference.torch_target import load_target

    target = load_target(smoke / "tiny-target")
    prompts = [[2, 5, 6, 7], [2, 8, 9, 10], [2, 11]]
    assert target.greedy_continue(prompts, 4, progress=False, deadline=0.0) == [None] * 3
    full = target.greedy_continue(prompts, 4, batch_size=1, progress=False)
    assert all(len(c) == 4 for c in full)


def test_prompts_of_mixed_lengths_continue_as_each_does_alone(smoke: Path):
    """Left-padded batches (chat requests have natural lengths) give each prompt's own
    greedy continuation, past the tiny target's 16-token sliding window too."""
    from mlx_engine.reference.torch_target import _length_batches, load_target

    target = load_target(smoke / "tiny-target")
    rng = random.Random(0)
    prompts = [[2] + [rng.randrange(260, 512) for _ in range(rng.randint(5, 40))]
               for _ in range(10)]
    together = target.greedy_continue(prompts, 24, batch_size=64, progress=False)
    alone = [target.greedy_continue([p], 24, progress=False)[0] for p in prompts]
    assert together == alone
    batches = _length_batches([5, 3, 300_000, 3, 200_000, 5], batch_size=2)
    assert sorted(map(sorted, batches)) == [[0, 5], [1, 3], [2], [4]]  # long ones alone


def test_init_starts_from_a_drafter_and_reports_its_tau(smoke: Path, tmp_path: Path):
    import shutil

    from mlx_engine.reference.torch_drafter import TorchDFlashDrafter
    from mlx_engine.train_drafter import main

    shutil.copytree(smoke / "tiny-target", tmp_path / "tiny-target")
    # Flags that would build another drafter: --init's config wins.
    args = [a if a != "--num-layers" else "--head-dim" for a in SMOKE_ARGS]
    assert main(["--out", str(tmp_path), "--data", str(smoke / "data.npz"), "--init",
                 str(smoke / "drafter"), "--steps", "3", "--lr", "1e-4", *args]) == 0
    log = json.loads((tmp_path / "train_log.json").read_text())
    init = json.loads((smoke / "train_log.json").read_text())
    assert log["init"]["held_out_tau"] == init["held_out_tau"]  # same drafter, same prompts
    assert log["drafter_config"] == init["drafter_config"]
    before = TorchDFlashDrafter.from_pretrained(smoke / "drafter").state_dict()
    after = TorchDFlashDrafter.from_pretrained(tmp_path / "drafter").state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and len(moved) < len(before) + 1  # trained further, from those weights
    small = max((after[k] - before[k]).abs().max().item() for k in before)
    assert small < 0.05  # 3 steps at lr 1e-4 move weights a little, not a re-init


def test_init_for_another_target_is_one_line_before_it_runs(smoke: Path, tmp_path: Path, capsys):
    import dataclasses
    import shutil

    from mlx_engine.reference.torch_drafter import TorchDFlashDrafter
    from mlx_engine.train_drafter import main

    shutil.copytree(smoke / "tiny-target", tmp_path / "tiny-target")
    cfg = TorchDFlashDrafter.from_pretrained(smoke / "drafter").config
    wide = dataclasses.replace(cfg, hidden_size=2 * cfg.hidden_size)
    TorchDFlashDrafter(wide).save_pretrained(tmp_path / "wide")
    assert main(["--out", str(tmp_path), "--data", str(smoke / "data.npz"), "--init",
                 str(tmp_path / "wide"), "--steps", "3", *SMOKE_ARGS]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' load bar
    assert last == (f"error: drafter hidden_size {wide.hidden_size} != verifier hidden_size "
                    f"{cfg.hidden_size}")
    assert not (tmp_path / "train_log.json").exists()


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys):
    from mlx_engine.train_drafter import main

    cases = [
        ["--model", str(tmp_path / "nope")],
        ["--tiny-random-target", "--block-size", "1"],
        ["--tiny-random-target", "--min-prompt-tokens", "300", "--max-prompt-tokens", "64"],
        ["--tiny-random-target", "--steps", "0"],
        ["--tiny-random-target", "--resume"],
        ["--tiny-random-target", "--init", str(tmp_path / "no-drafter")],
    ]
    for extra in cases:
        assert main(["--out", str(tmp_path / "run"), "--device", "cpu", *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err


def test_train_until_already_past_is_one_line(smoke: Path, tmp_path: Path, capsys):
    import shutil

    from mlx_engine.train_drafter import main

    shutil.copytree(smoke / "tiny-target", tmp_path / "tiny-target")
    assert main(["--out", str(tmp_path), "--data", str(smoke / "data.npz"),  # no generation
                 "--steps", "5", "--train-until", "0.01", *SMOKE_ARGS]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' load bar
    assert last.startswith("error: --train-until 0.01s passed")


# --- tau: the simulation equals running greedy DFlash --------------------------------------
def run_greedy_dflash(target, drafter, prompt: list[int], n_new: int, block: int):
    """The real loop: draft, verify with one target forward, commit, extend the context."""
    ids = drafter.config.target_layer_ids
    mask = drafter.config.mask_token_id
    logits, taps = target.forward_with_taps(torch.tensor([prompt]), ids)
    cache = drafter.make_context_cache()
    drafter.extend_context(taps, cache)
    tokens = [*prompt, int(logits[0, -1].argmax())]
    rounds = []
    while len(tokens) - len(prompt) < n_new:
        s = len(tokens) - 1  # the anchor's position
        block_ids = torch.tensor([[tokens[s]] + [mask] * (block - 1)])
        drafts = drafter.draft_logits(block_ids, cache, target.embed, target.head)
        drafts = drafts.argmax(-1)[0].tolist()
        logits, taps = target.forward_with_taps(torch.tensor([tokens + drafts]), ids)
        post = logits[0, s:].argmax(-1).tolist()  # target's choice after each block row
        a = next((i for i, (d, p) in enumerate(zip(drafts, post, strict=False)) if d != p),
                 len(drafts))
        drafter.extend_context(taps[:, s : s + a + 1], cache)
        tokens += [*drafts[:a], post[a]]
        rounds.append((s, a + 1))
    return tokens[len(prompt) :], rounds


def test_interleave_undoes_the_rank_shards():
    from mlx_engine.training.distributed import interleave

    for world in (1, 2, 3, 5):
        items = list(range(11))
        assert interleave([items[r::world] for r in range(world)]) == items


def _run_two_ranks(logs: Path, *program: str, timeout: int) -> None:
    """torchrun, 2 CPU ranks (gloo); a failure shows the launcher's stderr and each rank's own
    stdout/stderr (kept in `logs`), with Python's stacks if a rank died on a signal."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "--log-dir", str(logs), "--redirects", "3", *program]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if run.returncode != 0:
        pytest.fail(run.stderr[-1500:] + "".join(
            f"\n--- {log.relative_to(logs)}\n{log.read_text()[-2000:]}"
            for log in sorted(logs.rglob("std*.log"))))


def test_data_parallel_run_over_two_ranks(smoke: Path, tmp_path: Path):
    """torchrun, 2 CPU ranks (gloo): the shards of generation and evaluation add up to the
    whole, and training ends with identical replicas (the run fails otherwise)."""
    from mlx_engine.reference.torch_drafter import TorchDFlashDrafter
    from mlx_engine.reference.torch_target import load_target
    from mlx_engine.training.evaluate import acceptance_length

    args = list(SMOKE_ARGS)
    args[args.index("--batch-size") + 1] = "4"  # 2 ranks x 4 = the smoke's 8 a step
    _run_two_ranks(tmp_path / "ranks", "-m", "mlx_engine.train_drafter", "--out", str(tmp_path),
                   "--steps", "30", *args, timeout=600)
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["data_parallel_ranks"] == 2 and log["steps_done"] == 30
    assert log["train_config"]["batch_size"] == 4
    losses = [h["loss"] for h in log["history"]]
    assert losses[-1] < 0.8 * losses[0], losses

    ours, single = TokenCache.load(tmp_path / "data.npz"), TokenCache.load(smoke / "data.npz")
    assert ours.prompts == single.prompts  # same seed, same prompts
    assert ours.continuations == single.continuations  # each rank generated its share

    target = load_target(tmp_path / "tiny-target")
    drafter = TorchDFlashDrafter.from_pretrained(tmp_path / "drafter").eval()
    held = ours.indices(held_out=True)
    for row in (r for r in log["held_out_tau"] if r["prompts"] == "all"):
        whole = acceptance_length(target, drafter, [ours.prompts[i] for i in held],
                                  [ours.continuations[i] for i in held], row["block_size"])
        assert (row["rounds"], row["tokens"], row["sequences"]) == (
            whole["rounds"], whole["tokens"], len(held))


RANK_SCRIPT = """
import os
from mlx_engine.training import distributed

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
    return [n.strip() for n in names if "gloo" in n]

group, _ = distributed.init("cpu")
import transformers.modeling_utils  # what a run imports once the group exists
assert gloo_threads(), "no gloo threads while the group is up: the check below would be void"
distributed.finish(group)
assert not gloo_threads(), f"the group outlived finish(): {gloo_threads()}"
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_finish_ends_the_process_group(tmp_path: Path):
    """A group still alive at interpreter shutdown can abort its rank (SIGABRT); imported
    after the group, transformers pinned it, and finish() left gloo's threads running."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    _run_two_ranks(tmp_path / "ranks", str(script), timeout=300)


@pytest.mark.parametrize("block", [4, 8])
def test_tau_simulation_equals_the_real_loop(smoke: Path, block: int):
    from mlx_engine.reference.torch_drafter import TorchDFlashDrafter
    from mlx_engine.reference.torch_target import load_target
    from mlx_engine.training.evaluate import acceptance_length

    target = load_target(smoke / "tiny-target")
    drafter = TorchDFlashDrafter.from_pretrained(smoke / "drafter").eval()
    cache = TokenCache.load(smoke / "data.npz")
    prompts = [cache.prompts[i] for i in cache.indices(held_out=True)][:3]
    gen = 40
    conts = target.greedy_continue(prompts, gen, progress=False)
    rounds = produced = 0
    for prompt, cont in zip(prompts, conts, strict=True):
        emitted, steps = run_greedy_dflash(target, drafter, prompt, gen, block)
        assert emitted[:gen] == cont  # lossless
        full = [n for s, n in steps if s <= len(prompt) + gen - block]
        rounds, produced = rounds + len(full), produced + sum(full)
    sim = acceptance_length(target, drafter, prompts, conts, block)
    assert (sim["rounds"], sim["tokens"]) == (rounds, produced)
    assert math.isclose(sim["tau"], produced / rounds)


# --- MLX parity --------------------------------------------------------------------------
def test_export_loads_in_mlx_and_fp32_drafts_match_torch(smoke: Path, tmp_path: Path):
    mx = pytest.importorskip("mlx.core")
    from mlx_engine.drafter import load_drafter
    from mlx_engine.reference.torch_drafter import TorchDFlashDrafter
    from mlx_engine.reference.torch_target import load_target

    load_drafter(smoke / "drafter")  # the float16 export itself loads
    torch_drafter = TorchDFlashDrafter.from_pretrained(smoke / "drafter").eval()
    torch_drafter.save_pretrained(tmp_path, dtype=torch.float32)
    mlx_drafter = load_drafter(tmp_path)
    cfg = torch_drafter.config
    assert (mlx_drafter.config.block_size, mlx_drafter.config.mask_token_id,
            mlx_drafter.config.target_layer_ids) == (cfg.block_size, cfg.mask_token_id,
                                                     cfg.target_layer_ids)

    target = load_target(smoke / "tiny-target")
    cache = TokenCache.load(smoke / "data.npz")
    i = cache.indices(held_out=True)[0]
    tokens = cache.prompts[i] + cache.continuations[i]
    taps = target.taps(torch.tensor([tokens]), cfg.target_layer_ids)
    emb = mx.array(target.embed_weight.detach().numpy())

    def mlx_embed(ids):
        return emb[ids]

    def mlx_head(h):
        return h @ emb.T

    t_cache, m_cache = torch_drafter.make_context_cache(), mlx_drafter.make_context_cache()
    for lo, hi in [(0, 20), (20, 31), (31, 32)]:  # context grows in uneven chunks
        torch_drafter.extend_context(taps[:, lo:hi], t_cache)
        mlx_drafter.extend_context(mx.array(taps[:, lo:hi].numpy()), m_cache)
        block = [tokens[hi]] + [cfg.mask_token_id] * (cfg.block_size - 1)
        want = torch_drafter.draft_logits(torch.tensor([block]), t_cache, target.embed,
                                          target.head)
        got = mlx_drafter.draft_logits(mx.array([block]), m_cache, mlx_embed, mlx_head)
        got = torch.from_numpy(np.array(got))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_tiny_target_loads_in_mlx_lm_with_equal_logits(smoke: Path):
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load

    from mlx_engine.reference.torch_target import load_target

    model, tokenizer = load(str(smoke / "tiny-target"))
    ids = tokenizer.encode("def f(x):\n    return [x for x in range(3)]  # longer than the window")
    assert ids[0] == 2 and len(ids) > 16  # BOS; past the 16-token sliding window
    want = load_target(smoke / "tiny-target").model(torch.tensor([ids])).logits.detach()
    got = torch.from_numpy(np.array(model(mx.array([ids])).astype(mx.float32)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
