"""Atomic writes: a file is either its old or its new content, never partial (no heavy imports here).

Write a temporary file in the same folder, fsync it, ``os.replace`` it over the target (atomic on
POSIX); on any failure the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import json
import os
import tempfile

__all__ = ["fsync_dir", "atomic_write", "atomic_write_text", "atomic_write_json"]


def fsync_dir(folder) -> None:
    """fsync a folder so a rename in it survives a crash (best effort: some file systems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, mode: str = "w", newline: str | None = None) -> str:
    """``write(file)`` into a temporary file beside ``path``, fsync, ``os.replace``; returns ``path`` (its
    folder must exist). On any failure the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": newline})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
    return path


def atomic_write_text(path, text: str, newline: str | None = None) -> str:
    """Write ``text`` to ``path`` atomically; returns ``path`` (its folder must exist)."""
    return atomic_write(path, lambda fh: fh.write(text), "w", newline)


def atomic_write_json(path, obj, indent: int = 2) -> str:
    """``json.dump`` (plus a final newline) to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
