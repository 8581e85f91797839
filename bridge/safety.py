"""What an untrusted string may look like before it can reach an argv list.

shell=False removes shell injection, not argument injection: a value starting with '-' is read as an
option, a '..' segment walks out of the workspace, invisible characters hide what a reviewer reads.
"""

from __future__ import annotations

import re
import unicodedata

from mlx_engine.errors import UserError

# Cc control, Cf format (bidi overrides, zero-width), Co private, Cs surrogates, Zl/Zp separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Zl", "Zp"})
_ABSOLUTE = re.compile(r"^([/\\~]|[A-Za-z]:[/\\])")


class Rejected(UserError):
    """Untrusted input refused; `reasons` lists every problem found, one line each."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(reasons))


def unsafe_reason(value: str) -> str | None:
    """Why `value` may not become an argument; None when it may (param patterns still apply)."""
    if any(unicodedata.category(ch) in _HIDDEN_CATEGORIES for ch in value):
        return "contains control or invisible characters"
    # Look-alikes normalise under NFKC (fullwidth '－' -> '-'); any dash may lead an option.
    norm = unicodedata.normalize("NFKC", value)
    if norm[:1] in ("-", "\u2212") or (value and unicodedata.category(value[0]) == "Pd"):
        return "starts with '-' (would be read as an option)"
    if "${" in norm:
        return "placeholders like ${ENV:NAME} are allowed only in preset files"
    if _ABSOLUTE.match(norm):
        return "absolute paths are not allowed"
    if ".." in re.split(r"[/\\]", norm):
        return "path traversal ('..') is not allowed"
    return None


PROTECTED = ("bridge", "presets", ".github")
# Code points HFS+ ignores in names (git's list for .git look-alikes): `bri\u200cdge` is `bridge`.
_IGNORED_BY_HFS = re.compile("[\u200c-\u200f\u202a-\u202e\u206a-\u206f\ufeff]")


def protected(path: str) -> bool:
    """Whether a changed path lies in the trusted dirs as a Mac's disk would see it: compared
    case-insensitively, after NFKC normalisation and without HFS+-ignored code points."""
    first = path.split("/", 1)[0]
    folded = unicodedata.normalize("NFKC", _IGNORED_BY_HFS.sub("", first)).casefold()
    return folded in PROTECTED
