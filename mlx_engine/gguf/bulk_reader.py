"""llama.cpp's `GGUFReader`, with metadata arrays parsed in bulk.

The stock reader builds every element of an array field through its general `_get` path, so
Gemma's 262k-token vocabulary (tokens, scores, types) and its merges take a large share of a
conversion. This subclass builds the very same `ReaderField`s — one numpy view per scalar, a
length view and a bytes view per string, the same indices — with plain slices of the memory
map. Byte-swapped files and nested arrays take the stock path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType


class BulkGGUFReader(GGUFReader):
    def _get_field_parts(self, orig_offs: int, raw_type: int
                         ) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype = GGUFValueType(raw_itype[0])
        scalar = self.gguf_scalar_to_np.get(itype)
        if itype != GGUFValueType.STRING and scalar is None:
            return super()._get_field_parts(orig_offs, raw_type)
        raw = self.data.view(np.ndarray)  # plain slices: no memmap bookkeeping per element
        parts: list[Any] = [raw_itype, alen]
        offs, count = orig_offs + 12, int(alen[0])
        if itype == GGUFValueType.STRING:
            buf = memoryview(raw)
            for _ in range(count):
                size = int.from_bytes(buf[offs : offs + 8], "little")
                parts += (raw[offs : offs + 8].view(np.uint64), raw[offs + 8 : offs + 8 + size])
                offs += 8 + size
            data = list(range(3, 2 + 2 * count + 1, 2))
        else:
            width = np.dtype(scalar).itemsize
            parts += [raw[o : o + width].view(scalar)
                      for o in range(offs, offs + width * count, width)]
            offs += width * count
            data = list(range(2, 2 + count))
        types = [GGUFValueType.ARRAY, itype] if count else [GGUFValueType.ARRAY]
        return offs - orig_offs, parts, data, types
