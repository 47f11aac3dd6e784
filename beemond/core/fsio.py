"""Crash-safe files: temporary name, write, flush, ``fsync``, ``rename``, ``fsync`` the directory.

A power cut at any line leaves either the old file or the new one, never a torn one. A leftover
temporary file (``.NAME.tmp-PID``, :data:`TMP_MARK`) is skipped by every reader (:func:`is_internal`)
and removed at the next start (:func:`remove_stale_temps`). Stdlib only: the orchestrator, the
forkserver and the lab import it.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator

TMP_MARK = ".tmp-"


_STALE_TEMP_RE = re.compile(r"^\..+" + re.escape(TMP_MARK) + r"\d+$")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or unlink in *path* durable (POSIX leaves it in the directory's page cache)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(final: str | os.PathLike, mode: str = "wb", *, sync_dir: bool = True, **open_kw) -> Iterator[Any]:
    """Open a temporary file beside *final*; on clean exit fsync and rename it into place.

    On an exception the temporary file is removed and *final* is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")
    f = open(tmp, mode, **open_kw)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, final)
        if sync_dir:
            fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()   # flushes what the failed write left buffered: fails again on a full disk
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def temp_name(directory: Path, hint: str) -> Path:
    """A temporary name in *directory* that every reader skips and crash clean-up removes."""
    return directory / f".{hint}{TMP_MARK}{os.getpid()}"


def is_internal(name: str) -> bool:
    """True for names readers must skip: temporary files and hidden files."""
    return name.startswith(".")


def remove_stale_temps(root: Path) -> int:
    """Remove temporary files left by a crash under *root* (only ours: ``.NAME.tmp-PID``)."""
    removed = 0
    if not root.exists():
        return 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if _STALE_TEMP_RE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
    return removed
