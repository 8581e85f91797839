"""JSON Schema files shipped in bridge/schemas: one loader, one error format for every caller."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator

MAX_REASON_CHARS = 200


@cache
def validator(name: str) -> Draft202012Validator:
    """The validator for `bridge/schemas/<name>.json`, checked once against the metaschema."""
    text = resources.files("bridge").joinpath("schemas", f"{name}.json").read_text("utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_errors(name: str, doc: Any) -> list[str]:
    """Every violation as `path: message`, sorted by path so reasons read the same on each run."""
    found = sorted(validator(name).iter_errors(doc), key=lambda e: [str(p) for p in e.path])
    return [_reason(e.path, e.message) for e in found]


def _reason(path: Any, message: str) -> str:
    where = ".".join(str(p) for p in path) or "<root>"
    if len(message) > MAX_REASON_CHARS:
        message = message[: MAX_REASON_CHARS - 3] + "..."
    return f"{where}: {message}"
