"""The request manifest (.mac-bridge/request.json): untrusted data, checked against trusted presets.

Nothing in a manifest is ever executed or used as a path: it names a preset and fills typed params.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.presets import Preset, find_preset
from bridge.safety import Rejected, unsafe_reason
from bridge.schema import schema_errors

MANIFEST_PATH = ".mac-bridge/request.json"
MAX_MANIFEST_BYTES = 16 * 1024
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Request:
    request_id: str
    preset: Preset
    params: dict[str, Any]  # every param of the preset, typed, defaults filled in
    created_at: str
    requester: str
    base_sha: str


def load_request(data: bytes, presets: Mapping[str, Preset]) -> Request:
    """Parse and validate manifest bytes; Rejected carries every reason."""
    return validate(parse(data), presets)


def parse(data: bytes) -> Any:
    """Strict JSON: bounded size, UTF-8, no duplicate keys (smuggling), no NaN/Infinity."""
    check_size(len(data))
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys,
                          parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise Rejected(["manifest is not UTF-8"]) from None
    except RecursionError:
        raise Rejected(["manifest nests too deeply"]) from None
    except ValueError as exc:
        raise Rejected([f"manifest is not valid JSON: {exc}"]) from None


def check_size(size: int) -> None:
    """Refuse an oversize manifest before reading it."""
    if size > MAX_MANIFEST_BYTES:
        raise Rejected([f"manifest is {size} bytes; the limit is {MAX_MANIFEST_BYTES}"])


def validate(doc: Any, presets: Mapping[str, Preset]) -> Request:
    if errors := schema_errors("request.v1", doc):
        raise Rejected(errors)
    if reasons := [f"{where}: {why}" for where, value in _strings(doc)
                   if (why := unsafe_reason(value))]:
        raise Rejected(reasons)
    preset = find_preset(presets, doc["preset"])
    if preset is None:
        raise Rejected([f"preset: unknown preset {doc['preset']!r}"])
    # The name as the request gives it: a former name (presets.RENAMED) names its ids too.
    if not doc["request_id"].startswith(f"{doc['preset']}-"):
        raise Rejected([f"request_id: must start with the preset name {doc['preset']!r}"])
    return Request(
        request_id=doc["request_id"],
        preset=preset,
        params=preset.resolve_params(doc["params"]),
        created_at=doc["created_at"],
        requester=doc["requester"],
        base_sha=doc["base_sha"],
    )


def dump(doc: Mapping[str, Any]) -> bytes:
    """The canonical manifest bytes the client commits."""
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _strings(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(path, value) for every string a schema-valid manifest holds, keys included."""
    found = [(k, v) for k, v in doc.items() if isinstance(v, str)]
    for key, value in doc["params"].items():
        found.append(("params", key))
        if isinstance(value, str):
            found.append((f"params.{key}", value))
    return found


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if dup := sorted({k for k in keys if keys.count(k) > 1}):
        raise ValueError(f"duplicate key {dup[0]!r}")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")
