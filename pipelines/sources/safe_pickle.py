"""Load an info `.pkl` without executing code: only numpy arrays/scalars and builtin containers.

`pickle.load` on a downloaded file runs whatever callable the file names (`os.system`, ...). An
EmbodiedScan info file is untrusted input, so the unpickler here resolves only the globals that
plain data needs: numpy's array/scalar/dtype reconstructors, `_codecs.encode` (how protocol-2 pickles,
mmengine's default, store bytes), a few builtin types and `collections.OrderedDict`. Anything else
raises `UnsafePickleError`, which names the file and the refused global.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

from pipelines.sources.common import SourceError

__all__ = ["UnsafePickleError", "ALLOWED_GLOBALS", "safe_load", "safe_loads"]

_BUILTIN_TYPES = ("set", "frozenset", "bytearray", "complex", "slice", "range", "list", "dict", "tuple", "int",
                  "float", "bool", "str", "bytes")
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),  # pickles written with numpy 1.x
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),  # numpy 2.x
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 out-of-band form
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol 2 stores bytes as _codecs.encode(str, "latin1")
        ("collections", "OrderedDict"),
    }
    # protocol < 3 writes builtins under their python 2 module name
    | {(m, n) for m in ("builtins", "__builtin__") for n in _BUILTIN_TYPES}
)


class UnsafePickleError(SourceError):
    """The pickle names a global outside the allow-list (it could run code when loaded)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh: io.BufferedIOBase, path: str):
        super().__init__(fh, encoding="latin1")  # latin1: numpy arrays from python-2 pickles
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            self._path,
            f"refusing to load global {module}.{name}: only numpy arrays/scalars and builtin containers are "
            "allowed in an info pickle (it could execute code)",
        )


def safe_loads(data: bytes, name: str = "<bytes>") -> Any:
    """Unpickle `data` with the allow-list; `name` is used in error messages."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), name).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, UnicodeDecodeError, ImportError) as exc:  # fmt: skip
        raise SourceError(name, f"not a readable pickle ({type(exc).__name__}: {exc}); truncated or corrupt?") from None


def safe_load(path: str | os.PathLike) -> Any:
    """Read and unpickle the file at `path` with the allow-list (raises `SourceError` naming it)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise SourceError(path, f"cannot read: {exc.strerror or exc}") from None
    return safe_loads(data, os.fspath(path))
