"""Atomic writes: a file or a folder appears whole under its name, or not at all.

A process killed mid-write (preemption, OOM, ``kill -9``) leaves either the
old content or the new one under the final name, never a half-written mix:
everything is written under a temporary sibling name (same folder, hence same
file system), flushed to disk, then renamed into place (``os.replace`` is atomic
on POSIX). Left-over temporaries of killed writers are named ``.<name>.tmp-*``
and are removed by the next write of the same name.

Example:
  >>> import tempfile, pathlib
  >>> from lorajax import atomic
  >>> d = pathlib.Path(tempfile.mkdtemp())
  >>> atomic.write_text(d / "results.md", "# done\\n")
  >>> with atomic.directory(d / "export") as tmp:
  ...     _ = (tmp / "config.json").write_text("{}")
  >>> sorted(p.name for p in d.iterdir())
  ['export', 'results.md']
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["write_bytes", "write_text", "directory", "temporary_name"]


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary sibling of ``path`` (``.<name>.tmp-<random>``), removed by later writes of ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def _clean_stale(path: Path) -> None:
    """Remove the temporaries that killed writers of ``path`` left behind."""
    if not path.parent.exists():
        return
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (the parent folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def directory(path: str | os.PathLike) -> Iterator[Path]:
    """``with directory(out) as tmp:`` write the folder's files into ``tmp``; on success it becomes ``out``.

    An existing ``out`` is replaced only once the new folder is complete (it is
    moved aside, the new one renamed in, the old one deleted; a kill between the
    two renames leaves the old folder under ``.<name>.tmp-*`` and no ``out``,
    never a mix). On an exception the temporary folder is removed and ``out``
    is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists() or path.is_symlink():
            old = temporary_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
