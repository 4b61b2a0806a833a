"""Reading pickle files of outside origin (the RefCOCO ``refs(*).p`` files, the release's Co-DETR
results) without running code they might carry.

``pickle.load`` calls whatever callable a pickle names (``os.system`` included), so these files are
read with a :class:`pickle.Unpickler` whose ``find_class`` admits a fixed table of names and refuses
every other one with :class:`UnsafePickleError`, before anything is called. What the table holds:

- By default, only what plain values need: dicts, lists, tuples, str, int, float, bool, None and, from
  protocol 3 on, bytes need no name at all; below protocol 3, Python 3 writes ``bytes`` as
  ``_codecs.encode(<text>, "latin1")`` (empty bytes as ``bytes()``) and, below protocol 4, sets as
  ``set([...])`` / ``frozenset([...])``. Those four names are admitted, each as a stand-in that only
  rebuilds that value (``_codecs.encode`` only with the latin-1 codec, ``bytes`` only without an
  argument).
- With ``allow_numpy``, also what numpy arrays and numpy scalars of any non-object dtype are rebuilt
  from: ``numpy.ndarray``, ``numpy.dtype`` and ``_reconstruct`` / ``scalar`` of
  ``numpy.core.multiarray`` (numpy 1 writes that name) or ``numpy._core.multiarray`` (numpy 2), and
  ``_frombuffer`` of ``numpy.core.numeric`` / ``numpy._core.numeric`` (protocol 5). Each name maps
  to the installed numpy's object directly, so numpy-1 pickles load under numpy 2 without its
  ``numpy.core`` deprecation warning. An object-dtype array stores its elements as ordinary pickled
  objects: they pass through the same ``find_class``, so plain values load and any class is refused.

Python 2 pickles (the RefCOCO files were written by Python 2 with protocol 2): a Python 2 ``unicode``
(opcode BINUNICODE) is always UTF-8 and loads as ``str`` whatever the settings; a Python 2 ``str``
(opcodes STRING, BINSTRING, SHORT_BINSTRING) is bytes of unstated encoding and is decoded here as
UTF-8, strictly. ASCII text (every Python 2 ``str`` of the RefCOCO files: Python 3's default ASCII
decoding loads them, as GLaMM's and the release's loaders do) decodes the same as with the default;
UTF-8 text decodes correctly where ``latin1`` would silently turn it into mojibake; bytes that are not
UTF-8 stop the load with :class:`PickleFileError` rather than becoming wrong text. The price: numpy
arrays pickled by Python 2 (their data is a Python 2 ``str``) do not load; no file read here is one.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# How a Python 2 `str` (bytes of unstated encoding) is decoded; see the module docstring.
PY2_STR_ENCODING = "utf-8"


class PickleFileError(ValueError):
    """A pickle file is missing, unreadable, malformed or refused; the message names the file."""


class UnsafePickleError(PickleFileError):
    """A pickle file names a global (class or function) outside the admitted table; the message names
    the global as ``module.name`` and the file."""


def _numpy_module(name: str) -> Any:
    """``numpy._core.<name>`` (numpy 2) or, on numpy 1, ``numpy.core.<name>``."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The names numpy arrays and scalars are pickled under -> the installed numpy's objects."""
    multiarray, numeric = _numpy_module("multiarray"), _numpy_module("numeric")
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` answers from a fixed table (see the module docstring)."""

    def __init__(self, file: Any, where: str, allow_numpy: bool) -> None:
        super().__init__(file, encoding=PY2_STR_ENCODING, errors="strict")
        self._where = where
        self._globals: dict[tuple[str, str], Any] = {}
        for builtins in ("builtins", "__builtin__"):   # Python 3 writes __builtin__ below protocol 3
            self._globals[(builtins, "set")] = set
            self._globals[(builtins, "frozenset")] = frozenset
            self._globals[(builtins, "bytes")] = self._empty_bytes
        self._globals[("_codecs", "encode")] = self._latin1_bytes
        if allow_numpy:
            self._globals.update(_numpy_globals())

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._where}: refused to load the global {module}.{name} (a class or function the "
                "pickle would call; only plain values and, where allowed, numpy arrays are admitted)"
            ) from None

    def _latin1_bytes(self, text: Any, encoding: Any) -> bytes:
        """``_codecs.encode(text, "latin1")``: how Python 3 writes non-empty bytes below protocol 3."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise UnsafePickleError(f"{self._where}: refused _codecs.encode with codec {encoding!r} (only "
                                    "latin1, which rebuilds bytes, is admitted)")
        return text.encode("latin-1")

    @staticmethod
    def _empty_bytes() -> bytes:
        """``bytes()``: how Python 3 writes empty bytes below protocol 3."""
        return b""


def load_pickle(path: str | os.PathLike, what: str, allow_numpy: bool = False) -> Any:
    """The object pickled in the file ``path``, read without calling anything outside the admitted
    table (see the module docstring; ``allow_numpy`` adds numpy arrays and scalars).

    ``what`` names the file's kind in messages (``"<what> <path>: ..."``, e.g. ``"RefCOCO refs"``).
    Raises :class:`UnsafePickleError` for a refused global (nothing of it is called) and
    :class:`PickleFileError` for a missing or unreadable file, a file that is not a (complete)
    pickle, or a Python 2 ``str`` that is not UTF-8.
    """
    path = Path(path)
    where = f"{what} {path}"
    if not path.is_file():
        raise PickleFileError(f"{what} file not found: {path}")
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, where, allow_numpy).load()
    except UnsafePickleError:
        raise
    except UnicodeDecodeError as exc:
        raise PickleFileError(f"{where}: a Python 2 str is not {PY2_STR_ENCODING} text ({exc})") from None
    except OSError as exc:
        raise PickleFileError(f"{where}: cannot be read ({exc})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError) as exc:
        raise PickleFileError(f"{where} is not a valid pickle: {type(exc).__name__}: {exc}") from None
