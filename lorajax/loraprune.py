"""LoRAPrune: structured pruning of a Llama guided by the gradients of its LoRA adapters (spec §13a).

While a plain LoRA trains, every step scores the model's units from the
adapters' gradients alone, keeps an exponential moving average of the scores,
and every ``prune_freq`` steps masks the lowest-scoring units of each layer up
to a cubic sparsity schedule; at the end the masked units are removed
physically (`lorajax.loram.prune`, `lorajax.loram.prune_adapters`).

Units (per decoder layer, the same as `lorajax.loram`'s; Flax kernels
``[in, out]``, ``H`` query heads, ``K`` kv heads, ``G = H/K``, head dim ``d``,
``I`` MLP neurons): a kv head ``h`` with its GQA group of query heads (k/v
columns ``[h·d, (h+1)·d)``, q columns and o rows ``[h·G·d, (h+1)·G·d)``) and an
MLP neuron ``j`` (gate/up column ``j``, down row ``j``). Head counts come from
the model's `llama.Config`; the official code hard-codes 32 attention heads
(``head_dim = out_features // 32``), which is right for Llama-7B's q/k/v/o only.

Importance (`importance`, official ``compute_sensitivity`` with metric
``"lora"``). PyTorch writes ``W [out, in]``, ``lora_A [r, in]``, ``lora_B [out, r]``,
``ΔW = s·B A`` and the proxy of the weight gradient
``Ĝ = G_B A + B G_A − G_B G_A`` (``G_*``: the gradients of the LoRA factors, which
carry ``s``). Here every matrix is the transpose (``W [in, out]``, ``A [in, r]``,
``B [r, out]``, ``ΔW = s·A B``), so ``Ĝ [in, out]`` is the transpose of that::

    Ĝ = A G_B + G_A B − G_A G_B  =  A B − (A − G_A)(B − G_B)
    I = |Ĝ ⊙ (W + s·A B)|                                        [in, out]

i.e. ``Ĝ`` is the change of ``A B`` by one SGD step of learning rate 1 on the
factors. With the true weight gradient ``G_W = ∂L/∂(W + sAB)`` one has
``G_A = s·G_W Bᵀ`` and ``G_B = s·Aᵀ G_W``, so ``Ĝ = s(A Aᵀ G_W + G_W Bᵀ B) −
s² G_W Bᵀ Aᵀ G_W``: ``G_W`` projected on the adapters' row and column spaces.
Only the adapters' gradients ``[in, r]`` / ``[r, out]`` are taken (no
``xᵀ dy`` of a frozen weight); ``Ĝ`` is weight-shaped but formed from the
factors by products that contract over the rank. ``metric="magnitude"``
(official too) uses ``I = |W + s·A B|``; the official ``"grad"`` needs the
true ``G_W`` and is not offered.

Grouping (`group_scores`): each module's ``I`` is summed to one score per unit,
over its input axis for q/k/v/gate/up (output columns) and over its output
axis for o/down (input rows; the official scores o_proj and down_proj
transposed), then over each unit's columns/rows (``G·d`` for q/o, ``d`` for
k/v); each module's vector is L2-normalised (``v / (‖v‖ + 1e-8)``) and the
vectors are summed over the layer's q/k/v/o (kv heads) and gate/up/down
(neurons). The moving average (`ema`) is ``S ← 0.9·S + 0.1·S_step``, skipped
when ``S_step`` is not finite (the official skips on NaN).

Schedule (`schedule_sparsity_ratio`, official name and arguments): with
``w = warmup·total`` and ``c = cooldown·total``, ``init_ratio`` while
``step <= w``; ``ratio`` once ``step > total − c``; in between
``ratio + (init_ratio − ratio)·m³`` with ``m = 1 − (step − w) / (total − w − c)``
(``m = 0``, i.e. ``ratio``, at ``step = total − c``).

Masks (`masks`): in every layer except ``exclude_layers`` (default
`default_exclude_layers`: the first ``int(0.1·L)`` layers and the last, as the
official ``freeze``) the ``int(n·ratio)`` lowest-scoring of the ``n = K`` kv
heads and of the ``n = I`` neurons are masked; units masked before rank below
every other (the official multiplies the scores by the old mask, i.e. scores
them 0: the same unless an unmasked unit scores exactly 0), so the masks grow
with the schedule. The official masks the output (incl. bias) of q/k/v/gate/up;
`apply_masks` zeroes those output columns and bias entries, and also the o/down
input rows of the masked units (which then see zero inputs anyway), so the
masked model is the physically pruned one with zeros. In a step the adapters
are masked too (`mask_adapters`: ``lora_B`` columns of q/k/v/gate/up, ``lora_A``
rows of o/down): that is the official ``output · μ`` of base and LoRA together.

Training (`make_step`; order as the official trainer): forward and loss on the
masked params and adapters; gradients of the trainable adapters only;
importance of the unmasked weights and adapters (as the official's
``layer.weight`` and LoRA weights) -> `group_scores` -> `ema`; then, at steps
with ``step % prune_freq == 0``, new masks at the scheduled ratio; then the
optimiser step. **Quirk** (official, the default ``strict=True``): masks are
updated only while ``init_ratio < scheduled < ratio``, so the last update comes
just before the schedule reaches ``ratio`` and the final sparsity can end a
little below the target (e.g. 31 of 64 neurons for ``ratio = 0.5``, 20 steps, ``prune_freq = 2``);
``strict=False`` also updates when the schedule equals ``ratio``. Schedule
values and unit counts are tabulated on the host in float64 (``int(n·ratio)``
exactly as the official computes them), not recomputed in float32 inside jit.

Recipe::

    prune = loraprune.init_state(cfg)
    step = loraprune.make_step(loss_fn, tx, cfg, spec, total_steps=T)   # loss_fn as for make_lora_step
    for i in range(T):
        state, prune, metrics = step(params, state, prune, batch_fn(i))
    keep = loraprune.to_keep(prune.masks)            # needs equal counts per layer: exclude_layers=()
    small_cfg, small = loram.prune(cfg, params, keep)
    small_adapters = loram.prune_adapters(state.combined, keep, cfg)
    merged = lorajax.merge(spec, small, small_adapters)   # the official merges after pruning

`lorajax.loram.Keep` describes one `llama.Config`, so every layer must keep the
same number of units; layers in ``exclude_layers`` keep all theirs, so masks
made with excluded layers stay masks (the masked model computes what the
pruned one would) and `to_keep` refuses them. The official resizes each PyTorch
module on its own and has no such limit.

Example:
  >>> import jax, lorajax
  >>> from lorajax import loraprune
  >>> from lorajax.models import llama
  >>> cfg = llama.Config(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
  ...                    num_attention_heads=4, num_key_value_heads=2)
  >>> scores = loraprune.init_state(cfg).scores
  >>> scores = {"kv_heads": scores["kv_heads"].at[:, 1].set(1.0), "mlp": jax.numpy.arange(16.0).reshape(2, 8)}
  >>> m = loraprune.masks(scores, cfg, 0.5, exclude_layers=())
  >>> m["kv_heads"].tolist(), m["mlp"][0].tolist()
  ([[False, True], [False, True]], [False, False, False, False, True, True, True, True])
  >>> round(loraprune.schedule_sparsity_ratio(50, 100, 0.1, 0.1, 0.0, 0.5), 4)
  0.4375

References:
  M. Zhang et al., "LoRAPrune: Structured Pruning Meets Low-Rank
  Parameter-Efficient Fine-Tuning", Findings of ACL 2024, arXiv:2305.18403.
  Official code ``aim-uofa/LoRAPrune``: ``loraprune/utils.py``
  (``compute_sensitivity``, ``update_sensitivity_dict``, ``local_prune``,
  ``schedule_sparsity_ratio``, ``freeze``, ``prune_fp16_module``),
  ``loraprune/lora.py`` (``lora_mask`` on the layer output),
  ``loraprune/trainer.py`` (order of the step). lorajax spec ``adapters.md`` §13a.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from lorajax import loram, paths, registry
from lorajax.adapters import combine
from lorajax.plan import make_plan
from lorajax.train.state import TrainState
from lorajax.variants import lora

__all__ = [
    "METRICS",
    "PruneState",
    "proxy_gradient",
    "importance",
    "group_scores",
    "ema",
    "schedule_sparsity_ratio",
    "default_exclude_layers",
    "masks",
    "apply_masks",
    "mask_adapters",
    "to_keep",
    "init_state",
    "make_step",
]

#: importance metrics of `importance` (the official's ``"grad"`` needs full weight gradients: not offered)
METRICS = ("lora", "magnitude")
#: added to each module's L2 norm before normalising its unit scores (official)
EPS = 1e-8
#: the unit kinds of scores and masks: ``"kv_heads" [L, K]``, ``"mlp" [L, I]``
UNITS = ("kv_heads", "mlp")
_BLOCK_UNIT = {"self_attn": "kv_heads", "mlp": "mlp"}
_LORA_LEAVES = ("lora_A", "lora_B")


# ----------------------------------------------------------------------------- importance


def proxy_gradient(a_INxR: jax.Array, b_RxOUT: jax.Array, g_a_INxR: jax.Array, g_b_RxOUT: jax.Array) -> jax.Array:
    """``Ĝ [in, out] = A G_B + G_A B − G_A G_B``: LoRAPrune's weight-gradient proxy in Flax layout.

    The transpose of the paper's ``G_B A + B G_A − G_B G_A`` (PyTorch ``A [r, in]``,
    ``B [out, r]``); equal to ``A B − (A − G_A)(B − G_B)``. Every product contracts over the rank.
    """
    return a_INxR @ g_b_RxOUT + g_a_INxR @ b_RxOUT - g_a_INxR @ g_b_RxOUT


def _leaf(tree: Any, keys: tuple) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _check_variant(spec: Any) -> None:
    registry.plain_lora(spec.variant, "LoRAPrune (it scores plain LoRA adapters)")


def _check_metric(metric: Any) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown; choose one of {list(METRICS)}")


def importance(params: Any, adapters: Any, grads: Any, spec: Any, *, metric: str = "lora") -> dict[tuple, jax.Array]:
    """``{target keys: I [in, out] float32}``: each adapted weight's elementwise importance (module doc).

    Args:
      params: the base params (bare or ``{"params": ...}``); the weights ``W`` of ``I``
        (the unmasked ones, as the official's ``layer.weight``).
      adapters: plain LoRA adapters of ``spec`` (``lora_A [in, r]``, ``lora_B [r, out]``).
      grads: the loss's gradients of ``adapters``, a tree of the same layout (``None`` allowed
        with ``metric="magnitude"``).
      spec: the adapters' `lorajax.Spec` (variant ``"lora"``; its scale ``s`` per target).
      metric: ``"lora"``: ``|Ĝ ⊙ (W + s·A B)|``; ``"magnitude"``: ``|W + s·A B|``.

    Keys are the targets' paths in ``params`` (with a leading ``"params"`` for a variables dict).

    Raises:
      ValueError: another variant or metric, adapters or grads that do not fit ``params``, a grads
        leaf missing or of another shape than its adapter leaf.
    """
    _check_variant(spec)
    _check_metric(metric)
    plan = make_plan(spec, params, adapters)
    gplan = make_plan(spec, params, grads) if metric == "lora" else None
    out = {}
    for t in plan.targets:
        where = "/".join(t.keys)
        ad = plan.adapters[t.keys]
        if set(ad) != set(_LORA_LEAVES):
            raise ValueError(f"adapter at {where} has leaves {sorted(ad)}, LoRAPrune needs {list(_LORA_LEAVES)}")
        a, b = (ad[k].astype(jnp.float32) for k in _LORA_LEAVES)
        w_INxOUT = jnp.reshape(_leaf(params, t.keys), t.matrix_shape).astype(jnp.float32)
        weight = w_INxOUT + lora.scaling(t) * (a @ b)
        if gplan is None:
            out[t.keys] = jnp.abs(weight)
            continue
        g = gplan.adapters[t.keys]
        for k in _LORA_LEAVES:
            if getattr(g.get(k), "shape", None) != ad[k].shape:
                got = "no gradient" if g.get(k) is None else f"shape {tuple(g[k].shape)}"
                raise ValueError(
                    f"grads at {where}/{k}: {got}, want the adapter's shape {tuple(ad[k].shape)} "
                    "(grads must be the gradients of these adapters, lora_A and lora_B both trained)"
                )
        g_hat = proxy_gradient(a, b, g["lora_A"].astype(jnp.float32), g["lora_B"].astype(jnp.float32))
        out[t.keys] = jnp.abs(g_hat * weight)
    return out


def _unit_count(cfg: Any, unit: str) -> int:
    return cfg.num_key_value_heads if unit == "kv_heads" else cfg.intermediate_size


def group_scores(imp: dict[tuple, jax.Array], cfg: Any) -> dict[str, jax.Array]:
    """``{"kv_heads": [L, K], "mlp": [L, I]}`` float32: one step's unit scores from `importance`'s dict.

    Per module: ``I`` summed per output column (q/k/v/gate/up) or input row (o/down), then per unit
    (kv head ``h``: ``G·d`` q columns / o rows, ``d`` k/v columns; neuron: 1), L2-normalised
    (``v / (‖v‖ + 1e-8)``); summed over the layer's modules of the unit. Entries of ``imp`` that
    are not a layer's q/k/v/o/gate/up/down kernel (e.g. ``lm_head``) are ignored.

    Raises:
      ValueError: a module's size does not fit ``cfg``, a layer index is out of range, or a layer
        has no scored module of a block (target q/k/v/o and gate/up/down, e.g. ``"all-linear"``).
    """
    L = cfg.num_hidden_layers
    acc: dict[str, list] = {u: [None] * L for u in UNITS}
    for keys, value in imp.items():
        found = loram._module_of(tuple(keys))
        if found is None:
            continue
        layer, block, name = found
        where = "/".join(keys)
        if layer >= L:
            raise ValueError(f"importance at {where} is in layer {layer}; the model has {L} layers (0..{L - 1})")
        side, unit = loram.MODULES[(block, name)]
        kind = _BLOCK_UNIT[block]
        n, width = _unit_count(cfg, kind), loram._full_size(cfg, unit)
        axis = 1 if side == "in" else 0  # sum over the other axis: output columns for "out", input rows for "in"
        if value.ndim != 2 or value.shape[1 - axis] != width:
            raise ValueError(
                f"importance at {where} has shape {tuple(value.shape)}; the config gives {width} "
                f"{'output columns' if side == 'out' else 'input rows'} for {name}"
            )
        v_U = value.sum(axis=axis).reshape(n, width // n).sum(axis=1)
        v_U = v_U / (jnp.linalg.norm(v_U) + EPS)
        acc[kind][layer] = v_U if acc[kind][layer] is None else acc[kind][layer] + v_U
    for kind, rows in acc.items():
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            block = "q/k/v/o_proj" if kind == "kv_heads" else "gate/up/down_proj"
            raise ValueError(
                f"no importance for the {kind} of layers {missing}: adapt at least one of {block} in every layer "
                "(LoRAPrune scores units from the adapters' gradients; e.g. targets='all-linear')"
            )
    return {kind: jnp.stack(rows).astype(jnp.float32) for kind, rows in acc.items()}


def ema(scores: dict[str, jax.Array], step_scores: dict[str, jax.Array], decay: float = 0.9) -> dict[str, jax.Array]:
    """``decay·S + (1 − decay)·S_step`` per leaf; ``scores`` unchanged if any ``S_step`` entry is not finite.

    Raises:
      ValueError: trees of different structure or shapes.
    """
    mine: Any = jax.tree.structure(scores)  # Any: jaxlib has no stubs for PyTreeDef
    theirs: Any = jax.tree.structure(step_scores)
    if mine != theirs:
        raise ValueError(f"scores and step_scores differ in structure: {mine} vs {theirs}")
    for s, n in zip(jax.tree.leaves(scores), jax.tree.leaves(step_scores)):
        if s.shape != n.shape:
            raise ValueError(f"scores and step_scores differ in shape: {tuple(s.shape)} vs {tuple(n.shape)}")
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(n)) for n in jax.tree.leaves(step_scores)]))
    return jax.tree.map(lambda s, n: jnp.where(finite, decay * s + (1.0 - decay) * n, s), scores, step_scores)


# ----------------------------------------------------------------------------- schedule


def _check_fraction(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_schedule(total: Any, warmup: Any, cooldown: Any, init_ratio: Any, ratio: Any) -> None:
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 1:
        raise ValueError(f"total (the number of training steps) must be a positive int, got {total!r}")
    w, c = _check_fraction("warmup", warmup), _check_fraction("cooldown", cooldown)
    if w + c >= 1.0:
        raise ValueError(f"warmup + cooldown must be < 1 (a pruning phase is left), got {warmup!r} + {cooldown!r}")
    _check_fraction("init_ratio", init_ratio)
    _check_fraction("ratio", ratio)


def schedule_sparsity_ratio(
    step: Any,
    total: int,
    warmup: float = 0.1,
    cooldown: float = 0.1,
    init_ratio: float = 0.0,
    ratio: float = 0.5,
) -> Any:
    """The scheduled sparsity at ``step`` of ``total`` (module doc; the official function and argument order).

    ``init_ratio`` for ``step <= warmup·total``, ``ratio`` for ``step > total − cooldown·total``,
    else ``ratio + (init_ratio − ratio)·m³``, ``m = 1 − (step − warmup·total) / (total − (warmup +
    cooldown)·total)``. A Python float for a host ``step`` (int / numpy), a float32 array for a jax one.

    Raises:
      ValueError: ``total`` not a positive int, a fraction outside [0, 1), or ``warmup + cooldown >= 1``.
    """
    _check_schedule(total, warmup, cooldown, init_ratio, ratio)
    xp = jnp if isinstance(step, jax.Array) else np
    w = warmup * total
    m = 1.0 - (step - w) / (total - (warmup + cooldown) * total)
    cubic = ratio + (init_ratio - ratio) * m**3
    out = xp.where(step <= w, init_ratio, xp.where(step > total - cooldown * total, ratio, cubic))
    return float(out) if xp is np else out.astype(jnp.float32)


# ----------------------------------------------------------------------------- masks


def default_exclude_layers(num_layers: int) -> tuple[int, ...]:
    """The layers the official never prunes (``freeze``): ``0 .. int(0.1·L) − 1`` and the last, ``L − 1``."""
    return tuple(sorted(set(range(int(num_layers * 0.1))) | {num_layers - 1}))


def _check_exclude(exclude_layers: Any, num_layers: int) -> tuple[int, ...]:
    if exclude_layers is None:
        return default_exclude_layers(num_layers)
    if isinstance(exclude_layers, (str, bytes)) or not hasattr(exclude_layers, "__iter__"):
        raise ValueError(f"exclude_layers must be a list of layer indices or None, got {exclude_layers!r}")
    out = []
    for i in exclude_layers:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < num_layers:
            raise ValueError(f"exclude_layers has {i!r}: layer indices are ints in 0..{num_layers - 1}")
        out.append(int(i))
    return tuple(sorted(set(out)))


def _check_unit_tree(tree: Any, cfg: Any, what: str) -> None:
    if not isinstance(tree, dict) or set(tree) != set(UNITS):
        got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"{what} must be a dict with keys {list(UNITS)}, got {got}")
    for kind in UNITS:
        want = (cfg.num_hidden_layers, _unit_count(cfg, kind))
        if tuple(tree[kind].shape) != want:
            raise ValueError(f"{what}[{kind!r}] has shape {tuple(tree[kind].shape)}, the config gives {want} [L, n]")


def _pruned_counts(cfg: Any, ratio: float) -> dict[str, int]:
    """``int(n·ratio)`` per unit kind (the official's ``need_prune_num``), in float64."""
    return {kind: int(_unit_count(cfg, kind) * ratio) for kind in UNITS}


def _masks_of_counts(
    scores: dict[str, jax.Array], counts: dict[str, Any], exclude: tuple[int, ...], previous: dict[str, jax.Array]
) -> dict[str, jax.Array]:
    """Mask (False) the ``counts[kind]`` lowest scores of each layer's row; previously masked units rank
    lowest; ties: the lower index first; rows in ``exclude`` keep everything. ``counts`` may be traced."""
    out = {}
    for kind in UNITS:
        key_LxN = jnp.where(previous[kind], scores[kind].astype(jnp.float32), -jnp.inf)
        order_LxN = jnp.argsort(key_LxN, axis=1, stable=True)
        rank_LxN = jnp.argsort(order_LxN, axis=1, stable=True)
        excluded_L = np.isin(np.arange(key_LxN.shape[0]), np.asarray(exclude, np.int64))
        out[kind] = (rank_LxN >= counts[kind]) | jnp.asarray(excluded_L)[:, None]
    return out


def masks(
    scores: dict[str, jax.Array],
    cfg: Any,
    ratio: float,
    *,
    exclude_layers: Sequence[int] | None = None,
    previous: dict[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """``{"kv_heads": bool [L, K], "mlp": bool [L, I]}`` (True: kept): each layer's lowest-scoring units masked.

    Args:
      scores: ``{"kv_heads": [L, K], "mlp": [L, I]}`` (`group_scores`, `ema`).
      cfg: the model's `llama.Config`.
      ratio: the fraction masked, in [0, 1): ``int(n·ratio)`` of each layer's ``K`` kv heads and ``I``
        neurons (a kv head with its ``G`` query heads).
      exclude_layers: layers that keep every unit; None: `default_exclude_layers` (the official's).
      previous: the current masks; their masked units rank below every other (so they stay masked
        while the count does not shrink). None: nothing masked yet.

    Raises:
      ValueError: ``ratio`` outside [0, 1), scores / previous of another layout or shape, bad layer indices.
    """
    ratio = _check_fraction("ratio", ratio)
    _check_unit_tree(scores, cfg, "scores")
    exclude = _check_exclude(exclude_layers, cfg.num_hidden_layers)
    if previous is None:
        previous = {kind: jnp.ones(scores[kind].shape, bool) for kind in UNITS}
    _check_unit_tree(previous, cfg, "previous")
    return _masks_of_counts(scores, _pruned_counts(cfg, ratio), exclude, previous)


def _expand(mu_U: jax.Array, size: int, where: str) -> jax.Array:
    """``[size]``: each unit's flag repeated over its ``size / U`` consecutive columns or rows."""
    if size % mu_U.shape[0]:
        raise ValueError(f"{where} has {size} channels, not a multiple of the mask's {mu_U.shape[0]} units")
    return jnp.repeat(mu_U, size // mu_U.shape[0])


def _zero_weight(module: dict, side: str, mu_U: jax.Array, where: str) -> dict:
    """A Dense's params with the masked output columns (and bias entries) or input rows zeroed."""
    k = module["kernel"]
    out = dict(module)
    if side == "out":
        mu = _expand(mu_U, k.shape[1], where)
        out["kernel"] = jnp.where(mu[None, :], k, jnp.zeros((), k.dtype))
        if "bias" in module:
            out["bias"] = jnp.where(mu, module["bias"], jnp.zeros((), module["bias"].dtype))
    else:
        mu = _expand(mu_U, k.shape[0], where)
        out["kernel"] = jnp.where(mu[:, None], k, jnp.zeros((), k.dtype))
    return out


def _zero_adapter(module: dict, side: str, mu_U: jax.Array, where: str) -> dict:
    """An adapter with the masked ``lora_B`` columns (output side) or ``lora_A`` rows (input side) zeroed."""
    ad = module["kernel"]
    if not isinstance(ad, dict) or not set(_LORA_LEAVES) <= set(ad):
        raise ValueError(f"adapter at {where} is not plain LoRA (needs {list(_LORA_LEAVES)})")
    new = dict(ad)
    if side == "out":
        b = ad["lora_B"]
        new["lora_B"] = jnp.where(_expand(mu_U, b.shape[1], where)[None, :], b, jnp.zeros((), b.dtype))
    else:
        a = ad["lora_A"]
        new["lora_A"] = jnp.where(_expand(mu_U, a.shape[0], where)[:, None], a, jnp.zeros((), a.dtype))
    return {**module, "kernel": new}


def _mask_layers(tree: Any, mask_tree: dict, zero: Callable, what: str, whole: bool) -> Any:
    """``tree`` (params or adapters, bare or ``{"params": ...}``) with ``zero`` applied to every layer's
    q/k/v/o/gate/up/down entry; ``whole``: every layer and module must be there (params)."""
    if not isinstance(mask_tree, dict) or set(mask_tree) != set(UNITS):
        raise ValueError(f"masks must be a dict with keys {list(UNITS)}, got {mask_tree!r:.200}")
    kv_LxK, mlp_LxI = (jnp.asarray(mask_tree[k]).astype(bool) for k in UNITS)
    if kv_LxK.ndim != 2 or mlp_LxI.ndim != 2 or kv_LxK.shape[0] != mlp_LxI.shape[0]:
        raise ValueError(f"masks must be kv_heads [L, K] and mlp [L, I], got shapes {kv_LxK.shape} and {mlp_LxI.shape}")
    wrapped = paths.is_variables(tree)
    root = tree["params"] if wrapped else tree
    try:
        layers = root["model"]["layers"]
    except (KeyError, TypeError):
        raise ValueError(f"{what} has no model.layers: LoRAPrune masks lorajax.models.llama trees") from None
    L = kv_LxK.shape[0]
    if whole and len(layers) != L:
        raise ValueError(f"masks have {L} layers, the {what} {len(layers)}")
    new_layers = dict(layers)
    for i in range(L):
        if str(i) not in layers:
            if whole:
                raise ValueError(f"{what} has no model.layers.{i} (the masks have {L} layers)")
            continue
        layer = layers[str(i)]
        new = dict(layer)
        for (block, name), (side, unit) in loram.MODULES.items():
            if block not in layer or name not in layer[block]:
                if whole:
                    raise ValueError(f"{what} has no model.layers.{i}.{block}.{name}")
                continue
            mu_U = kv_LxK[i] if unit in ("q", "kv") else mlp_LxI[i]
            where = f"model.layers.{i}.{block}.{name}"
            new[block] = {**new[block], name: zero(layer[block][name], side, mu_U, where)}
        new_layers[str(i)] = new
    out = {**root, "model": {**root["model"], "layers": new_layers}}
    return {**tree, "params": out} if wrapped else out


def apply_masks(params: Any, mask_tree: dict) -> Any:
    """``params`` with each layer's masked units zeroed (a new tree; bare or ``{"params": ...}`` as given).

    q/k/v (kv head ``h``: k/v columns ``[h·d, (h+1)·d)``, q columns ``[h·G·d, (h+1)·G·d)``) and gate/up
    (neuron columns): kernel columns and bias entries; o (rows ``[h·G·d, (h+1)·G·d)``) and down (neuron
    rows): kernel rows (their ``[D]`` biases stay). ``mask_tree``: `masks`' dict (True: kept).
    """
    return _mask_layers(params, mask_tree, _zero_weight, "params", whole=True)


def mask_adapters(adapters: Any, mask_tree: dict) -> Any:
    """LoRA ``adapters`` with the masked units zeroed: ``lora_B [r, out]`` columns of q/k/v/gate/up and
    ``lora_A [in, r]`` rows of o/down (the columns / rows `apply_masks` zeroes in the weights).
    Adapters on other weights and layers without adapters are left as they are."""
    return _mask_layers(adapters, mask_tree, _zero_adapter, "adapters", whole=False)


def to_keep(mask_tree: dict) -> loram.Keep:
    """The `loram.Keep` of the kept (True) units, for `loram.prune` / `loram.prune_adapters`.

    Raises:
      ValueError: layers keep different numbers of units (e.g. excluded layers keep all theirs):
        a `Keep` describes one `llama.Config`.
    """
    if not isinstance(mask_tree, dict) or set(mask_tree) != set(UNITS):
        raise ValueError(f"masks must be a dict with keys {list(UNITS)}, got {mask_tree!r:.200}")
    lists = {
        kind: tuple(tuple(np.flatnonzero(row).tolist()) for row in np.asarray(mask_tree[kind], bool)) for kind in UNITS
    }
    for kind, rows in lists.items():
        counts = [len(r) for r in rows]
        if len(set(counts)) > 1:
            raise ValueError(
                f"the masks keep {counts} {kind} per layer: loram.prune builds one llama.Config, so every layer "
                "must keep the same number (mask with exclude_layers=() to prune physically, or keep the masks)"
            )
    return loram.Keep(mlp=lists["mlp"], kv_heads=lists["kv_heads"])


# ----------------------------------------------------------------------------- training


@struct.dataclass
class PruneState:
    """LoRAPrune's frozen buffers (a pytree; never differentiated): ``scores`` (the moving average,
    float32 ``{"kv_heads": [L, K], "mlp": [L, I]}``) and ``masks`` (bool, same shapes, True: kept)."""

    scores: dict
    masks: dict


def init_state(cfg: Any) -> PruneState:
    """Zero scores (the official's ``init_sensitivity_dict``) and nothing masked."""
    shapes = {kind: (cfg.num_hidden_layers, _unit_count(cfg, kind)) for kind in UNITS}
    return PruneState(
        scores={k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()},
        masks={k: jnp.ones(s, bool) for k, s in shapes.items()},
    )


def make_step(
    loss_fn: Callable[[Any, Any, Any], Any],
    tx: optax.GradientTransformation,
    cfg: Any,
    spec: Any,
    *,
    total_steps: int,
    ratio: float = 0.5,
    init_ratio: float = 0.0,
    warmup: float = 0.1,
    cooldown: float = 0.1,
    prune_freq: int = 10,
    exclude_layers: Sequence[int] | None = None,
    strict: bool = True,
    metric: str = "lora",
    decay: float = 0.9,
    jit: bool = True,
) -> Callable:
    """``step(params, state, prune, batch) -> (state, prune, metrics)``: one LoRAPrune training step.

    Args:
      loss_fn: as for `lorajax.train.make_lora_step`: ``loss_fn(params, adapters, batch) -> loss`` or
        ``-> (loss, aux)``; it gets the masked params and adapters (`apply_masks`, `mask_adapters`).
      tx: the optax transformation of ``state`` (a `lorajax.train.TrainState` of plain LoRA adapters:
        ``state.combined`` is the adapters tree, both factors trainable).
      cfg, spec: the model's `llama.Config` and the adapters' `lorajax.Spec` (variant ``"lora"``).
      total_steps, ratio, init_ratio, warmup, cooldown: the schedule (`schedule_sparsity_ratio`).
      prune_freq: masks are updated at steps (``state.step`` before this step) divisible by it.
      exclude_layers: see `masks`. strict: the official window ``init_ratio < scheduled < ratio``
        (module doc); False: ``init_ratio < scheduled``. metric: see `importance`. decay: see `ema`.
      jit: compile the step; ``state`` and ``prune`` are donated.

    ``prune`` is a `PruneState` (`init_state`). Steps past ``total_steps`` use the schedule's final
    value. Metrics (device arrays): ``loss``, ``finite`` (loss and gradients), ``ratio`` (the
    scheduled sparsity, float32), ``updated`` (bool: the masks were re-derived this step).

    Raises:
      ValueError: bad schedule values, ``prune_freq``, ``metric``, variant or ``exclude_layers``.
    """
    _check_variant(spec)
    _check_metric(metric)
    _check_schedule(total_steps, warmup, cooldown, init_ratio, ratio)
    if isinstance(prune_freq, bool) or not isinstance(prune_freq, (int, np.integer)) or prune_freq < 1:
        raise ValueError(f"prune_freq must be a positive int (steps between mask updates), got {prune_freq!r}")
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be a number in [0, 1] (the moving average's weight of the past), got {decay!r}")
    exclude = _check_exclude(exclude_layers, cfg.num_hidden_layers)
    # host tables over steps 0..total (float64, as the official computes them on the host)
    sched = [
        schedule_sparsity_ratio(s, total_steps, warmup, cooldown, init_ratio, ratio) for s in range(total_steps + 1)
    ]
    window = [init_ratio < r and (r < ratio or not strict) for r in sched]
    ratio_T = jnp.asarray(sched, jnp.float32)
    window_T = jnp.asarray(window, bool)
    counts_T = {kind: jnp.asarray([_pruned_counts(cfg, r)[kind] for r in sched], jnp.int32) for kind in UNITS}

    def step(params: Any, state: TrainState, prune: PruneState, batch: Any) -> tuple[TrainState, PruneState, dict]:
        masked_params = apply_masks(params, prune.masks)

        def loss_of(trainable):
            out = loss_fn(masked_params, mask_adapters(combine(trainable, state.frozen), prune.masks), batch)
            return out if isinstance(out, tuple) else (out, None)

        (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
        adapters = combine(state.trainable, state.frozen)
        imp = importance(params, adapters, grads if metric == "lora" else None, spec, metric=metric)
        scores = ema(prune.scores, group_scores(imp, cfg), decay)
        t = jnp.minimum(state.step, total_steps)
        due = (state.step % prune_freq == 0) & window_T[t]
        counts = {kind: counts_T[kind][t] for kind in UNITS}
        fresh = _masks_of_counts(scores, counts, exclude, prune.masks)
        new_masks = {kind: jnp.where(due, fresh[kind], prune.masks[kind]) for kind in UNITS}
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        finite = jnp.isfinite(loss)
        for g in jax.tree.leaves(grads):
            finite = finite & jnp.all(jnp.isfinite(g))
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)  # type: ignore[attr-defined]
        metrics = {"loss": loss, "finite": finite, "ratio": ratio_T[t], "updated": due}
        return new, PruneState(scores=scores, masks=new_masks), metrics

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(1, 2))
