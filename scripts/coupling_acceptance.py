"""How often a sampled draft is accepted: Gumbel-max coupling (what the engine does) against
rejection sampling, on the same (target, drafter) distributions of the offline pair.

Sampled fused rounds run at a fixed width; at every verified row whose drafts before it were
all accepted, p is the target's sampling distribution and q the drafter's. Rejection sampling
(Leviathan et al.) accepts a draft x ~ q with probability min(1, p(x)/q(x)), on average
sum(min(p, q)) = 1 - TV(p, q); the shared-noise coupling accepts when argmax(log p + g) equals
argmax(log q + g), estimated here over `--draws` noise draws on the tokens either gives at
least 1e-6 (the rest almost never win).

    python scripts/coupling_acceptance.py --workload chat --n 4 --temp 0.7
"""

from __future__ import annotations

import argparse

import numpy as np

from mlx_engine import workloads
from mlx_engine.engine import Engine
from mlx_engine.policy import FixedWidth
from mlx_engine.proposer import DFlashDraftSource
from mlx_engine.sampling import GumbelMax, SamplingParams, accept_drafts, probs
from mlx_engine.speculative import collect, fused_stream


class Recording(GumbelMax):
    """Gumbel-max sampling that keeps each round's drafter and target distributions."""

    def __init__(self, params: SamplingParams, seed: int, vocab_size: int, rounds: list):
        super().__init__(params, seed, vocab_size)
        self.rounds, self.vocab_ids, self.q, self.drafts = rounds, None, None, None

    def draft(self, logits, position, vocab_ids=None):
        self.q, self.vocab_ids = probs(logits, self.params), vocab_ids
        columns = super().draft(logits, position, vocab_ids)
        self.drafts = columns if vocab_ids is None else vocab_ids[columns]
        return columns

    def choose(self, logits, position):
        choice = super().choose(logits, position)
        if logits.shape[0] > 1:  # a verified block (prefill chooses one row)
            accepted, _ = accept_drafts(self.drafts, self.settled(choice))
            q = np.zeros((self.q.shape[0], self.vocab_size))
            columns = (np.arange(self.q.shape[1]) if self.vocab_ids is None
                       else np.array(self.vocab_ids))
            q[:, columns] = np.array(self.q)
            self.rounds.append((np.array(probs(logits, self.params)), q, accepted.item()))
        return choice


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="chat")
    p.add_argument("--n", type=int, default=4, help="first N prompts")
    p.add_argument("--temp", type=float, default=0.7)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--draws", type=int, default=400)
    args = p.parse_args()

    engine = Engine.load()
    params = SamplingParams(args.temp)
    rng = np.random.default_rng(0)
    rejection, coupled = [], []
    for i, prompt in enumerate(workloads.load(args.workload)[: args.n]):
        rounds: list = []
        sampler = Recording(params, i, engine.verifier.vocab_size, rounds)
        source = DFlashDraftSource(engine.drafter, engine.verifier, engine.draft_head)
        collect(fused_stream(engine.verifier, source, workloads.encode(engine, prompt),
                             args.max_tokens, FixedWidth(args.width), sampler=sampler,
                             stop_ids=engine.stop_ids(ignore_eos=False)))
        for target, drafter, accepted in rounds:
            for row in range(min(accepted + 1, drafter.shape[0])):
                pr, qr = target[row].astype(np.float64), drafter[row]
                rejection.append(np.minimum(pr, qr).sum())
                keep = np.nonzero((pr > 1e-6) | (qr > 1e-6))[0]
                noise = rng.gumbel(size=(args.draws, keep.size))
                lp, lq = np.log(pr[keep] + 1e-300), np.log(qr[keep] + 1e-300)
                coupled.append(np.mean((lp + noise).argmax(1) == (lq + noise).argmax(1)))
    print(f"{args.workload}, temp {args.temp}: {len(rejection)} drafts; accepted by rejection "
          f"sampling {np.mean(rejection):.3f}, by the Gumbel-max coupling {np.mean(coupled):.3f}")


if __name__ == "__main__":
    main()
