"""SoRA's gate optimiser: AdamW then a proximal soft-threshold step; pruning to plain LoRA.

SoRA (the ``sora`` variant: ``W' = W + s · A diag(g) B``) trains A and B with
the main optimiser and the gate ``g`` with its own AdamW, after whose every
step a proximal step sparsifies ``g``::

    g ← T_ξ(g + Δ_adam),     T_ξ(x) = sign(x) · max(|x| − ξ, 0)

(``ξ = threshold``; the official ``SparseAdamW`` does not multiply ξ by the
learning rate, ``threshold_times_lr=True`` does, as the unused
``sparse_optimizer_multiply_lr.py``). The loss gets ``λ · Σ|g| / N_g``
(`gate_penalty`). Gate entries that reach exactly 0 stay 0 while the Adam step
is smaller than ξ; `prune` then deletes them, giving a plain LoRA of rank
``nnz(g)`` per target with the same weights.

The official operator applies three masked in-place updates in sequence, so
entries with ``ξ < |g| < 2ξ`` end at 0 instead of ``|g| − ξ``
(`quirk_threshold`); ``official_quirk=True`` reproduces it for parity.

Defaults follow the official code: gate AdamW with β = (0.9, 0.999),
ε = 1e-6, no weight decay, bias correction; scripts use ξ = 3e-4, λ = 10.

Sparsifying scheduler (named in the paper's abstract; the paper body was not
readable here, so this follows the official code:
``SparseAdamW._build_lambda_list`` / ``step_lambda`` in
``src/sparse_optimizer.py`` and the phase loop at the end of ``run_glue.py``,
TsinghuaC3I/SoRA @ c275ac23). ``num`` thresholds ``ξ_0 .. ξ_{num−1}`` run
from ``start`` to ``stop`` (`threshold_values`: ``"linear"`` = ``linspace``,
``"log_linear"`` = ``log(linspace(e^start, e^stop))``, ``"exp_linear"`` =
``exp(linspace(log start, log stop))``, geometric, needs ``start > 0``). The
main run uses ``ξ_0``; then ``num − 1`` further phases each re-train with the
next ``ξ_k`` (official: 15 epochs per phase) and record the metric and the
number of non-zero gate entries. The official loop keeps the optimiser
objects, their Adam moments and their LR schedulers across phases; so does
`sparsifying_schedule`, a step-indexed ``ξ`` for ``threshold`` that switches
at phase boundaries inside one optimiser state. The official RTE script uses
``ξ_0 = 0`` (``sparse_lambda_2=0``; with ξ = 0 the official code skips the
threshold, which is the identity here too), ``stop = 7e-4``, ``num = 7``,
``"linear"``, λ = 1e-3, 50 epochs then 15 per phase. Which learning rate the
later phases see is whatever the caller's schedule gives at those steps (the
official scripts reuse linear-decay schedulers sized for the main run, whose
HF implementation stays at 0 once reached; as read from the code, not run).

Example:
  >>> import jax, jax.numpy as jnp, optax, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
  >>> spec = lorajax.Spec("sora", rank=2, alpha=4, targets=["dense"])
  >>> adapters = lorajax.init(spec, params, 0)
  >>> tx = lorajax.optim.sora(1e-3, threshold=1e-4)
  >>> state = tx.init(adapters)

References:
  Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models",
  EMNLP 2023, arXiv:2311.11696. Official code TsinghuaC3I/SoRA:
  ``src/sparse_optimizer.py`` (``SparseAdamW``: AdamW + threshold),
  ``src/trainer.py`` (the L1 term ``sparse_lambda``), ``run_glue.py``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorajax import adapters as adapters_lib
from lorajax import registry
from lorajax.optim._checks import check
from lorajax.optim.labels import leaf_labels, leaf_name
from lorajax.plan import nest
from lorajax.spec import Spec
from lorajax.variants import sora as sora_variant

__all__ = [
    "soft_threshold",
    "quirk_threshold",
    "proximal",
    "sora_gate_optimizer",
    "sora",
    "gate_penalty",
    "prune",
    "THRESHOLD_SCHEDULES",
    "threshold_values",
    "sparsifying_schedule",
]

#: The official ``lambda_schedule`` kinds (``SparseAdamW._build_lambda_list``).
THRESHOLD_SCHEDULES = ("linear", "log_linear", "exp_linear")


def soft_threshold(x: jax.Array, xi: Any) -> jax.Array:
    """``sign(x) · max(|x| − ξ, 0)``."""
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - xi, 0.0)


def quirk_threshold(x: jax.Array, xi: Any) -> jax.Array:
    """The official three-step operator: shrink where ``x > ξ`` or ``x < −ξ``, then zero ``|·| < ξ``."""
    y = jnp.where(x > xi, x - xi, x)
    y = jnp.where(y < -xi, y + xi, y)
    return jnp.where(jnp.abs(y) < xi, 0.0, y)


class ProximalState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count, as in optax's states


def threshold_values(start: float, stop: float, num: int, kind: str = "linear") -> np.ndarray:
    """The ``num`` thresholds ``ξ_0 .. ξ_{num−1}`` of the official sparsifying scheduler (float64).

    Args:
      start: ``ξ_0`` (official ``sparse_lambda_2``), used by the main run.
      stop: ``ξ_{num−1}`` (official ``max_lambda``).
      num: number of thresholds, main run included (official ``lambda_num``), ≥ 1.
      kind: ``"linear"``, ``"log_linear"`` or ``"exp_linear"`` (see the module doc).
    """
    if kind not in THRESHOLD_SCHEDULES:
        raise ValueError(f"kind must be one of {THRESHOLD_SCHEDULES}, got {kind!r}")
    if not isinstance(num, (int, np.integer)) or isinstance(num, bool) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    check("start", start, lambda v: v >= 0, ">= 0")
    check("stop", stop, lambda v: v >= 0, ">= 0")
    if kind == "linear":
        return np.linspace(start, stop, num)
    if kind == "log_linear":
        return np.log(np.linspace(np.exp(start), np.exp(stop), num))
    if start <= 0:
        raise ValueError(f"start must be > 0 for kind='exp_linear' (geometric), got {start!r}")
    return np.exp(np.linspace(np.log(start), np.log(stop), num))


def sparsifying_schedule(
    start: float, stop: float, num: int, *, first_steps: int, phase_steps: int, kind: str = "linear"
) -> Callable[[Any], jax.Array]:
    """A step-indexed threshold for `proximal` / `sora`: ``ξ_0`` for the main run, then ``ξ_k`` per phase.

    ``ξ(step) = ξ_0`` for ``step < first_steps`` and ``ξ_k`` with
    ``k = min(1 + (step − first_steps) // phase_steps, num − 1)`` after it (the
    last threshold is kept past the end, as the official ``step_lambda``).

    Args:
      start, stop, num, kind: as `threshold_values`.
      first_steps: optimiser steps of the main run (≥ 1).
      phase_steps: optimiser steps of each later phase (≥ 1; official: 15 epochs).
    """
    values = jnp.asarray(threshold_values(start, stop, num, kind), jnp.float32)
    for name, v in (("first_steps", first_steps), ("phase_steps", phase_steps)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")

    def schedule(step: Any) -> jax.Array:
        step = jnp.asarray(step, jnp.int32)
        k = jnp.where(step < first_steps, 0, 1 + (step - first_steps) // phase_steps)
        return values[jnp.clip(k, 0, num - 1)]

    return schedule


def proximal(
    threshold: optax.ScalarOrSchedule, *, learning_rate: Any = None, official_quirk: bool = False
) -> optax.GradientTransformation:
    """Turn an update ``u`` into ``T_ξ(p + u) − p`` (needs ``params`` in ``update``).

    ``threshold`` is a float or a schedule ``step -> ξ`` (e.g. `sparsifying_schedule`).
    With ``learning_rate`` (float or schedule), ``ξ = threshold · lr(step)``.
    """
    if not callable(threshold):
        check("threshold", threshold, lambda v: v >= 0, ">= 0")
    op = quirk_threshold if official_quirk else soft_threshold

    def init(params):
        del params
        return ProximalState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("the SoRA proximal step needs params: call tx.update(grads, state, params)")
        xi = threshold(state.count) if callable(threshold) else threshold
        if learning_rate is not None:
            xi = xi * (learning_rate(state.count) if callable(learning_rate) else learning_rate)
        new = jax.tree.map(lambda u, p: (op(p + u, xi) - p).astype(u.dtype), updates, params)
        return new, ProximalState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def sora_gate_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    threshold: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    threshold_times_lr: bool = False,
    official_quirk: bool = False,
) -> optax.GradientTransformation:
    """The official ``SparseAdamW`` for gates: Adam (no weight decay), then the proximal step."""
    return optax.chain(
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
        proximal(threshold, learning_rate=learning_rate if threshold_times_lr else None, official_quirk=official_quirk),
    )


def sora(
    learning_rate: optax.ScalarOrSchedule,
    *,
    threshold: optax.ScalarOrSchedule,
    gate_lr: optax.ScalarOrSchedule | None = None,
    optimizer: Callable[[Any], optax.GradientTransformation] | None = None,
    gate_b1: float = 0.9,
    gate_b2: float = 0.999,
    gate_eps: float = 1e-6,
    threshold_times_lr: bool = False,
    official_quirk: bool = False,
) -> optax.GradientTransformation:
    """``optimizer(learning_rate)`` for every leaf but the ``gate`` leaves, which get `sora_gate_optimizer`.

    Args:
      learning_rate: float or optax schedule of the main optimiser (A, B, any head).
      threshold: ``ξ`` of the proximal step (official scripts: 3e-4), or a schedule
        ``step -> ξ`` counted in gate-optimiser steps (`sparsifying_schedule`).
      gate_lr: the gates' learning rate (official ``sparse_lr``; default ``learning_rate``).
      optimizer: a factory ``learning_rate -> GradientTransformation`` for the
        other leaves (default ``optax.adamw``; bind other hyper-parameters with
        ``functools.partial``; under ``optax.inject_hyperparams`` pass
        ``static_args="optimizer"``).
      gate_b1, gate_b2, gate_eps: the gates' Adam (official 0.9, 0.999, 1e-6).
      threshold_times_lr: ``ξ · gate_lr`` instead of ``ξ`` (unused official variant).
      official_quirk: the official three-step threshold (`quirk_threshold`).
    """
    main = (optax.adamw if optimizer is None else optimizer)(learning_rate)
    gate = sora_gate_optimizer(
        learning_rate if gate_lr is None else gate_lr,
        threshold=threshold,
        b1=gate_b1,
        b2=gate_b2,
        eps=gate_eps,
        threshold_times_lr=threshold_times_lr,
        official_quirk=official_quirk,
    )

    def labels(params):
        return jax.tree.map(lambda r: "gate" if r == "gate" else "main", leaf_labels(params))

    return optax.multi_transform({"main": main, "gate": gate}, labels)


def gate_penalty(adapters: Any, lam: float) -> jax.Array:
    """``λ · Σ|g| / N_g`` over every ``gate`` leaf (add it to the task loss)."""
    gates = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0] if leaf_name(path) == "gate"]
    if not gates:
        raise ValueError("gate_penalty: the tree has no 'gate' leaves (is it a SoRA adapters tree?)")
    total = sum(jnp.sum(jnp.abs(g)) for g in gates)
    return lam * total / sum(g.size for g in gates)


def is_sora(variant: str) -> bool:
    """True when the registered ``variant`` is SoRA (under any alias): its adapters carry the gate."""
    return variant in registry.list_variants() and registry.get(variant) is sora_variant.VARIANT


def prune(spec: Spec, params: Any, adapters: Any) -> tuple[Spec, dict]:
    """Delete zero gate entries: ``(lora_spec, lora_adapters)`` with the same adapted weights.

    Target ``i`` becomes a plain LoRA of rank ``nnz(g_i)`` with ``α = rank``
    (scale 1) and ``lora_A = s · A[:, S] · g_S``, ``lora_B = B[S, :]`` where
    ``S`` is the support of its gate. Targets whose gate is all zero are
    dropped (their update is zero). Runs on concrete arrays (not under jit):
    the new ranks are data-dependent.
    """
    if not is_sora(spec.variant):
        raise ValueError(f"prune needs SoRA adapters, got variant {spec.variant!r}")
    selected, index, _ = adapters_lib.resolve(spec, params, adapters)
    kept, flat, ranks = [], {}, {}
    for t in selected:
        a = index[t.keys]
        g = jax.device_get(a["gate"])
        support = [i for i in range(g.shape[0]) if g[i] != 0]
        if not support:
            continue
        s = t.alpha / t.rank
        idx = jnp.asarray(support)
        flat[t.keys] = {"lora_A": a["lora_A"][:, idx] * (s * a["gate"][idx])[None, :], "lora_B": a["lora_B"][idx, :]}
        kept.append(t)
        ranks[t.name] = len(support)
    if not kept:
        raise ValueError("every gate entry is zero: the SoRA update is zero, nothing to keep")
    names = [t.name for t in kept]
    top = max(ranks.values())
    pattern = {re.escape(n): r for n, r in ranks.items() if r != top}
    new_spec = Spec(
        "lora",
        rank=top,
        alpha=float(top),
        targets="|".join(re.escape(n) for n in names),
        rank_pattern=pattern or None,
        alpha_pattern={k: float(v) for k, v in pattern.items()} or None,
        dtype=spec.options.get("dtype"),
    )
    return new_spec, nest(flat)
