"""Preemption-safe checkpoints of a training state with orbax, verified on restore.

`Checkpointer` keeps the last ``keep`` checkpoints of a pytree state plus a
JSON dict of metadata (step, data position, config). Orbax writes each
checkpoint to a temporary folder and renames it when complete, so a process
killed mid-save leaves no checkpoint folder that orbax lists.

What is verified: once orbax has finished ``<step>/``, a checksum manifest
``<step>/lorajax_checksums.json`` is written last (atomically): the step and
the SHA-256 and size of every file under the folder. A checkpoint is *valid*
when its manifest exists and names its folder's step, every file it lists is
there with that size and hash (a missing, truncated or changed file, one
flipped bit, is caught), orbax restores it without an error, and the
metadata's ``"step"`` (when present) equals the folder's step. Files not in the
manifest are ignored (orbax reads only the files it wrote, which are listed).

What happens on corruption: `restore` walks from the newest checkpoint to
older ones and restores the newest valid one; for each invalid one it skips it
emits one `UserWarning` line (``checkpoint 36 in DIR is invalid (checksum
mismatch in state/...): restoring 30; moved aside to DIR/invalid-36-0``). The
skipped folders are renamed to ``invalid-<step>-<n>`` (nothing is deleted; orbax
ignores these names), so they are neither picked up again nor counted by the
``keep`` rotation, which would otherwise delete the good checkpoint. When no
checkpoint is valid, `restore` raises `CheckpointError` naming each one and
what is wrong with it, and moves nothing.

A kill after orbax's rename but before the manifest is written leaves a
checkpoint without a manifest: it is treated as invalid (the previous one is
restored).

Example:
  >>> import tempfile, jax.numpy as jnp
  >>> from lorajax.train.checkpoint import Checkpointer
  >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep=2)
  >>> ckpt.save(10, {"w": jnp.ones(3)}, {"seen": 320})
  >>> state, meta = ckpt.restore({"w": jnp.zeros(3)})
  >>> ckpt.latest_step(), meta["seen"], float(state["w"].sum())
  (10, 320, 3.0)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lorajax import atomic

__all__ = ["Checkpointer", "CheckpointError", "MANIFEST"]

MANIFEST = "lorajax_checksums.json"  # in each ``<step>/`` folder, written after orbax's files


class CheckpointError(ValueError):
    """No valid checkpoint to restore (each one named with what is wrong with it)."""


class Checkpointer:
    """Save / restore ``(state pytree, metadata dict)`` under ``directory/<step>/``, checksummed."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True),
        )

    def all_steps(self) -> list[int]:
        """The steps of all checkpoint folders orbax lists (valid or not), ascending."""
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The newest step whose files match its checksum manifest, or None (moves and warns nothing)."""
        for step in reversed(self.all_steps()):
            if verify_files(self._step_dir(step), step) is None:
                return step
        return None

    def save(self, step: int, state: Any, meta: dict | None = None) -> None:
        """Write a checkpoint (blocking; an existing one of the same step is replaced), then its manifest.

        Older checkpoints beyond ``keep`` are deleted.
        """
        self._mgr.reload()
        if step in self._mgr.all_steps():
            self._mgr.delete(step)
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_without_empty(state)), meta=ocp.args.JsonSave(meta or {})
            ),
            force=True,
        )
        self._mgr.wait_until_finished()
        if jax.process_index() == 0:
            write_manifest(self._step_dir(step), step)
        _sync("lorajax_checkpoint_manifest")

    def restore(
        self, like: Any, step: int | None = None, *, check: Callable[[Any, dict, int], None] | None = None
    ) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step`` (default: the newest valid one); ``like`` gives the structure and dtypes.

        Each array comes back placed like its ``like`` leaf: with its sharding,
        or uncommitted where that leaf is (e.g. a step count or an optimiser
        count made by ``jnp.zeros`` beside arrays split over a mesh: a jitted
        step then places it with the others, as before the save).

        Args:
          like: a tree of the state's structure (arrays or shape/dtype structs).
          step: a given step: restored if valid, else `CheckpointError` (no fallback, nothing moved).
            None: the newest valid checkpoint; newer invalid ones are warned about and moved aside
            (see the module doc).
          check: ``check(state, meta, step)`` raising ``ValueError`` when a restored
            checkpoint is inconsistent (e.g. ``state.step != step``): it then counts as invalid.

        Raises:
          CheckpointError: no valid checkpoint (or ``step`` is not valid); the message names each
            checkpoint tried and what is wrong with it. FileNotFoundError: no checkpoint at all.
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} (there are {steps})")
            steps = [step]
        problems: list[tuple[int, str]] = []
        for s in reversed(steps):
            problem = verify_files(self._step_dir(s), s)
            if problem is None:
                problem, restored = self._try_restore(like, s, check)
                if restored is not None:
                    self._set_aside(problems, s)
                    return restored
            problems.append((s, problem))
        listed = "; ".join(f"{s} ({p})" for s, p in problems)
        raise CheckpointError(
            f"no valid checkpoint in {self.directory}: {listed}. "
            "Move the folder aside to start from scratch, or restore its files."
        )

    def close(self) -> None:
        self._mgr.close()

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _restore_step(self, like: Any, step: int) -> tuple[Any, dict]:
        like_saved = _without_empty(like)
        out = self._mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(jax.tree.map(_host_if_uncommitted, like_saved)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state = jax.tree.map(lambda ref, x: jnp.asarray(x) if _uncommitted(ref) else x, like_saved, out["state"])
        return _with_empty(state, like), dict(out["meta"])

    def _try_restore(
        self, like: Any, step: int, check: Callable[[Any, dict, int], None] | None
    ) -> tuple[str, tuple[Any, dict] | None]:
        """``("", (state, meta))``, or ``(what went wrong, None)``."""
        try:
            state, meta = self._restore_step(like, step)
        except Exception as e:  # orbax / tensorstore on a malformed file
            return f"orbax restore failed: {_one_line(e)}", None
        if meta.get("step", step) != step:
            return f"its metadata says step {meta['step']!r}", None
        if check is not None:
            try:
                check(state, meta, step)
            except ValueError as e:
                return _one_line(e), None
        return "", (state, meta)

    def _set_aside(self, problems: list[tuple[int, str]], restored: int) -> None:
        """Move the invalid checkpoints newer than ``restored`` to ``invalid-<step>-<n>`` and warn, one line each."""
        for s, problem in problems:
            dest = _free_name(self.directory, s)
            if jax.process_index() == 0:
                os.replace(self._step_dir(s), dest)
            warnings.warn(
                f"checkpoint {s} in {self.directory} is invalid ({problem}): restoring {restored}; "
                f"moved aside to {dest}",
                stacklevel=3,
            )
        if problems:
            _sync("lorajax_checkpoint_set_aside")
            self._mgr.reload()


def _free_name(directory: Path, step: int) -> Path:
    n = 0
    while (directory / f"invalid-{step}-{n}").exists():
        n += 1
    return directory / f"invalid-{step}-{n}"


def _one_line(e: BaseException) -> str:
    """``e`` as one line of at most ~300 characters."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 300 else text[:297] + "..."


def _sync(name: str) -> None:
    """Wait for every process (multi-host), so that none reads a folder the main process is still writing."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: Path) -> list[Path]:
    """The files of a checkpoint folder: all but the manifest (and its temporary while being written)."""
    ours = (step_dir / MANIFEST, *step_dir.glob(f".{MANIFEST}.tmp-*"))
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p not in ours)


def write_manifest(step_dir: str | os.PathLike, step: int) -> None:
    """Write ``step_dir/lorajax_checksums.json``: ``step`` and the SHA-256 and size of every file under it."""
    step_dir = Path(step_dir)
    files = {
        p.relative_to(step_dir).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size} for p in _files(step_dir)
    }
    atomic.write_text(step_dir / MANIFEST, json.dumps({"format": 1, "step": step, "files": files}, indent=1) + "\n")


def verify_files(step_dir: str | os.PathLike, step: int) -> str | None:
    """What is wrong with the files of checkpoint ``step`` in ``step_dir`` (one phrase), or None if they match.

    Checks the manifest (present, valid JSON, for ``step``) and every file it lists (present, same size, same SHA-256).
    """
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    if not path.is_file():
        return f"no checksum manifest {MANIFEST}: the save did not finish, or the file was deleted"
    try:
        manifest = json.loads(path.read_text())
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"unreadable checksum manifest {MANIFEST} ({type(e).__name__}: {e})"
    if manifest.get("step") != step:
        return f"its checksum manifest is for step {manifest.get('step')!r}"
    for rel, want in listed.items():
        f = step_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"checksum manifest names a file outside the checkpoint: {rel!r}"
        if not f.is_file():
            return f"missing file {rel}"
        size = f.stat().st_size
        if size != want.get("size"):
            return f"size mismatch in {rel}: {size} bytes, {want.get('size')} expected (truncated?)"
        if _sha256(f) != want.get("sha256"):
            return f"checksum mismatch in {rel}"
    return None


def _uncommitted(x: Any) -> bool:
    return isinstance(x, jax.Array) and not x.committed


def _host_if_uncommitted(x: Any) -> Any:
    """The restore template of a leaf: a host array where ``x`` is an uncommitted device array."""
    return np.empty(x.shape, x.dtype) if _uncommitted(x) else x


def _is_empty(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and int(np.prod(x.shape)) == 0


def _without_empty(tree: Any) -> Any:
    """Zero-size arrays (e.g. optax GaLore's placeholders) as None: orbax refuses to save them."""
    return jax.tree.map(lambda x: None if _is_empty(x) else x, tree)


def _with_empty(tree: Any, like: Any) -> Any:
    """Put the zero-size arrays of ``like`` back where `_without_empty` left None."""
    return jax.tree.map(
        lambda ref, x: jnp.zeros(ref.shape, ref.dtype) if _is_empty(ref) else x, like, tree, is_leaf=lambda x: x is None
    )
