"""The `gr3d` exit codes and the one-line input error every command reports the same way.

Exit codes (README "Exit codes"): 0 done; 1 a check ran and found problems (`shards verify`, a failed
build step the command reports); 2 bad usage or an input that is missing or unreadable (argparse uses 2
for usage errors too, so a user's script needs one test for "I called it wrong"); 130 interrupted.

A command raises `InputError` (or lets a `FileNotFoundError` / `PermissionError` / `IsADirectoryError` /
`NotADirectoryError` with a file name escape); `pipelines.cli.main` prints it as ONE line on stderr,
`gr3d COMMAND: error: FILE: reason`, and exits `EXIT_USAGE`. No traceback for a user's typo.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "InputError", "input_error_line",
           "require_dir", "require_file"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_OS_INPUT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class InputError(Exception):
    """A missing or unreadable input: the message names the file and says what is wrong, on one line."""


def require_file(path: str | os.PathLike[str], what: str = "input file") -> Path:
    """`path` as a Path if it is a readable file, else InputError naming it."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: {what} not found")
    if not p.is_file():
        raise InputError(f"{p}: {what} is not a file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{p}: {what} is not readable")
    return p


def require_dir(path: str | os.PathLike[str], what: str = "directory") -> Path:
    """`path` as a Path if it is a directory, else InputError naming it."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: {what} not found")
    if not p.is_dir():
        raise InputError(f"{p}: {what} is not a directory")
    return p


def input_error_line(exc: BaseException) -> str | None:
    """The one-line message for an input error, or None if `exc` is not one (a real bug keeps its traceback)."""
    if isinstance(exc, InputError):
        return " ".join(str(exc).split())
    if isinstance(exc, _OS_INPUT_ERRORS) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    return None
