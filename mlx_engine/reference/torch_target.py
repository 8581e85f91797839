"""The target (verifier) in torch: any transformers causal LM, seen the way DFlash sees it.

A drafter needs four things from its target: a plain embedding lookup, the raw output head,
the hidden states of a few decoder layers ("taps"), and greedy continuations to learn from.
Taps are read with forward hooks on the decoder layers, so they are each layer's output
before the final norm whatever `output_hidden_states` does in a given transformers version.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import UserError

MAX_BATCH_TOKENS = 1 << 18  # prompt tokens a generation batch holds (long prompts: fewer rows)


def _find_gguf(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def load_tokenizer(path: str | Path) -> Any:
    """The target's tokenizer: from an HF/mlx-lm dir, or built from a GGUF's metadata."""
    from transformers import AutoTokenizer

    path = Path(path)
    gguf_file = _find_gguf(path)
    try:
        if gguf_file is not None:
            return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {path}: {exc}".splitlines()[0]) from None


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Temporarily set float32 matmul precision ('highest' = true fp32, 'high' = TF32)."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


@dataclass
class TargetModel:
    """An HF causal LM with DFlash's view of it; frozen (no grads, eval mode)."""

    model: nn.Module

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        self.layers = _decoder_layers(self.model)

    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.embed_weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.embed_weight.shape[0])

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain embedding lookup, without any model-specific scale (the drafter's input)."""
        return F.embedding(ids, self.embed_weight)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Output projection without the target's own soft-cap (what the drafter reuses)."""
        return self.model.get_output_embeddings()(h)

    @torch.no_grad()
    def forward_with_taps(
        self, ids: torch.Tensor, layer_ids: Sequence[int], with_logits: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits [b, L, V] or None, taps [b, L, n_taps*H]) of one full forward over ids."""
        bad = [i for i in layer_ids if not 0 <= i < self.num_layers]
        if bad:
            raise UserError(f"tap layers {bad} are not < target layers {self.num_layers}")
        outputs: dict[int, torch.Tensor] = {}

        def hook(index: int) -> Callable[..., None]:
            def record(_m: nn.Module, _a: Any, out: Any) -> None:
                outputs[index] = out[0] if isinstance(out, tuple) else out

            return record

        handles = [self.layers[i].register_forward_hook(hook(i)) for i in set(layer_ids)]
        try:
            if with_logits:
                logits = self.model(input_ids=ids, use_cache=False).logits
            else:
                self.model.get_decoder()(input_ids=ids, use_cache=False)
                logits = None
        finally:
            for h in handles:
                h.remove()
        return logits, torch.cat([outputs[i] for i in layer_ids], dim=-1)

    def taps(self, ids: torch.Tensor, layer_ids: Sequence[int]) -> torch.Tensor:
        return self.forward_with_taps(ids, layer_ids, with_logits=False)[1]

    @torch.no_grad()
    def greedy_continue(
        self,
        prompts: Sequence[Sequence[int]],
        n_new: int,
        batch_size: int = 64,
        eos_ids: Sequence[int] = (),
        progress: bool = True,
        deadline: float | None = None,
    ) -> list[list[int] | None]:
        """The target's own greedy continuation of each prompt: n_new tokens or up to an EOS.

        Prompts are batched in order of length, so most batches hold one length and need no
        padding (prompts of natural lengths, chat requests, are left-padded and masked); long
        prompts batch fewer rows (MAX_BATCH_TOKENS). The matmuls run in true fp32 where the
        weights are fp32, like the CPU verifier. Batches run in a fixed shuffled order, so a
        `deadline` (`time.monotonic()`, after which no new batch starts and the prompts left
        over get None) drops prompts of every length alike.
        """
        chunks = _length_batches([len(p) for p in prompts], batch_size)
        eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=self.device)
        out: list[list[int] | None] = [None] * len(prompts)
        with matmul_precision("highest"):
            for chunk in tqdm(chunks, desc="greedy continuations", disable=not progress):
                if deadline is not None and time.monotonic() > deadline:
                    break
                new = self._greedy_batch([prompts[i] for i in chunk], n_new, eos)
                for row, i in zip(new.tolist(), chunk, strict=True):
                    out[i] = _cut_at_eos(row, eos_ids)
        return out

    def _greedy_batch(
        self, prompts: list[Sequence[int]], n_new: int, eos: torch.Tensor
    ) -> torch.Tensor:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts],
                           device=self.device)
        padded = any(len(p) < width for p in prompts)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)

        cache_arg = _cache_argument(self.model)

        def step(x: torch.Tensor, past: Any = None, **kw: Any) -> Any:
            extra = {"attention_mask": mask, "position_ids": pos} if padded else {}
            return self.model(input_ids=x, use_cache=True, **{cache_arg: past}, **kw, **extra)

        res = step(ids, logits_to_keep=1)
        tokens = [res.logits[:, -1].argmax(-1)]
        done = torch.isin(tokens[-1], eos)
        for _ in range(n_new - 1):
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            pos = pos[:, -1:] + 1
            res = step(tokens[-1][:, None], res[cache_arg])
            tokens.append(res.logits[:, -1].argmax(-1))
            done |= torch.isin(tokens[-1], eos)
        return torch.stack(tokens, dim=1)


def _cache_argument(model: nn.Module) -> str:
    """The KV cache's name in `forward` and its output: `cache` in newer transformers (5.25
    has it; `past_key_values` there warns and goes in 5.40), `past_key_values` in older ones
    (5.17 has only that, and would swallow `cache` in its **kwargs)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches: sorted by length, at most batch_size rows and about
    MAX_BATCH_TOKENS prompt tokens each, in a fixed shuffled order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        rows = min(batch_size, max(1, MAX_BATCH_TOKENS // lengths[i]))
        if not chunks or len(chunks[-1]) >= rows:
            chunks.append([])
        chunks[-1].append(i)
    random.Random(0).shuffle(chunks)
    return chunks


def _cut_at_eos(row: list[int], eos_ids: Sequence[int]) -> list[int]:
    for j, t in enumerate(row):
        if t in eos_ids:
            return row[: j + 1]
    return row


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def load_target(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TargetModel:
    """A local causal LM: an HF/mlx-lm dir (config.json + safetensors) or a Gemma 3 GGUF."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"target {path} does not exist")
    gguf_file = _find_gguf(path)
    if gguf_file is not None:
        from .gguf_gemma3 import load_gemma3_gguf

        model = load_gemma3_gguf(gguf_file, dtype)
    elif (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot load target {path}: {exc}".splitlines()[0]) from None
    else:
        raise UserError(f"target {path} is neither a model dir with config.json nor a .gguf file")
    return TargetModel(model.to(device))
