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
import glob
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["write_bytes", "write_text", "directory", "temporary_name"]


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary sibling of ``path`` (``.<name>.tmp-<random>``), removed by later writes of ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def _old_name(path: Path) -> Path:
    """Where `directory` moves the folder it replaces, for the instant between its two renames."""
    return path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:12]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean_stale(path: Path) -> None:
    """Remove the temporaries that killed writers of ``path`` left behind.

    A writer killed between `directory`'s two renames leaves no ``path`` but
    the complete old folder as ``.<name>.old-*``: it is renamed back first.
    """
    if not path.parent.exists():
        return
    pattern = glob.escape(path.name)
    olds = sorted(path.parent.glob(f".{pattern}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not (path.exists() or path.is_symlink()):
        os.replace(olds.pop(), path)
    for stale in [*path.parent.glob(f".{pattern}.tmp-*"), *olds]:
        _remove(stale)


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


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` as ``dst`` (no bytes copied), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry(src: Path, dst: Path) -> None:
    """Put the entry ``src`` of the old folder at ``dst`` in the new one (files hard-linked, links as links)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(dst))


@contextlib.contextmanager
def directory(path: str | os.PathLike, *, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """``with directory(out) as tmp:`` write the folder's files into ``tmp``; on success it becomes ``out``.

    An existing ``out`` is replaced only once the new folder is complete (it is
    moved aside as ``.<name>.old-*``, the new one renamed in, the old one
    deleted; a kill between the two renames leaves no ``out`` and the old
    folder aside, which the next write of ``out`` renames back before it
    starts: never a mix). On an exception the temporary folder is removed and
    ``out`` is untouched.

    Args:
      path: the folder. If it is a symbolic link, the folder it points to is
        replaced and the link kept. An existing ``path`` that is not a folder
        raises NotADirectoryError (a file is never replaced by a folder); the
        working folder or one above it raises ValueError.
      keep: ``keep(name) -> bool`` for the entries of the existing folder that
        the new content does not have: those it accepts are carried into the
        new folder (hard links, else copies; sub-folders whole), the others are
        dropped with the old folder. None (default) carries nothing.

    Note:
      Writers of the same ``out`` must not run concurrently (each removes the
      other's temporaries); entries created in the old folder while the new
      one is written are not carried.
    """
    path = Path(os.path.abspath(path))  # "." and ".." get a name
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder: refusing to replace it by a folder")
    cwd = Path.cwd().resolve()
    if path.resolve() == cwd or path.resolve() in cwd.parents:
        raise ValueError(f"{path} holds the working folder, which cannot be replaced: write to a sub-folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.is_dir():
            shutil.copymode(path, tmp)  # the folder keeps its permissions (e.g. mkdtemp's 0700)
        if keep is not None and path.is_dir():
            for entry in sorted(path.iterdir()):
                if not (tmp / entry.name).exists() and not (tmp / entry.name).is_symlink() and keep(entry.name):
                    _carry(entry, tmp / entry.name)
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists() or path.is_symlink():
            old = _old_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
