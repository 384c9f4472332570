"""A resumable training loop: deterministic batches, verified orbax checkpoints, strict JSONL + TensorBoard metrics.

`fit` runs the step of `make_lora_step` on one `TrainState` (adapters, plus
e.g. a classifier head, their optimiser state and the step count) and returns
the new state. Everything that varies between steps is a pure function of the
step number: ``batch_fn(step)`` gives the batch (derive any randomness from
``step`` and a seed), so the checkpoint needs only the `TrainState`.
Re-running the same call after a kill resumes from the newest valid
checkpoint and ends bitwise identical to an uninterrupted run (tested with
SIGKILL at random points).

Outputs in ``out_dir``: ``checkpoints/<step>/`` (the last ``keep``),
``metrics.jsonl`` (one JSON object per logged step; lines past the restored step
are dropped on resume) and TensorBoard event files under ``tb/``.

What survives:

- Corrupted checkpoints: each one carries a checksum manifest; resuming restores
  the newest valid one, with a one-line warning per invalid newer one (moved
  aside to ``checkpoints/invalid-<step>-<n>``), and refuses with
  `lorajax.train.checkpoint.CheckpointError` when none is valid (see
  `lorajax.train.checkpoint`). The step resumed from is the checkpoint's folder
  step, accepted only when its metadata ``step`` and its ``state.step`` agree.
- A torn ``metrics.jsonl`` (a crash or a full disk mid-write): lines that are
  not valid JSON are dropped on resume with one warning naming the file, and the
  file is rewritten atomically. Lines are strict JSON: a non-finite value
  (NaN / inf loss or eval metric) is written as ``null`` (the returned
  ``history`` keeps the float).
- Non-finite numbers (``on_nonfinite``): the step flags on the device whether its
  loss and every gradient leaf are finite. The flags of the steps since the last
  check stay device arrays in a list; they are fetched (one ``device_get``) only
  where the host waits anyway: at log steps, evaluations and before each
  checkpoint. ``"stop"`` raises `NonFiniteError` there, naming the first
  non-finite step, before that step's metrics line or checkpoint is written: the
  last checkpoint holds a finite state. ``"skip"`` leaves the state unchanged on
  a non-finite step (on the device, see ``skip_nonfinite`` of `make_lora_step`),
  logs the mean loss of the finite steps (``null`` if none) and
  ``"skipped": n`` when n > 0 steps of the period were skipped.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lorajax import atomic, sharding
from lorajax.train.checkpoint import Checkpointer
from lorajax.train.state import TrainState
from lorajax.train.step import make_lora_step

__all__ = ["fit", "NonFiniteError", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """A training step's loss or gradient is NaN / inf (``on_nonfinite="stop"``).

    Attributes: ``step`` (the first non-finite step, 1-based as in
    ``metrics.jsonl``) and ``last_checkpoint`` (the newest checkpoint's step, or None).
    """

    def __init__(self, message: str, step: int, last_checkpoint: int | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


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
    on_nonfinite: str = "stop",
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
      log_every: metrics period (loss averaged over the period). Losses and
        finiteness flags stay on the device in between: the host waits for the
        device only at log steps, evaluations, checkpoints and the end.
      eval_fn: ``eval_fn(state) -> {name: float}``, run every ``eval_every`` steps and at the end.
      state_update: refreshes ``state.frozen`` every step from ``loss_fn``'s
        ``aux`` (variants with load-balancing buffers; see `make_lora_step`).
      mesh: a `lorajax.sharding` mesh: every batch is placed with its leading
        axis over ``data`` × ``fsdp`` (place params and the state's trees with
        `lorajax.sharding.shard` before `TrainState.create`; the optimiser state follows them).
      local_batches: with ``mesh`` in a multi-host job: ``batch_fn`` returns
        this process's rows only (see `lorajax.sharding.shard_batch`).
      on_nonfinite: ``"stop"`` (default): raise `NonFiniteError` at the next
        log / eval / checkpoint step after a step with a non-finite loss or
        gradient, before logging or checkpointing it; ``"skip"``: such a step
        does not change the state (its step count still advances).

    Returns:
      ``(state, history)``: the state after ``steps`` steps, and the logged metric dicts of this call.

    Raises:
      NonFiniteError: see ``on_nonfinite``. CheckpointError: ``out_dir`` has
        checkpoints but none is valid.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(
            f"on_nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}; got {on_nonfinite!r}"
        )
    try:
        step_fn = _step_fn(loss_fn, tx, state_update, on_nonfinite == "skip")
    except TypeError:  # an unhashable loss_fn / tx: not cached
        step_fn = make_lora_step(loss_fn, tx, state_update=state_update, skip_nonfinite=on_nonfinite == "skip")
    state = jax.tree.map(jnp.copy, state)  # the step donates its state: the caller's stays valid
    start, ckpt, writer, jsonl, last_ckpt = None, None, None, None, None
    pending: list = []  # losses since the last log line (kept in checkpoints: logs resume exactly); None = not finite
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpointer(out / "checkpoints", keep=keep)
        main = jax.process_index() == 0  # multi-host: every process checkpoints, one writes metrics
        jsonl = out / "metrics.jsonl" if main else None
        if ckpt.all_steps():
            state, meta = ckpt.restore(state, check=_check_restored)
            start = last_ckpt = int(meta["step"])  # == the folder's step == state.step (checked)
            pending = list(meta.get("pending_losses", []))
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
    # the period's losses and finiteness flags: host values (restored) then device scalars (this call)
    losses = [math.nan if x is None else float(x) for x in pending]
    flags: list = [x is not None for x in pending]
    n_restored = len(pending)  # restored steps were checked (or skipped) before their checkpoint
    t_last, n_last = time.perf_counter(), start
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not progress, leave=False)
    try:
        for step in bar:
            batch = batch_fn(step)
            if mesh is not None:
                batch = sharding.shard_batch(batch, mesh, local=local_batches)
            state, metrics = step_fn(params, state, batch)
            losses.append(metrics["loss"])
            flags.append(metrics["finite"])
            done = step + 1
            is_log = done % log_every == 0 or done == steps
            is_eval = eval_fn is not None and ((eval_every and done % eval_every == 0) or done == steps)
            is_ckpt = ckpt is not None and (done % ckpt_every == 0 or done == steps)
            if not (is_log or is_eval or is_ckpt):
                continue
            losses, flags = _to_host(losses, flags)  # waits for the device (one transfer)
            if on_nonfinite == "stop" and not all(flags[n_restored:]):
                first = done - len(flags) + 1 + n_restored + flags[n_restored:].index(False)
                raise _nonfinite_error(first, last_ckpt, ckpt)
            record = None
            if is_log:
                finite = [x for x, ok in zip(losses, flags) if ok]
                now = time.perf_counter()
                record = {
                    "step": done,
                    "loss": float(np.mean(finite)) if finite else math.nan,
                    "steps_per_s": (done - n_last) / max(now - t_last, 1e-9),
                }
                if len(finite) < len(flags):
                    record["skipped"] = len(flags) - len(finite)
                losses, flags, n_restored, t_last, n_last = [], [], 0, now, done
                bar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['steps_per_s']:.2f}")
            if is_eval:
                assert eval_fn is not None
                evals = {f"eval/{k}": float(v) for k, v in eval_fn(state).items()}
                record = {**(record or {"step": done}), **evals}
            if record is not None:
                history.append(record)
                if jsonl is not None:
                    with jsonl.open("a") as fh:
                        fh.write(_json_line({k: v for k, v in record.items() if k != "steps_per_s"}))
                if writer is not None:
                    for k, v in record.items():
                        if k != "step":
                            writer.add_scalar(k, v, done)
            if ckpt is not None and is_ckpt:
                kept = [x if ok else None for x, ok in zip(losses, flags)]
                ckpt.save(done, state, {"step": done, "pending_losses": kept})
                last_ckpt = done
    finally:
        if writer is not None:
            writer.close()
        if ckpt is not None:
            ckpt.close()
    return jax.block_until_ready(state), history


@functools.lru_cache(maxsize=4)
def _step_fn(
    loss_fn: Callable, tx: optax.GradientTransformation, state_update: Callable | None, skip: bool
) -> Callable:
    """The jitted step, shared by `fit` calls with the same functions (a resumed call in the same process,
    a run continued to more steps) so that it is compiled once."""
    return make_lora_step(loss_fn, tx, state_update=state_update, skip_nonfinite=skip)


def _check_restored(state: TrainState, meta: dict, step: int) -> None:
    """A checkpoint of `fit` is consistent: its folder step, metadata ``step`` and ``state.step`` agree."""
    if meta.get("step") != step:
        raise ValueError(f"its metadata step is {meta.get('step')!r}, not its folder's step {step}")
    if int(state.step) != step:
        raise ValueError(f"its state.step is {int(state.step)}, not its folder's step {step}")


def _nonfinite_error(step: int, last_ckpt: int | None, ckpt: Checkpointer | None) -> NonFiniteError:
    if ckpt is None:
        kept = "no checkpoints (out_dir=None)"
    elif last_ckpt is None:
        kept = "no checkpoint yet"
    else:
        kept = f"the last checkpoint kept is step {last_ckpt} in {ckpt.directory}"
    return NonFiniteError(
        f"step {step}: the loss or a gradient is not finite (NaN/inf); stopped before logging or checkpointing it, "
        f"{kept}. Lower the learning rate, check batch_fn({step - 1}), or pass on_nonfinite='skip'",
        step,
        last_ckpt,
    )


def _to_host(losses: list, flags: list) -> tuple[list[float], list[bool]]:
    """Host floats and bools of lists of host values and device scalars (one transfer for all)."""
    got_losses, got_flags = jax.device_get((losses, flags))
    return [float(x) for x in got_losses], [bool(x) for x in got_flags]


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) as None, so that it is strict JSON."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_line(record: dict) -> str:
    """One strict-JSON line (non-finite numbers as ``null``)."""
    return json.dumps(_strict(record), allow_nan=False) + "\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of ``path`` up to ``last_step``; drop (with one warning) those that are not JSON objects.

    Lines written by older versions with ``NaN`` / ``Infinity`` are kept with ``null`` there.
    The file is rewritten atomically, and only if something changed.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    raw_lines = data.split(b"\n")
    kept, bad = [], []
    for i, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
            try:
                record = json.loads(text, parse_constant=_reject_constant)
            except ValueError as e:
                if "non-standard JSON constant" not in str(e):
                    raise
                record = json.loads(text)
                text = _json_line(record).rstrip("\n")
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
            bad.append(i)
            continue
        if record.get("step", -1) <= last_step:
            kept.append(text)
    if bad:
        last = len(raw_lines) - (raw_lines[-1] == b"")
        which = f"line {bad[0]}" if len(bad) == 1 else f"lines {', '.join(map(str, bad))}"
        warnings.warn(
            f"{path}: dropped {which} of {last}, not valid JSON (torn by a crash or a full disk mid-write?)",
            stacklevel=3,
        )
    new = "".join(line + "\n" for line in kept)
    if new.encode("utf-8") != data:
        atomic.write_text(path, new)
