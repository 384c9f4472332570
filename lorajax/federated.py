"""Federated LoRA: FedAvg over adapter pytrees, pFedLoRA, Fed-SB, and DP-SGD with an (ε, δ) account.

Clients hold their own data and train adapters locally; a server averages
what they send. Everything here is a pure function over pytrees; clients that
share structure are one `jax.vmap` axis (`fedavg_round`: batches stacked as
``[K, steps, ...]``), clients that do not (pFedLoRA's heterogeneous local
models) are a Python loop (`pfedlora_round`).

FedAvg (McMahan et al. 2017, arXiv:1602.05629) over adapter trees: with ``n_k``
examples on client ``k`` and ``p_k = n_k / Σ_j n_j``::

    θ_global ← Σ_k p_k θ_k          (leaf-wise, every trainable adapter leaf)

For plain LoRA this averages A and B separately, so the aggregated update
``s·(Σ p_k A_k)(Σ p_k B_k)`` is NOT ``Σ p_k s·A_k B_k`` (the inexactness Fed-SB
removes). With identical clients and data each client's local run equals the
centralised run, and so does their average (tested); with one local SGD step
per client on the mean loss, FedAvg equals one centralised step on the union
of the client batches weighted by ``p_k`` (FedSGD; tested).

pFedLoRA (Yi, Yu, Wang, Liu, "pFedLoRA: Model-Heterogeneous Personalized
Federated Learning with LoRA Tuning", arXiv:2310.13283): each client keeps
its own, possibly differently shaped, local model ``φ_k`` (never sent) and one
small adapter ``a`` whose structure is the same on every client. A round, per
client: start from the global adapter; train ``φ_k`` with ``a`` frozen
(global → local knowledge), then train ``a`` with ``φ_k`` frozen (local →
global); upload ``a``. The server averages the adapters only
(``a ← Σ p_k a_k``). `pfedlora_local` is one client's round, `pfedlora_round`
the loop and the aggregation. In a lorajax model the "local model" can be any
tree the client's loss takes: e.g. a private LoRA of a client-specific rank
merged into the base, with the shared LoRA applied on top (the experiment
``experiments/federated_shakespeare.py`` does this).

Fed-SB (Singhal, Ponkshe, Vartak, Varshney, Vepakomma, "Fed-SB: A Silver Bullet for
Extreme Communication Efficiency and Performance in (Private) Federated LoRA
Fine-Tuning", arXiv:2502.15436): every client uses LoRA-SB — the LoRA-XS
architecture ``W' = W + s·A R B`` (`lorajax.variants.lora_xs`) initialised by
`lorajax.inits.lora_sb` — with the SAME frozen ``A: [in, r]``, ``B: [r, out]``
and trains only ``R: [r, r]``. Only R travels, and averaging it is exact::

    s·A (Σ_k p_k R_k) B = Σ_k p_k (s·A R_k B)      (ΔW is linear in R)

`fed_sb_aggregate` checks that the clients' A and B are identical (else the
identity fails) and averages R.

Communication (`tree_bytes`, `round_bytes`): per round each client uploads
its trainable adapter leaves and downloads the aggregated ones, so with ``K``
clients and ``b`` bytes of trainable leaves the round moves ``2·K·b`` bytes.
``b`` per target is ``r·(in + out)·itemsize`` for plain LoRA and
``r²·itemsize`` for Fed-SB (tested against the trees).

DP-SGD (Abadi et al. 2016, arXiv:1607.00133), as Opacus does it (the Fed-SB
code uses Opacus' ``PrivacyEngine.make_private_with_epsilon``): per-example
gradients ``g_i`` of the trainable leaves (one `jax.vmap` of `jax.grad`), each
clipped to global L2 norm ``C`` over all leaves, summed, Gaussian noise
added, divided by the expected batch size ``B``::

    g_i ← g_i · min(1, C / (‖g_i‖₂ + 1e-6))          (Opacus' clip factor)
    ĝ   = (Σ_i m_i g_i + N(0, σ² C² I)) / B           (m_i: the example is in the batch)

The (ε, δ) account is the Rényi-DP accountant of the Poisson-subsampled
Gaussian (Mironov, Talwar, Zhang 2019, arXiv:1908.10530) composed over the
steps, from Google's ``dp_accounting`` library (`dp_epsilon`, `dp_rdp`,
`dp_noise_multiplier`). Each client's examples are only in that client's
steps, so a client's account is over its own steps: ``rounds × local steps``
with sampling rate ``q = B / n_k`` (parallel composition across clients).

Example:
  >>> import jax.numpy as jnp
  >>> from lorajax import federated
  >>> a = {"w": {"lora_R": jnp.ones((2, 2))}}
  >>> b = {"w": {"lora_R": jnp.zeros((2, 2))}}
  >>> federated.fedavg([a, b], weights=[3, 1])["w"]["lora_R"][0, 0].item()
  0.75
  >>> federated.round_bytes(a, n_clients=4)["total"]   # 2 · 4 clients · 4 floats · 4 bytes
  128

What was read, and what stays UNVERIFIED:

* Fed-SB: the official code (fork ``putssander/fed-sb`` of the authors'
  repository, commit 3515e048) ``fed_sb/fed/fed_agg.py``
  (``aggregate_models_fed_sb``: a plain, UNWEIGHTED ``torch.stack(...).mean(0)``
  of every ``default_lora_latent_mapping`` (R) tensor, plus the classifier;
  ``aggregate_models_fed_it``: the same mean over every LoRA tensor),
  ``fed_sb/fed/aggregator.py`` and ``fed_sb/DP/SNLI/fed_trainer.py``: one
  LoRA-SB init (gradients estimated on the training data, ``eff_lr = lr /
  total_steps``) shared by all clients, ``α = r``; DP through Opacus
  (``make_private_with_epsilon``, ``max_grad_norm``, ``target_delta = 1 /
  len(client_dataloader)``, Poisson sampling, ``grad_sample_mode="ghost"``).
  lorajax's `fed_sb_aggregate` takes optional client weights (default:
  the official unweighted mean). Opacus' default accountant (PRV in recent
  versions) gives a slightly tighter ε than the RDP account here (RDP is an
  upper bound); which Opacus version the paper ran is UNVERIFIED. The paper's
  text (beyond the README's abstract) was not read.
* pFedLoRA: no official code was found (searched); only the spec's summary of
  the abstract was read. The order local-model-then-adapter inside a round,
  one fresh optimiser state per phase and round, and the ``n_k``-weighted
  average are UNVERIFIED design choices (``order=`` switches the phases).
* FedAvg: weighted by client sizes as in McMahan et al.; the Fed-SB/FedIT
  code averages uniformly (pass equal weights for that). A fresh optimiser
  state per client and round, as the Fed-SB code creates its AdamW per client.
* DP-SGD: the clip factor ``C / (‖g‖ + 1e-6)`` clamped at 1 (one norm over
  all parameters), the noise ``N(0, (σ·C)²)`` added to the clipped sum and the
  division by ``expected_batch_size`` were read in a copy of Opacus'
  ``DPOptimizer`` (``clip_and_accumulate``, ``add_noise``, ``scale_grad``)
  found by code search (which Opacus version it is: UNVERIFIED). The RDP
  orders and the RDP → (ε, δ) conversion are ``dp_accounting``'s defaults.
  Batches here are fixed-size unless a ``mask`` marks a Poisson sample; the
  account assumes Poisson sampling (as Opacus' DPDataLoader does).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorajax import registry
from lorajax.adapters import combine, partition
from lorajax.spec import Spec
from lorajax.variants import lora_xs

__all__ = [
    "tree_bytes",
    "round_bytes",
    "check_clients",
    "stack",
    "unstack",
    "fedavg",
    "fedavg_stacked",
    "DPSGD",
    "clip_per_example",
    "dp_grad",
    "local_train",
    "fedavg_round",
    "pfedlora_local",
    "pfedlora_round",
    "fed_sb_aggregate",
    "dp_rdp",
    "dp_epsilon",
    "dp_noise_multiplier",
    "check_budget",
]

_is_none = lambda x: x is None  # noqa: E731  (None leaves: the other half of `lorajax.partition`)


# ----------------------------------------------------------------------------- communication


def tree_bytes(tree: Any) -> int:
    """Bytes of the array leaves of ``tree`` (``None`` leaves, e.g. `partition`'s frozen half, count 0)."""
    return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def round_bytes(trainable: Any, n_clients: int) -> dict[str, int]:
    """Bytes one round moves: each client uploads ``trainable`` and downloads the aggregate.

    Returns ``{"per_client_up", "per_client_down", "total"}`` with
    ``total = 2 · n_clients · tree_bytes(trainable)``.
    """
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"n_clients must be an int >= 1, got {n_clients!r}")
    b = tree_bytes(trainable)
    return {"per_client_up": b, "per_client_down": b, "total": 2 * n_clients * b}


# ----------------------------------------------------------------------------- aggregation


def _describe(tree: Any) -> dict[str, tuple | None]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]
    return {
        jax.tree_util.keystr(p): (None if x is None else (tuple(np.shape(x)), str(jnp.result_type(x)))) for p, x in flat
    }


def check_clients(trees: Sequence[Any], what: str = "adapter") -> None:
    """Raise ValueError unless every tree has client 0's structure, leaf shapes and dtypes.

    The message names the first mismatching client and leaf path.
    """
    if len(trees) == 0:
        raise ValueError(f"no client {what} trees given")
    ref = _describe(trees[0])
    for k, t in enumerate(trees[1:], start=1):
        d = _describe(t)
        if d.keys() != ref.keys():
            extra, missing = sorted(d.keys() - ref.keys()), sorted(ref.keys() - d.keys())
            raise ValueError(
                f"client {k}'s {what} tree differs from client 0's: extra leaves {extra[:3]}, "
                f"missing leaves {missing[:3]}; every client must use the same Spec and targets"
            )
        for path, meta in ref.items():
            if d[path] != meta:
                raise ValueError(
                    f"client {k}'s {what} leaf {path} is {d[path]} (shape, dtype) but client 0's is {meta}; "
                    "every client must use the same Spec (rank, targets, dtype) on the same base"
                )


def _weights(weights: Sequence[float] | np.ndarray | jax.Array | None, n: int) -> jax.Array:
    if weights is None:
        return jnp.full((n,), 1.0 / n, jnp.float32)
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must hold one number per client ({n}), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"client weights must be finite, >= 0 and not all 0 (e.g. client sizes), got {w.tolist()}")
    return jnp.asarray(w / w.sum(), jnp.float32)


def stack(trees: Sequence[Any]) -> Any:
    """Client trees as one tree with a leading client axis ``[K, ...]`` (checked by `check_clients`)."""
    check_clients(trees)
    return jax.tree_util.tree_map(lambda *xs: None if xs[0] is None else jnp.stack(xs), *trees, is_leaf=_is_none)


def unstack(stacked: Any) -> list[Any]:
    """Inverse of `stack`: a list of ``K`` trees."""
    leaves = [x for x in jax.tree_util.tree_leaves(stacked)]
    if not leaves:
        raise ValueError("unstack got a tree without arrays")
    k = leaves[0].shape[0]
    return [
        jax.tree_util.tree_map(lambda x, i=i: None if x is None else x[i], stacked, is_leaf=_is_none) for i in range(k)
    ]


def fedavg_stacked(stacked: Any, weights: Any = None) -> Any:
    """``Σ_k p_k θ_k`` over the leading client axis of every leaf (``p = weights / Σ weights``, default uniform).

    ``weights`` may be a traced array (inside `jax.jit`); then it is only
    normalised, not checked. Leaves keep their dtype (accumulated in float32).
    """
    leaves = jax.tree_util.tree_leaves(stacked)
    if not leaves:
        raise ValueError("fedavg got a tree without arrays")
    k = leaves[0].shape[0]
    if isinstance(weights, jax.core.Tracer):
        p = weights.astype(jnp.float32) / jnp.sum(weights)
    else:
        p = _weights(weights, k)

    def avg(x):
        if x is None:
            return None
        acc = jnp.tensordot(p, x.astype(jnp.promote_types(x.dtype, jnp.float32)), axes=1)
        return acc.astype(x.dtype)

    return jax.tree_util.tree_map(avg, stacked, is_leaf=_is_none)


def fedavg(trees: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """FedAvg of client trees (same structure, shapes, dtypes): ``Σ_k p_k θ_k``, ``p_k = n_k / Σ n_j``.

    Args:
      trees: one adapter tree per client (or `partition`'s trainable half: ``None`` leaves are kept).
      weights: client sizes ``n_k`` (>= 0, not all 0); None: the uniform mean.

    Raises:
      ValueError: no clients, mismatched trees (naming the client and leaf), bad weights.
    """
    check_clients(trees)
    return fedavg_stacked(stack(trees), _weights(weights, len(trees)))


# ----------------------------------------------------------------------------- DP-SGD


@dataclasses.dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings: per-example clip norm ``C``, noise multiplier ``σ`` (noise std ``σ·C``).

    ``expected_batch_size``: the divisor of the noisy sum (Opacus: the expected
    Poisson batch size ``q·n``); None: the batch's length.
    """

    clip_norm: float
    noise_multiplier: float
    expected_batch_size: int | None = None

    def __post_init__(self):
        for name in ("clip_norm", "noise_multiplier"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"DPSGD.{name} must be a finite number >= 0, got {v!r}")
        if self.clip_norm == 0:
            raise ValueError("DPSGD.clip_norm must be > 0 (every gradient would be clipped to 0)")
        b = self.expected_batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"DPSGD.expected_batch_size must be an int >= 1 or None, got {b!r}")


def clip_per_example(grads: Any, clip_norm: float) -> tuple[Any, jax.Array]:
    """Clip each example's gradient (leading axis ``[B, ...]`` on every leaf) to global L2 norm ``clip_norm``.

    The norm is over all leaves of one example; the factor is Opacus'
    ``min(1, C / (‖g_i‖ + 1e-6))``. Returns ``(clipped, norms_B)`` (norms before clipping).
    """
    leaves = [x for x in jax.tree_util.tree_leaves(grads)]
    if not leaves:
        raise ValueError("clip_per_example got a tree without arrays")
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1) for x in leaves)
    norms = jnp.sqrt(sq)
    factor = jnp.minimum(1.0, clip_norm / (norms + 1e-6))

    def scale(x):
        return None if x is None else (x * factor.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype))

    return jax.tree_util.tree_map(scale, grads, is_leaf=_is_none), norms


def dp_grad(
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    trainable: Any,
    frozen: Any,
    batch: Any,
    key: jax.Array,
    dp: DPSGD,
    mask: jax.Array | None = None,
) -> tuple[Any, jax.Array]:
    """The DP-SGD gradient ``(Σ_i m_i clip(g_i) + N(0, σ²C²)) / B`` of ``trainable``.

    Args:
      loss_fn: ``loss_fn(trainable, frozen, batch) -> scalar``, the mean loss
        of a batch; per-example gradients are its gradient on each example
        given as a batch of one (``batch[i:i+1]`` on every leaf).
      trainable, frozen: `partition`'s halves (frozen gets no gradient).
      batch: a tree of arrays with the examples on the leading axis ``[B, ...]``.
      key: PRNG key of the noise.
      dp: clip norm, noise multiplier, expected batch size (None: ``B``).
      mask: ``[B]`` 0/1, which examples are in the (Poisson) sample; None: all.

    Returns:
      ``(gradient like trainable, per-example norms [B] before clipping)``.
    """
    one = lambda t, ex: loss_fn(t, frozen, jax.tree_util.tree_map(lambda x: x[None], ex))  # noqa: E731
    per_ex = jax.vmap(jax.grad(one), in_axes=(None, 0))(trainable, batch)
    clipped, norms = clip_per_example(per_ex, dp.clip_norm)
    n = norms.shape[0]
    m = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    denom = float(dp.expected_batch_size or n)
    leaves, treedef = jax.tree_util.tree_flatten(clipped)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for x, k in zip(leaves, keys):
        s = jnp.tensordot(m, x.astype(jnp.float32), axes=1)
        noise = dp.noise_multiplier * dp.clip_norm * jax.random.normal(k, s.shape, jnp.float32)
        out.append(((s + noise) / denom).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out), norms


# ----------------------------------------------------------------------------- local training and rounds


def local_train(
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    tx: optax.GradientTransformation,
    trainable: Any,
    frozen: Any,
    batches: Any,
    *,
    dp: DPSGD | None = None,
    key: jax.Array | None = None,
) -> tuple[Any, jax.Array]:
    """``steps`` optimiser steps of ``trainable`` from a fresh ``tx`` state, one per batch (`jax.lax.scan`).

    Args:
      loss_fn: ``loss_fn(trainable, frozen, batch) -> scalar``.
      tx: optax transformation (its state starts fresh: one per client and round).
      trainable, frozen: the trained leaves and the rest (no gradient).
      batches: a tree of arrays ``[steps, ...]`` (one batch per step).
      dp: DP-SGD settings (`dp_grad` per step) or None (plain gradients).
      key: PRNG key of the DP noise (required with ``dp``).

    Returns:
      ``(trainable after the steps, losses [steps])`` (loss before each step).
    """
    if dp is not None and key is None:
        raise ValueError("local_train with dp=DPSGD(...) needs key= (the noise's PRNG key)")
    opt_state = tx.init(trainable)
    steps = jax.tree_util.tree_leaves(batches)[0].shape[0]
    keys = jax.random.split(jax.random.key(0) if key is None else key, steps)

    def step(carry, xs):
        t, s = carry
        batch, k = xs
        if dp is None:
            loss, g = jax.value_and_grad(loss_fn)(t, frozen, batch)
        else:
            loss = loss_fn(t, frozen, batch)
            g, _ = dp_grad(loss_fn, t, frozen, batch, k, dp)
        u, s = tx.update(g, s, t)
        return (optax.apply_updates(t, u), s), loss

    (trainable, _), losses = jax.lax.scan(step, (trainable, opt_state), (batches, keys))
    return trainable, losses


def fedavg_round(
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    tx: optax.GradientTransformation,
    global_trainable: Any,
    frozen: Any,
    client_batches: Any,
    weights: Any = None,
    *,
    dp: DPSGD | None = None,
    key: jax.Array | None = None,
) -> tuple[Any, jax.Array]:
    """One FedAvg round with the clients as a `jax.vmap` axis; jit it with ``loss_fn``/``tx``/``dp`` bound.

    Every client starts from ``global_trainable`` (shared ``frozen``: the base
    and frozen adapter buffers are broadcast, not copied), runs `local_train`
    on its batches, and the server returns ``Σ_k p_k θ_k``.

    Args:
      client_batches: a tree of arrays ``[K, steps, ...]`` (clients that share
        batch shapes; otherwise loop over `local_train` and call `fedavg`).
      weights: ``[K]`` client sizes (None: uniform).
      dp, key: DP-SGD on every client (key split per client).

    Returns:
      ``(new global trainable, losses [K, steps])``.
    """
    if dp is not None and key is None:
        raise ValueError("fedavg_round with dp=DPSGD(...) needs key= (the noise's PRNG key)")
    k = jax.tree_util.tree_leaves(client_batches)[0].shape[0]
    keys = jax.random.split(jax.random.key(0) if key is None else key, k)

    def client(batches, ck):
        return local_train(loss_fn, tx, global_trainable, frozen, batches, dp=dp, key=ck if dp else None)

    trained, losses = jax.vmap(client)(client_batches, keys)
    w = weights if weights is None or isinstance(weights, jax.core.Tracer) else _weights(weights, k)
    return fedavg_stacked(trained, w), losses


def pfedlora_local(
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    tx_local: optax.GradientTransformation,
    tx_adapter: optax.GradientTransformation,
    local: Any,
    adapter: Any,
    local_batches: Any,
    adapter_batches: Any,
    *,
    order: tuple[str, str] = ("local", "adapter"),
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One pFedLoRA client round: train the local model (adapter frozen), then the adapter (local frozen).

    Args:
      loss_fn: ``loss_fn(local, adapter, batch) -> scalar`` (the client's own model).
      tx_local, tx_adapter: optimisers of the two phases (fresh state each phase).
      local: the client's local model tree (any structure; never communicated).
      adapter: the shared adapter's trainable leaves (from the global adapter).
      local_batches, adapter_batches: ``[steps, ...]`` batches of the two phases.
      order: ``("local", "adapter")`` (default) or ``("adapter", "local")``.

    Returns:
      ``(local, adapter, {"local": losses, "adapter": losses})``.
    """
    if sorted(order) != ["adapter", "local"]:
        raise ValueError(f"order must be ('local', 'adapter') or ('adapter', 'local'), got {order!r}")
    losses = {}
    for phase in order:
        if phase == "local":
            local, losses["local"] = local_train(loss_fn, tx_local, local, adapter, local_batches)
        else:
            adapter, losses["adapter"] = local_train(
                lambda a, p, b: loss_fn(p, a, b), tx_adapter, adapter, local, adapter_batches
            )
    return local, adapter, losses


def pfedlora_round(
    client_steps: Sequence[Callable[[Any, Any, Any, Any], tuple[Any, Any, dict]]],
    locals_: Sequence[Any],
    global_adapter: Any,
    client_batches: Sequence[tuple[Any, Any]],
    sizes: Sequence[float] | None = None,
) -> tuple[list[Any], Any, list[dict]]:
    """One pFedLoRA round over heterogeneous clients (a Python loop), aggregating the adapters only.

    Args:
      client_steps: per client ``step(local, adapter, local_batches, adapter_batches)
        -> (local, adapter, losses)``, e.g. ``jax.jit(partial(pfedlora_local,
        loss_fn_k, tx_local, tx_adapter))`` (one compile per client structure).
      locals_: the clients' local model trees (any structures).
      global_adapter: the shared adapter (trainable leaves), sent to every client.
      client_batches: per client ``(local_batches, adapter_batches)``.
      sizes: client sizes ``n_k`` for the weighted average (None: uniform).

    Returns:
      ``(new locals, new global adapter, per-client losses)``.

    Raises:
      ValueError: lists of different lengths, or a client returns an adapter
        whose structure differs from the global one (naming the client and leaf).
    """
    n = len(client_steps)
    if not (len(locals_) == len(client_batches) == n) or n == 0:
        raise ValueError(
            f"pfedlora_round needs one step, local model and batches per client; got {n} steps, "
            f"{len(locals_)} local models, {len(client_batches)} batch pairs"
        )
    new_locals, adapters, losses = [], [], []
    for step, local, (lb, ab) in zip(client_steps, locals_, client_batches):
        local, adapter, ls = step(local, global_adapter, lb, ab)
        new_locals.append(local)
        adapters.append(adapter)
        losses.append(ls)
    check_clients([global_adapter, *adapters], what="shared adapter")
    return new_locals, fedavg(adapters, sizes), losses


def fed_sb_aggregate(spec: Spec, client_adapters: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """Fed-SB's exact aggregation: the (weighted) mean of the clients' ``lora_R``, their shared A and B kept.

    Args:
      spec: a LoRA-XS Spec (LoRA-SB's architecture; `lorajax.inits.lora_sb` gives the init).
      client_adapters: each client's full adapters tree (``lora_A``, ``lora_R``, ``lora_B`` per target).
      weights: client sizes; None: the official unweighted mean.

    Returns:
      The aggregated adapters: ``s·A (Σ p_k R_k) B = Σ p_k s·A R_k B`` at every target.

    Raises:
      ValueError: not a LoRA-XS Spec, mismatched trees, or clients whose
        frozen ``lora_A``/``lora_B`` differ (then averaging R is not exact:
        initialise every client from the same LoRA-SB init).
    """
    if registry.get(spec.variant).init is not lora_xs.init:
        raise ValueError(f"Fed-SB aggregates LoRA-SB (the 'lora_xs' architecture); got variant {spec.variant!r}")
    check_clients(client_adapters)
    parts = [partition(spec, a) for a in client_adapters]
    f0 = parts[0][1]
    for k, (_, fk) in enumerate(parts[1:], start=1):
        same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), f0, fk)
        for path, ok in jax.tree_util.tree_flatten_with_path(same)[0]:
            if not ok:
                raise ValueError(
                    f"client {k}'s frozen {jax.tree_util.keystr(path)} differs from client 0's: Fed-SB's "
                    "aggregation is exact only when all clients share A and B (one LoRA-SB init for all)"
                )
    return combine(fedavg([p[0] for p in parts], weights), f0)


# ----------------------------------------------------------------------------- the (ε, δ) account


def _accounting():
    try:
        import dp_accounting  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - the experiments extra installs it
        raise ImportError(
            "the DP account needs Google's dp_accounting: pip install dp-accounting (or lorajax's experiments extra)"
        ) from e
    return dp_accounting


def _check_account(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1] (batch size / client size), got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1) (e.g. 1 / client size), got {delta!r}")


def _accountant(noise_multiplier: float, sample_rate: float, steps: int, orders: Sequence[float] | None = None):
    dpa = _accounting()
    acc = dpa.rdp.RdpAccountant() if orders is None else dpa.rdp.RdpAccountant(orders=list(orders))
    event = dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(noise_multiplier))
    acc.compose(event, steps)
    return acc


def dp_rdp(noise_multiplier: float, sample_rate: float, steps: int, orders: Sequence[float]) -> np.ndarray:
    """Rényi DP of ``steps`` Poisson-subsampled Gaussian steps at each order α (``dp_accounting``)."""
    _check_account(noise_multiplier, sample_rate, steps)
    return np.asarray(_accountant(noise_multiplier, sample_rate, steps, orders).rdp, np.float64)


def dp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of DP-SGD (noise ``σ``, Poisson rate ``q``, ``steps`` steps) at ``δ``: the RDP account."""
    _check_account(noise_multiplier, sample_rate, steps)
    _check_delta(delta)
    return float(_accountant(noise_multiplier, sample_rate, steps).get_epsilon(delta))


def dp_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    max_noise_multiplier: float = 100.0,
    rtol: float = 1e-3,
) -> float:
    """The smallest ``σ`` (to ``rtol``) whose `dp_epsilon` is ``<= target_epsilon``.

    Raises:
      ValueError: a bad argument, or a budget that cannot be met: even
        ``σ = max_noise_multiplier`` spends more than ``target_epsilon``
        (naming the ε it reaches; raise the cap, take fewer steps, a smaller
        sample rate, or a larger ε).
    """
    if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    _check_delta(delta)
    _check_account(max_noise_multiplier, sample_rate, steps)
    hi = float(max_noise_multiplier)
    eps_hi = dp_epsilon(hi, sample_rate, steps, delta)
    if eps_hi > target_epsilon:
        raise ValueError(
            f"privacy budget cannot be met: ε={target_epsilon} at δ={delta} needs more noise than "
            f"noise_multiplier={hi} (which spends ε={eps_hi:.4g} over {steps} steps at sample rate "
            f"{sample_rate}); raise max_noise_multiplier, take fewer steps or a smaller sample rate, "
            "or allow a larger ε"
        )
    lo = hi / 2
    while dp_epsilon(lo, sample_rate, steps, delta) <= target_epsilon:
        hi, lo = lo, lo / 2
        if lo < 1e-3:
            return hi
    while hi - lo > rtol * hi:
        mid = math.sqrt(lo * hi)
        if dp_epsilon(mid, sample_rate, steps, delta) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def check_budget(target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """The ε a planned DP-SGD run spends; ValueError if it exceeds ``target_epsilon`` (before any training)."""
    eps = dp_epsilon(noise_multiplier, sample_rate, steps, delta)
    if eps > target_epsilon:
        raise ValueError(
            f"privacy budget cannot be met: noise_multiplier={noise_multiplier}, sample rate {sample_rate}, "
            f"{steps} steps spend ε={eps:.4g} > target ε={target_epsilon} at δ={delta}; "
            f"use dp_noise_multiplier({target_epsilon}, {delta}, {sample_rate}, {steps}) or fewer steps"
        )
    return eps
