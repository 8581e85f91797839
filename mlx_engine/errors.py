"""One error type for bad user input, so every CLI can print one line and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

EXIT_USAGE = 2

F = TypeVar("F", bound=Callable[..., int])


class UserError(Exception):
    """A problem the user can fix (bad path, mismatched models, bad flag): no traceback."""


def cli_entry(main: F) -> F:
    """Wrap a CLI `main(argv) -> int` so a UserError prints one line and exits with 2."""

    @wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper  # type: ignore[return-value]
