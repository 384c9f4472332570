"""A resumable training loop: deterministic batches, orbax checkpoints, JSONL + TensorBoard metrics.

`fit` runs the step of `make_lora_step` on one `TrainState` (adapters, plus
e.g. a classifier head, their optimiser state and the step count) and returns
the new state. Everything that varies between steps is a pure function of the
step number: ``batch_fn(step)`` gives the batch (derive any randomness from
``step`` and a seed), so the checkpoint needs only the `TrainState`.
Re-running the same call after a kill resumes from the newest complete
checkpoint and ends bitwise identical to an uninterrupted run (tested with
SIGKILL at random points).

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

from lorajax import sharding
from lorajax.train.checkpoint import Checkpointer
from lorajax.train.state import TrainState
from lorajax.train.step import make_lora_step

__all__ = ["fit"]


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", -1) <= last_step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def fit(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    params: Any,
    state: TrainState,
    batch_fn: Callable[[int], Any],
    steps: int,
    *,
    out_dir: str | None = None,
    ckpt_every: int = 100,
    keep: int = 3,
    log_every: int = 10,
    eval_fn: Callable[[TrainState], dict] | None = None,
    eval_every: int | None = None,
    progress: bool = True,
    desc: str = "train",
    state_update: Callable | None = None,
    mesh: Any = None,
    local_batches: bool = False,
) -> tuple[TrainState, list[dict]]:
    """Train ``state`` up to ``steps`` steps; resume from ``out_dir`` if it has checkpoints.

    Args:
      loss_fn: ``loss_fn(params, combined, batch) -> loss`` or ``-> (loss, aux)``
        (see `make_lora_step`), ``combined = combine(trainable, frozen)``.
      tx: the optax transformation that made ``state.opt_state``.
      params: frozen base params (an argument of the step, never differentiated nor checkpointed).
      state: a `TrainState` (``TrainState.create(tx, trainable, frozen)``); it is
        copied, not consumed. A checkpoint in ``out_dir`` replaces it (it is
        then only the template of the restored tree); else training
        continues from its ``step``.
      batch_fn: ``batch_fn(step) -> batch``; must be deterministic in ``step``.
      steps: total number of steps (a resumed run does only the rest).
      out_dir: where checkpoints and metrics go; None = no checkpoints/metrics files.
      ckpt_every, keep: checkpoint period and how many to keep.
      log_every: metrics period (loss averaged over the period). Losses stay on
        the device in between: the host waits for the device only at log
        steps, evaluations, checkpoints and the end.
      eval_fn: ``eval_fn(state) -> {name: float}``, run every ``eval_every`` steps and at the end.
      state_update: refreshes ``state.frozen`` every step from ``loss_fn``'s
        ``aux`` (variants with load-balancing buffers; see `make_lora_step`).
      mesh: a `lorajax.sharding` mesh: every batch is placed with its leading
        axis over ``data`` × ``fsdp`` (place params and the state's trees with
        `lorajax.sharding.shard` before `TrainState.create`; the optimiser state follows them).
      local_batches: with ``mesh`` in a multi-host job: ``batch_fn`` returns
        this process's rows only (see `lorajax.sharding.shard_batch`).

    Returns:
      ``(state, history)``: the state after ``steps`` steps, and the logged metric dicts of this call.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    step_fn = make_lora_step(loss_fn, tx, state_update=state_update)
    state = jax.tree.map(jnp.copy, state)  # the step donates its state: the caller's stays valid
    start, ckpt, writer, jsonl = None, None, None, None
    pending: list = []  # losses since the last log line (kept in checkpoints: logs resume exactly)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpointer(out / "checkpoints", keep=keep)
        main = jax.process_index() == 0  # multi-host: every process checkpoints, one writes metrics
        jsonl = out / "metrics.jsonl" if main else None
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
            start = int(meta["step"])
            pending = [float(x) for x in meta.get("pending_losses", [])]
    start = int(state.step) if start is None else start
    if out_dir is not None:
        if jsonl is not None:  # the main process
            _truncate_jsonl(jsonl, start)
        try:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(str(out / "tb"), purge_step=start + 1) if main else None
        except ImportError:  # optional: JSONL is always written
            writer = None

    history: list[dict] = []
    losses = pending  # host floats (restored) and device scalars (this call), synced at log steps
    t_last, n_last = time.perf_counter(), start
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress, leave=False)
    for step in bar:
        batch = batch_fn(step)
        if mesh is not None:
            batch = sharding.shard_batch(batch, mesh, local=local_batches)
        state, metrics = step_fn(params, state, batch)
        losses.append(metrics["loss"])
        done = step + 1
        record = None
        if done % log_every == 0 or done == steps:
            mean = float(np.mean(_floats(losses)))  # waits for the device
            now = time.perf_counter()
            record = {"step": done, "loss": mean, "steps_per_s": (done - n_last) / max(now - t_last, 1e-9)}
            losses, t_last, n_last = [], now, done
            bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['steps_per_s']:.2f}")
        if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == steps):
            record = {**(record or {"step": done}), **{f"eval/{k}": float(v) for k, v in eval_fn(state).items()}}
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
            losses = _floats(losses)
            ckpt.save(done, state, {"step": done, "pending_losses": losses})
    if writer is not None:
        writer.close()
    if ckpt is not None:
        ckpt.close()
    return jax.block_until_ready(state), history


def _floats(values: list) -> list[float]:
    """Host floats of a list of host floats and device scalars (one transfer for all)."""
    return [float(x) for x in jax.device_get(values)]
