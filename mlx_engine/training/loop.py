"""The training loop: AdamW, warmup + cosine LR, grad clipping, checkpoints, resume, curve.

The LR schedule runs on progress = max(step / steps, elapsed / time_limit), so a run with a
wall-clock budget (the GPU lease) still finishes its cosine decay instead of being cut off
at a high learning rate. Checkpoints hold everything a resume needs (weights, optimiser,
step, elapsed time, RNG state, history); data order is a pure function of (seed, step).
Under torchrun (`distributed`) each step's batch is split over the ranks, gradients are
averaged, and every rank follows the slowest rank's progress; rank 0 keeps the checkpoint
and logs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import UserError
from ..reference.torch_drafter import TorchDFlashDrafter
from ..reference.torch_target import TargetModel, matmul_precision
from . import distributed
from .data import TokenCache
from .objective import decay_weights, dflash_loss, make_blocks, sample_anchors

CHECKPOINT = "checkpoint.pt"
LENGTH_WINDOW = 16  # steps whose sequences are grouped by length (`Trainer._epoch_order`)


@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    anchors_per_seq: int
    seq_len: int
    gamma: float
    seed: int
    warmup_frac: float = 0.04
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    time_limit_s: float | None = None
    log_every: int = 10
    ckpt_every: int = 250
    loss_chunk_rows: int = 4096
    autocast_bf16: bool = False


def lr_factor(progress: float, warmup_frac: float, min_lr_frac: float) -> float:
    """Linear warmup, then cosine from 1 down to min_lr_frac at progress 1."""
    if progress < warmup_frac:
        return max(progress / warmup_frac, 1e-3)
    t = min(1.0, (progress - warmup_frac) / max(1e-9, 1.0 - warmup_frac))
    return min_lr_frac + (1.0 - min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * t))


class Trainer:
    def __init__(
        self,
        target: TargetModel,
        drafter: TorchDFlashDrafter,
        cache: TokenCache,
        cfg: TrainConfig,
        out_dir: Path,
        group: distributed.Group = distributed.SINGLE,
    ):
        self.target, self.drafter, self.cfg, self.out_dir = target, drafter, cfg, out_dir
        self.group = group
        self.device = target.device
        self.block_size = drafter.config.block_size
        self.sequences = [
            (len(cache.prompts[i]), (cache.prompts[i] + cache.continuations[i])[: cfg.seq_len])
            for i in cache.indices(held_out=False)
        ]
        usable = sum(len(seq) - first >= 2 for first, seq in self.sequences)
        if usable == 0:
            raise UserError(
                "no training sequence has a continuation of >= 2 tokens within --seq-len; "
                "raise --gen-tokens or --seq-len"
            )
        self.weights = decay_weights(self.block_size, cfg.gamma).to(self.device)
        params = list(drafter.parameters())
        groups = [  # no decay on norm weights: they set scales, not features
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
        self.generator = torch.Generator().manual_seed(self._anchor_seed(0))
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        self._orders: dict[int, list[int]] = {}

    # --- state -------------------------------------------------------------------------
    def _anchor_seed(self, step: int) -> int:
        """Rank 0 draws from `seed` (as a single process does); rank r > 0 from its own
        stream, re-seeded at a resume (its generator state is not checkpointed)."""
        if self.group.rank == 0:
            return self.cfg.seed
        return hash((self.cfg.seed, self.group.rank, step)) & (2**63 - 1)

    def save(self) -> None:
        if not self.group.main:
            return
        state = {
            "drafter": self.drafter.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "history": self.history,
            "generator": self.generator.get_state(),
            "train_config": asdict(self.cfg),
        }
        tmp = self.out_dir / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.out_dir / CHECKPOINT)

    def load(self) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.is_file():
            raise UserError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.drafter.load_state_dict(state["drafter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.history = state["history"]
        self.generator.set_state(state["generator"].cpu())
        if not self.group.main:
            self.generator.manual_seed(self._anchor_seed(self.step))

    # --- one step ----------------------------------------------------------------------
    def _batch_indices(self, step: int) -> list[int]:
        """Epoch-wise orders seeded by (seed, epoch): the order is a function of the step.
        A step takes batch_size sequences per rank, rank r the r-th slice."""
        n, bs = len(self.sequences), self.cfg.batch_size
        start = (step * self.group.world + self.group.rank) * bs
        out = []
        for j in range(start, start + bs):
            epoch, pos = divmod(j, n)
            if epoch not in self._orders:
                self._orders = {epoch: self._epoch_order(epoch)}
            out.append(self._orders[epoch][pos])
        return out

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return length_grouped_order([len(seq) for _, seq in self.sequences],
                                    self.cfg.batch_size * self.group.world, g)

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.sequences[i] for i in self._batch_indices(step)]
        width = max(len(seq) for _, seq in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for r, (_, seq) in enumerate(rows):
            tokens[r, : len(seq)] = torch.tensor(seq)
        first = torch.tensor([f for f, _ in rows])
        lengths = torch.tensor([len(seq) for _, seq in rows])
        return tokens, first, lengths

    def train_step(self) -> dict[str, Any]:
        cfg, dev = self.cfg, self.device
        tokens, first, lengths = self._batch(self.step)
        anchors, keep = sample_anchors(first, lengths, cfg.anchors_per_seq, self.generator)
        tokens, anchors, keep = tokens.to(dev), anchors.to(dev), keep.to(dev)
        block_ids, labels = make_blocks(
            tokens, anchors, self.block_size, self.drafter.config.mask_token_id, lengths
        )
        with matmul_precision("high"):
            taps = self.target.taps(tokens, self.drafter.config.target_layer_ids)
        scale = self.drafter.config.input_embedding_scale
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            hidden = self.drafter(taps, self.target.embed(block_ids) * scale, anchors)
            loss, stats = dflash_loss(
                hidden,
                lambda h: self.drafter.compute_logits(h, self.target.head),
                labels, keep, self.weights, cfg.loss_chunk_rows,
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(list(self.drafter.parameters()), self.group)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), cfg.grad_clip)
        self.optimizer.step()
        return {"loss": stats.loss, "accept": stats.accept, "acc": stats.accuracy,
                "grad_norm": float(grad_norm)}

    # --- the loop ----------------------------------------------------------------------
    def progress(self) -> float:
        """Share of the run done: of the steps, or of the time budget (the slowest rank's)."""
        p = self.step / self.cfg.steps
        if self.cfg.time_limit_s:
            p = max(p, self.elapsed / self.cfg.time_limit_s)
        return distributed.agreed_max(p, self.group)

    def run(self, show_progress: bool = True) -> list[dict[str, Any]]:
        cfg = self.cfg
        self.drafter.train()
        window: list[dict[str, Any]] = []
        bar = tqdm(total=None if cfg.time_limit_s else cfg.steps, initial=self.step,
                   desc="train drafter", disable=not (show_progress and self.group.main))
        progress = self.progress()
        while progress < 1.0:
            lr = cfg.lr * lr_factor(progress, cfg.warmup_frac, cfg.min_lr_frac)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            window.append(self.train_step())
            self.elapsed += time.perf_counter() - t0
            self.step += 1
            bar.update(1)
            progress = self.progress()
            if self.step % cfg.log_every == 0 or progress >= 1.0:
                self.history.append(_summarise(window, self.step, lr, self.elapsed))
                window = []
                last = self.history[-1]
                bar.set_postfix(loss=f"{last['loss']:.3f}", tau=f"{1 + last['accept']:.2f}")
            if self.step % cfg.ckpt_every == 0:
                self.save()
        bar.close()
        self.save()
        distributed.check_replicas(self.drafter, self.group)
        self.drafter.eval()
        return self.history


def length_grouped_order(lengths: list[int], step_rows: int, g: torch.Generator) -> list[int]:
    """A shuffle, then sorted by length within windows of LENGTH_WINDOW steps of `step_rows`
    sequences, whose steps are shuffled again: a step's sequences have similar lengths, so a
    batch of short answers is not padded to the width of a 4k-token prompt."""
    perm = torch.randperm(len(lengths), generator=g).tolist()
    order: list[int] = []
    for w in range(0, len(perm), step_rows * LENGTH_WINDOW):
        part = sorted(perm[w : w + step_rows * LENGTH_WINDOW], key=lambda i: lengths[i])
        steps = [part[k : k + step_rows] for k in range(0, len(part), step_rows)]
        for k in torch.randperm(len(steps), generator=g).tolist():
            order += steps[k]
    return order


def _summarise(window: list[dict[str, Any]], step: int, lr: float, elapsed: float) -> dict:
    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if not math.isnan(x)]
        return sum(xs) / len(xs) if xs else math.nan

    n_pos = len(window[0]["acc"])
    return {
        "step": step,
        "loss": mean([w["loss"] for w in window]),
        "accept": mean([w["accept"] for w in window]),
        "acc": [round(mean([w["acc"][k] for w in window]), 4) for k in range(n_pos)],
        "grad_norm": mean([w["grad_norm"] for w in window]),
        "lr": lr,
        "elapsed_s": round(elapsed, 2),
    }


def plot_curve(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss and the training-batch acceptance estimate (1 + mean leading matches) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["loss"] for h in history], color="tab:blue", label="decay-weighted CE")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [1 + h["accept"] for h in history], color="tab:orange",
             label="train-batch tau estimate")
    ax2.set_ylabel("tau estimate (1 + accepted drafts)", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
