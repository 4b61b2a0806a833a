"""Write-then-rename helpers: a killed job never leaves a half artifact that looks whole.

An artifact is written under a temporary sibling name (``.<name>.tmp-<random>``) and renamed onto its
final name only once complete, so a job killed mid-write (SIGKILL, a lost node) leaves at most such a
temporary file or folder, never a half file under the final name; the next write of the same artifact
removes those leftovers. A write that fails because its folder is not writable or its disk is full
raises an OSError (PermissionError for a permission problem) whose message names the artifact, the
folder and the remedy; nothing is left under either name.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"
# errno values that mean "this folder cannot be written" and "this disk is full".
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
NO_SPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def temporary_name(final: str | os.PathLike) -> Path:
    """A fresh temporary sibling name for ``final``: ``.<name>.tmp-<8 hex digits>``."""
    final = Path(final)
    return final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")


def leftovers(final: str | os.PathLike) -> list[Path]:
    """Temporary siblings of ``final`` that earlier writes never renamed (their job was killed)."""
    final = Path(final)
    return sorted(final.parent.glob(f".{glob.escape(final.name)}{TMP_MARK}*"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _concerns(exc: OSError, final: Path, tmp: Path) -> bool:
    """Whether ``exc`` is about writing ``final``: it names no file (a failed write()), or names ``tmp``
    or something inside it, ``final`` or a folder above it (a failed mkdir)."""
    if exc.filename is None:
        return True
    name = Path(os.path.abspath(os.fsdecode(exc.filename)))
    final, tmp = Path(os.path.abspath(final)), Path(os.path.abspath(tmp))
    return name in (final, tmp) or name in final.parents or tmp in name.parents


def write_error(final: str | os.PathLike, exc: OSError) -> OSError | None:
    """The error to raise instead of ``exc`` when writing ``final`` failed because its folder is not
    writable or its disk is full: an OSError of the same errno (so a PermissionError for EACCES/EPERM)
    naming ``final``, its nearest existing folder and the remedy. None for any other failure."""
    final = Path(final)
    folder = next((p for p in final.parents if p.is_dir()), final.parent)  # the one that exists
    if exc.errno in NOT_WRITABLE:
        why = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
        advice = (f"the folder {folder} is not writable ({why}); make it writable, or set `out` to a "
                  f"writable folder, and rerun")
    elif exc.errno in NO_SPACE:
        advice = (f"no space left on the device holding {folder} (disk full or quota exceeded); "
                  f"free some space and rerun")
    else:
        return None
    return OSError(exc.errno, f"cannot write {final}: {advice}. Nothing was written under that name "
                              f"(cause: {exc})")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``final`` (file or folder).

    Leftovers of earlier writes of ``final`` that never finished are removed first. On an exception the
    temporary path is removed and ``final`` is left untouched; a folder that is not writable or a full
    disk raises :func:`write_error`'s OSError instead of the bare one.
    """
    final = Path(final)
    tmp = temporary_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for old in leftovers(final):
            _remove(old)
        yield tmp
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        error = write_error(final, exc) if _concerns(exc, final, tmp) else None
        if error is None:
            raise
        raise error from exc
    finally:
        _remove(tmp)
