"""Preemption-safe checkpoints of a training state with orbax.

`Checkpointer` keeps the last ``keep`` checkpoints of a pytree state plus a
JSON dict of metadata (step, data position, config). Orbax writes each
checkpoint to a temporary folder and renames it when complete, so a process
killed mid-save leaves no checkpoint that `latest_step` would pick up.

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

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


class Checkpointer:
    """Save / restore ``(state pytree, metadata dict)`` under ``directory/<step>/``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        self._mgr.reload()
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, meta: dict | None = None) -> None:
        """Write a checkpoint (blocking; an existing one of the same step is replaced).

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

    def restore(self, like: Any, step: int | None = None) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step`` (default: the latest); ``like`` gives the structure and dtypes.

        Each array comes back placed like its ``like`` leaf: with its sharding,
        or uncommitted where that leaf is (e.g. a step count or an optimiser
        count made by ``jnp.zeros`` beside arrays split over a mesh: a jitted
        step then places it with the others, as before the save).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
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

    def close(self) -> None:
        self._mgr.close()


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
