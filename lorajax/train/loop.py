"""A resumable training loop: deterministic batches, orbax checkpoints, JSONL + TensorBoard metrics.

`fit` runs ``steps`` optimiser steps of `make_lora_step` over a trainable
pytree (adapters, plus e.g. a classifier head). Everything that varies between
steps is a pure function of the step number: ``batch_fn(step)`` gives the batch
(derive any randomness from ``step`` and a seed), so the checkpoint needs only
``(trainable, opt_state, step)``. Re-running the same call after a kill
resumes from the newest complete checkpoint and ends bitwise identical to an
uninterrupted run (tested with SIGKILL at random points).

Outputs in ``out_dir``: ``checkpoints/<step>/`` (the last ``keep``),
``metrics.jsonl`` (one JSON object per logged step; lines past the restored step
are dropped on resume) and TensorBoard event files under ``tb/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lorajax.train.checkpoint import Checkpointer
from lorajax import sharding
from lorajax.train.step import make_lora_step

__all__ = ["fit"]


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", -1) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _unaliased(tree: Any) -> Any:
    """``tree`` with every leaf its own buffer: the jitted step donates its state, and an optimiser
    whose ``init`` returns one array at two places would make XLA donate a buffer twice."""
    seen: set[int] = set()

    def one(x):
        if isinstance(x, jax.Array) and id(x) in seen:
            return jnp.copy(x)
        seen.add(id(x))
        return x

    return jax.tree.map(one, tree)


def fit(loss_fn: Callable, tx: optax.GradientTransformation, params: Any, trainable: Any, frozen: Any,
        batch_fn: Callable[[int], Any], steps: int, *, out_dir: str | None = None, ckpt_every: int = 100,
        keep: int = 3, log_every: int = 10, eval_fn: Callable[[Any], dict] | None = None,
        eval_every: int | None = None, progress: bool = True, desc: str = "train",
        state_update: Callable | None = None, mesh: Any = None,
        local_batches: bool = False) -> tuple[Any, list[dict]]:
    """Train ``trainable`` for ``steps`` steps; resume from ``out_dir`` if it has checkpoints.

    Args:
      loss_fn: ``loss_fn(params, combined, batch) -> scalar`` where ``combined =
        combine(trainable, frozen)``.
      tx: optax transformation over ``trainable``.
      params: frozen base params (an argument of the step, never differentiated).
      trainable, frozen: from `lorajax.partition` (frozen may be a tree of Nones).
      batch_fn: ``batch_fn(step) -> batch``; must be deterministic in ``step``.
      steps: total number of steps (a resumed run does only the rest).
      out_dir: where checkpoints and metrics go; None = no checkpoints/metrics files.
      ckpt_every, keep: checkpoint period and how many to keep.
      log_every: metrics period (loss averaged over the period).
      eval_fn: ``eval_fn(trainable) -> {name: float}``, run every ``eval_every`` steps and at the end.
      mesh: a `lorajax.sharding` mesh: every batch is placed with its leading
        axis over ``data`` × ``fsdp`` (place params/trainable/frozen with
        `lorajax.sharding.shard` first; the optimiser state follows them).
      local_batches: with ``mesh`` in a multi-host job: ``batch_fn`` returns
        this process's rows only (see `lorajax.sharding.shard_batch`).
      state_update: for variants with load-balancing buffers (see
        `make_lora_step`): ``loss_fn`` returns ``(loss, aux)``, the frozen
        buffers are refreshed every step and checkpointed, ``eval_fn`` gets
        ``(trainable, frozen)`` and `fit` returns ``((trainable, frozen), history)``.

    Returns:
      ``(trainable, history)``, history being the logged metric dicts of this call.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    step_fn = make_lora_step(loss_fn, tx, state_update=state_update)  # donates its inputs: work on copies
    trainable = jax.tree.map(jnp.copy, trainable)
    stateful = state_update is not None
    if stateful:
        frozen = jax.tree.map(jnp.copy, frozen)
    opt_state = _unaliased(tx.init(trainable))
    start, ckpt, writer, jsonl = 0, None, None, None
    pending: list[float] = []  # losses since the last log line (kept in checkpoints: logs resume exactly)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpointer(out / "checkpoints", keep=keep)
        main = jax.process_index() == 0  # multi-host: every process checkpoints, one writes metrics
        jsonl = out / "metrics.jsonl" if main else None
        if ckpt.latest_step() is not None:
            if stateful:
                (trainable, opt_state, frozen), meta = ckpt.restore((trainable, opt_state, frozen))
            else:
                (trainable, opt_state), meta = ckpt.restore((trainable, opt_state))
            start = int(meta["step"])
            pending = [float(x) for x in meta.get("pending_losses", [])]
        if main:
            _truncate_jsonl(jsonl, start)
        try:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(str(out / "tb"), purge_step=start + 1) if main else None
        except ImportError:  # optional: JSONL is always written
            writer = None

    history: list[dict] = []
    losses = pending
    t_last, n_last = time.perf_counter(), start
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress, leave=False)
    for step in bar:
        batch = batch_fn(step)
        if mesh is not None:
            batch = sharding.shard_batch(batch, mesh, local=local_batches)
        if stateful:
            trainable, frozen, opt_state, loss = step_fn(params, trainable, frozen, opt_state, batch)
        else:
            trainable, opt_state, loss = step_fn(params, trainable, frozen, opt_state, batch)
        losses.append(float(loss))
        done = step + 1
        record = None
        if done % log_every == 0 or done == steps:
            now = time.perf_counter()
            record = {"step": done, "loss": float(np.mean(losses)),
                      "steps_per_s": (done - n_last) / max(now - t_last, 1e-9)}
            losses, t_last, n_last = [], now, done
            bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['steps_per_s']:.2f}")
        if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == steps):
            record = {**(record or {"step": done}), **{f"eval/{k}": float(v) for k, v in eval_fn((trainable, frozen) if stateful else trainable).items()}}
        if record is not None:
            history.append(record)
            if jsonl is not None:
                with jsonl.open("a") as fh:
                    fh.write(json.dumps({k: v for k, v in record.items() if k != "steps_per_s"}) + "\n")
            if writer is not None:
                for k, v in record.items():
                    if k != "step":
                        writer.add_scalar(k, v, done)
        if ckpt is not None and (done % ckpt_every == 0 or done == steps):
            ckpt.save(done, (trainable, opt_state, frozen) if stateful else (trainable, opt_state),
                      {"step": done, "pending_losses": losses})
    if writer is not None:
        writer.close()
    if ckpt is not None:
        ckpt.close()
    if stateful:
        return jax.block_until_ready((trainable, frozen)), history
    return jax.block_until_ready(trainable), history
