"""The draft trace (scripts/draft_trace.py) on a tiny random pair: each anchor drafts from the
context of the rows before it, and what it says each anchor accepts must be what the fused
loop accepted where the loop's rounds started."""

from __future__ import annotations

import json
from itertools import pairwise

import mlx.core as mx
from tiny import load_script, save_pair

from mlx_engine.engine import Engine
from mlx_engine.proposer import DFlashDraftSource

BLOCK = 4


def test_the_trace_agrees_with_the_rounds_the_loop_took(tmp_path, monkeypatch):
    script = load_script("draft_trace.py")
    model, draft = save_pair(tmp_path, BLOCK)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def add(a, b):\n    " * 12)
    out = tmp_path / "trace.json"
    argv = ["--model", str(model), "--draft", str(draft), "--prompt-file", str(prompt),
            "--block-size", str(BLOCK), "--max-tokens", "30", "--json", str(out)]
    assert script.main(argv) == 0
    first = json.loads(out.read_text())
    answer, start = first["answer"], len(first["prompt"])

    # the trace grows one drafter context as it walks; each anchor drafted from a context
    # built afresh out of the rows before it must say the same
    engine = Engine.load(str(model), str(draft))
    taps: list[mx.array] = []
    engine.verifier.prefill(mx.array([first["prompt"] + answer]), engine.verifier.make_cache(),
                            taps.append)
    context = mx.concatenate(taps, axis=1)
    for i, row in enumerate(first["anchors"]):
        fresh = DFlashDraftSource(engine.drafter, engine.verifier, engine.draft_head)
        fresh.extend(context[:, : start + i])
        probs = mx.softmax(fresh.draft_logits(mx.array([answer[i]]), BLOCK), axis=-1)
        assert mx.allclose(probs.max(axis=-1), mx.array(row["confidence"]), atol=1e-5)

    # A random drafter never agrees; one that drafts the answer itself, missing after
    # (anchor index % BLOCK) tokens, exercises rounds of every length in the loop and the trace.
    def oracle(self, anchor, block_size):
        i = self.context_len - start
        want = (answer[i + 1 : i + block_size] + [0] * block_size)[: block_size - 1]
        ids = [t if k < i % BLOCK else (t + 1) % self.verifier.vocab_size
               for k, t in enumerate(want)]
        hit = mx.array(ids)[:, None] == mx.arange(self.verifier.vocab_size)[None]
        return mx.where(hit, 10.0, 0.0)

    monkeypatch.setattr(DFlashDraftSource, "draft_logits", oracle)
    assert script.main(argv) == 0
    trace = json.loads(out.read_text())
    assert trace["answer"] == answer
    anchors = trace["anchors"]
    assert len(anchors) == len(answer) - 1
    starts = [i for i, row in enumerate(anchors) if row["round"]]
    assert len(starts) == len(trace["accepted"])
    # every round but the last (the token cap cuts what it may accept) accepted what the
    # trace says its anchor accepts, and the next round starts right after what it committed
    assert [anchors[i]["accepted"] for i in starts[:-1]] == trace["accepted"][:-1]
    assert all(a + anchors[a]["accepted"] + 1 == b for a, b in pairwise(starts))
    assert max(trace["accepted"]) == BLOCK - 1
