"""Data parallelism over the GPUs of one host (torchrun); a no-op in a single process.

`torchrun --nproc-per-node N -m mlx_engine.train_drafter ...` sets RANK / WORLD_SIZE /
LOCAL_RANK. Each rank then generates, trains on and evaluates its share of the prompts, and
the shares meet by all-gather. Gradients are averaged by one flat all-reduce per step (the
drafter is small) before clipping, and the LR schedule runs on a progress all ranks agree
on, so every rank applies the same update and the replicas stay bit-identical (checked at
the end). Rank 0 alone writes files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

# `torch.distributed.nn` binds `group.WORLD` as default arguments when it is imported
# (transformers imports it). Imported after `init` made the group, that pins the group:
# destroy_process_group then leaves gloo's threads running into interpreter shutdown, where a
# rank can abort ("terminate called without an active exception"). Imported here, before any
# group exists, it binds the placeholder.
import torch.distributed.nn

from ..errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks; rank 0 is the one that writes files."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Group()


def init(device: str) -> tuple[Group, torch.device]:
    """The process group torchrun describes (NCCL on CUDA, gloo on CPU) and this rank's
    device; (SINGLE, the device) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA device")
    if world == 1:
        return SINGLE, torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"rank {rank} wants cuda:{local}, but torch sees "
                            f"{torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Group(rank, world), dev


def finish(group: Group) -> None:
    if group.world > 1:
        dist.destroy_process_group()


def barrier(group: Group) -> None:
    if group.world > 1:
        dist.barrier()


@contextmanager
def main_first(group: Group) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a file); the others run it after."""
    if not group.main:
        barrier(group)
    yield
    if group.main:
        barrier(group)


def gather(value: T, group: Group) -> list[T]:
    """Every rank's `value`, in rank order."""
    if group.world == 1:
        return [value]
    out: list[Any] = [None] * group.world
    dist.all_gather_object(out, value)
    return out


def interleave(parts: Sequence[Sequence[T]]) -> list[T]:
    """Undo `items[rank::world]`: parts[r][k] goes back to position r + world * k."""
    out: list[T] = []
    for k in range(max((len(p) for p in parts), default=0)):
        out += [p[k] for p in parts if k < len(p)]
    return out


def sharded(fn: Callable[..., list[Any]], group: Group) -> Callable[..., list]:
    """fn(items, *args), each rank taking every world-th item; every rank gets all results."""
    def run(items: list[T], *args: Any) -> list:
        return interleave(gather(fn(items[group.rank :: group.world], *args), group))
    return run


def agreed_max(value: float, group: Group) -> float:
    """The largest `value` over the ranks: a decision (stop, LR) they all take alike."""
    if group.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_parameters(module: torch.nn.Module, group: Group) -> None:
    """Rank 0's weights everywhere, so the replicas start equal whatever each one loaded."""
    if group.world > 1:
        for p in module.parameters():
            dist.broadcast(p.data, src=0)


def average_gradients(params: Sequence[torch.nn.Parameter], group: Group) -> None:
    """Mean of every rank's gradients, in one flat all-reduce."""
    if group.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]  # the same set on every rank
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= group.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def check_replicas(module: torch.nn.Module, group: Group) -> None:
    """Fail loudly if data parallelism let the replicas drift apart."""
    if group.world == 1:
        return
    digest = hashlib.sha256()
    for p in module.parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    if len(set(gather(digest.hexdigest(), group))) != 1:
        raise UserError("data-parallel replicas differ after training (a bug: please report)")


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
