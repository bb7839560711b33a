"""One kind of error for bad user input, and the wrapper that reports it.

Bad input must give one clear line and exit code 2 (no traceback unless --debug),
so every entry point runs through `run_main`.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """Bad input: reported as one clear line, exit code 2."""


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a UserError becomes `error: <message>` on stderr and exit 2.

    `--debug` anywhere in argv re-raises so the full traceback shows.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        main(args)
    except UserError as e:
        if "--debug" in args:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
