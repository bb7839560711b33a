"""One kind of error for bad user input, and the wrapper that reports it.

Bad input must give one clear line and exit code 2 (no traceback unless --debug),
so every entry point runs through `run_main`; so do a full disk and a folder we may not
write (`write_fault`), which the atomic writers leave with nothing half-written.
"""
from __future__ import annotations

import errno
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence


class UserError(Exception):
    """Bad input: reported as one clear line, exit code 2."""


# Faults of the place a command writes to, not of the program: reported as one line, exit code 2.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)
_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")   # how safetensors' Rust writer reports one


def _os_error(e: BaseException) -> int | None:
    m = _OS_ERROR.search(str(e))
    return int(m.group(1) or m.group(2)) if m else None


def write_fault(e: BaseException) -> str | None:
    """One line for a full disk or a folder we may not write, from an OSError (or safetensors'
    error text, which carries only the OS error number); None for anything else."""
    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    if code is None:
        code = _os_error(e)
    where = getattr(e, "filename", None)
    target = f" while writing {where}" if where else ""
    if code in NO_SPACE:
        return f"no space left on device{target} (free some space and rerun: finished work is kept, a training continues with --resume)"
    if code in NO_PERMISSION:
        return f"permission denied{target} (the folder is read-only or not ours)"
    return None


@contextmanager
def writing(path) -> Iterator[None]:
    """Name `path` in a full-disk or permission fault raised while writing it (a temporary file
    beside it, or safetensors' writer, would name another path or none)."""
    try:
        yield
    except Exception as e:
        if write_fault(e) is None:
            raise
        code = getattr(e, "errno", None) if isinstance(e, OSError) else None
        raise OSError(code if code is not None else _os_error(e), str(e).splitlines()[0] if str(e) else "",
                      str(Path(path))) from e


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
    except Exception as e:
        line = write_fault(e)
        if line is None or "--debug" in args:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


def require_files(folder, what: str, *names: str) -> tuple[Path, ...]:
    """The paths folder/name, each of which must be a file: else one line, "<what> FOLDER: missing NAME"."""
    folder = Path(folder)
    paths = tuple(folder / n for n in names)
    for p in paths:
        if not p.is_file():
            raise UserError(f"{what} {folder}: missing {p.name}")
    return paths
