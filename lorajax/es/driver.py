"""A small ESSA driver loop: progress bar, periodic evaluation, logging of failed members, resumable checkpoints.

``run(essa, fitness_fn, key, generations, *args)`` calls the jitted
`ESSA.step` once per generation with the key ``fold_in(key, generation)``, so
a run resumed from a checkpoint draws the same populations as an unbroken one
and ends in the same state. Checkpoints (`lorajax.train.checkpoint.Checkpointer`,
orbax) hold the ESSA `State` plus the metric history (JSON metadata); with
``checkpoint_dir`` set, ``run`` resumes from the newest complete checkpoint
there.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from lorajax.es import ESSA, run
  >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
  >>> spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["dense"], init_weights=False)
  >>> essa = ESSA(spec, params, lorajax.init(spec, params, jax.random.key(0)), population_size=8)
  >>> reward = lambda adapters: -jnp.sum(adapters["dense"]["kernel"]["lora_A"] ** 2)
  >>> state, history = run(essa, reward, jax.random.key(1), 3, progress=False)
  >>> int(state.generation), len(history), history[-1]["generation"]
  (3, 3, 3)
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import jax
import numpy as np

from lorajax.es.essa import ESSA, State

__all__ = ["run"]

log = logging.getLogger("lorajax.es")


def _floats(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        if v.ndim == 0:
            x = v.item()
            out[k] = x if not isinstance(x, float) or math.isfinite(x) else None
    return out


def run(
    essa: ESSA,
    fitness_fn: Callable,
    key: jax.Array,
    generations: int,
    *args: Any,
    state: State | None = None,
    checkpoint_dir: str | None = None,
    ckpt_every: int = 10,
    keep: int = 3,
    eval_fn: Callable[[State], dict] | None = None,
    eval_every: int = 0,
    progress: bool = True,
    desc: str = "ESSA",
) -> tuple[State, list[dict]]:
    """Run ``generations`` generations (in total, counting resumed ones).

    Args:
      essa: the `ESSA` search.
      fitness_fn, args: as for `ESSA.step` (reward, higher is better).
      key: base PRNG key; generation g uses ``fold_in(key, g)`` (init uses ``fold_in(key, 0x7FFFFFFF)``).
      state: start from this state instead of ``essa.init`` (ignored when a checkpoint is found).
      checkpoint_dir: save every ``ckpt_every`` generations and at the end; resume from the newest.
      eval_fn: ``eval_fn(state) -> {name: float}`` every ``eval_every`` generations and at the end
        (e.g. held-out reward of ``essa.mean_adapters(state)``); logged as ``eval/<name>``.
      progress: a tqdm bar with the current mean / best fitness.

    Returns ``(state, history)``: one dict per generation (``generation``,
    the step metrics, ``eval/*`` where evaluated, ``wall_s``).
    """
    if not isinstance(generations, int) or generations < 0:
        raise ValueError(f"generations must be a non-negative int, got {generations!r}")
    init_key = jax.random.fold_in(key, 0x7FFFFFFF)
    history: list[dict] = []
    ckpt = None
    if checkpoint_dir is not None:
        from lorajax.train.checkpoint import Checkpointer

        ckpt = Checkpointer(checkpoint_dir, keep=keep)
        if ckpt.all_steps():  # restore verifies; all invalid -> CheckpointError, not a silent restart
            like = essa.init(init_key)
            state, meta = ckpt.restore(like, check=_generation_matches)
            history = list(meta.get("history", []))
            log.info("resumed ESSA from %s at generation %d", checkpoint_dir, int(state.generation))
    if state is None:
        state = essa.init(init_key)

    def save(state: State) -> None:
        if ckpt is not None:
            g = int(state.generation)
            ckpt.save(g, state, {"history": history, "generation": g, "n_nonfinite": int(state.n_nonfinite)})

    start = int(state.generation)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=generations, initial=min(start, generations), desc=desc)
    t0 = time.perf_counter()
    try:
        for g in range(start, generations):
            state, metrics = essa.step(state, jax.random.fold_in(key, g), fitness_fn, *args)
            row = {"generation": g + 1, **_floats(metrics), "wall_s": time.perf_counter() - t0}
            if row.get("n_nonfinite"):
                msg = (
                    f"generation {g + 1}: {row['n_nonfinite']} of {essa.population_size} members returned a "
                    f"non-finite fitness (ranked last; {int(state.n_nonfinite)} so far)"
                )
                log.warning(msg)
                if bar is not None:
                    bar.write(msg)
            last = g + 1 == generations
            if eval_fn is not None and ((eval_every and (g + 1) % eval_every == 0) or last):
                row.update({f"eval/{k}": float(v) for k, v in eval_fn(state).items()})
            history.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(mean=row.get("fitness_mean"), best=row.get("best_fitness"))
            if ckpt is not None and ((g + 1) % ckpt_every == 0 or last):
                save(state)
    finally:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()
    return state, history


def _generation_matches(state: State, meta: dict, step: int) -> None:
    """A checkpoint's own generation must be its folder's step (else it counts as invalid on restore)."""
    if int(state.generation) != step or int(meta.get("generation", step)) != step:
        raise ValueError(f"generation {int(state.generation)} (meta {meta.get('generation')}) != folder step {step}")
