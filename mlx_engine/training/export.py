"""Export a trained drafter as a z-lab checkpoint, and prove the files read back.

The checkpoint is config.json + safetensors shards below 16 MiB each (+ the HF index when
sharded), weights in float16 by default: half the bytes of float32, and a finer mantissa
than bfloat16 for weights that all sit far inside float16's range.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..reference.torch_drafter import SHARD_BYTES, TorchDFlashDrafter

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export_drafter(
    drafter: TorchDFlashDrafter,
    out_dir: Path,
    dtype: str = "float16",
    max_shard_bytes: int = SHARD_BYTES,
) -> TorchDFlashDrafter:
    """Write the checkpoint, reload it, check every tensor, and return the reloaded drafter."""
    if dtype not in DTYPES:
        raise UserError(f"export dtype {dtype!r} is not one of {sorted(DTYPES)}")
    files = drafter.save_pretrained(out_dir, DTYPES[dtype], max_shard_bytes)
    too_big = [f.name for f in files if f.stat().st_size >= max_shard_bytes]
    if too_big:
        raise UserError(f"exported shards {too_big} are not below {max_shard_bytes} bytes")
    device = next(drafter.parameters()).device
    reloaded = TorchDFlashDrafter.from_pretrained(out_dir, device=device)
    saved = reloaded.state_dict()
    for name, w in drafter.state_dict().items():
        if not torch.equal(saved[name], w.detach().to(DTYPES[dtype]).float()):
            raise UserError(f"exported tensor {name} does not read back equal")
    return reloaded.eval()


def checkpoint_bytes(out_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors"))
