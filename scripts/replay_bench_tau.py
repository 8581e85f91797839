"""Replay tau (torch, the training pipeline's evaluator) on the bench's prompts, per prompt,
beside the MLX engine's tau from a bench evidence file: tells the evaluator apart from the text.

    python scripts/replay_bench_tau.py --evidence docs/results/cpu-code-b16.json --n 6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mlx_engine import workloads
from mlx_engine.gguf.convert import default_verifier_dir
from mlx_engine.reference.torch_drafter import TorchDFlashDrafter
from mlx_engine.reference.torch_target import load_target, load_tokenizer
from mlx_engine.sources import resolve_drafter
from mlx_engine.training.evaluate import acceptance_length


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--evidence", type=Path, required=True, help="a bench evidence JSON")
    p.add_argument("--draft", default="default")
    p.add_argument("--n", type=int, default=40, help="first N prompts of the evidence")
    args = p.parse_args()

    evidence = json.loads(args.evidence.read_text())
    params = evidence["params"]
    model = default_verifier_dir("float32")
    tokenizer, target = load_tokenizer(model), load_target(model)
    drafter = TorchDFlashDrafter.from_pretrained(resolve_drafter(args.draft))
    block = int(params["block_size"])
    prompts = {q.id: q for q in workloads.load(params["workload"])}
    eos = () if params["ignore_eos"] else (
        tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>"))
    for sample in evidence["samples"][: args.n]:
        ids = tokenizer(prompts[sample["prompt_id"]].text)["input_ids"]
        with torch.no_grad():
            cont = target.greedy_continue([ids], params["max_tokens"], eos_ids=eos,
                                          progress=False)[0]
        replay = acceptance_length(target, drafter, [ids], [cont], block)["tau"]
        print(f"{sample['prompt_id']}: replay {replay:.2f}  engine "
              f"{sample['fused']['mean_accept_len']:.2f}", flush=True)


if __name__ == "__main__":
    main()
