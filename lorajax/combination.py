"""Combining LoRA adapters into one (PEFT's ``add_weighted_adapter``) and task arithmetic on merged deltas.

`combine(specs, adapters_list, weights, params, method)` returns ONE plain
LoRA adapter ``(spec, adapters)`` from ``n`` plain LoRA adapters of the same
targets. Per target, adapter ``i`` has ``A_i: [in, r_i]``, ``B_i: [r_i, out]``
and scale ``s_i`` (its own ``α/r``, or ``α/√r`` with rsLoRA, patterns
included), so ``ΔW_i = s_i A_i B_i: [in, out]``; ``w_i`` is its weight
(negative weights subtract). The result has scale 1 everywhere: rank ``r'``
and ``α' = r'`` per target, no rsLoRA.

Methods (``r'`` in brackets):

* ``"cat"`` (``Σ r_i``): ``A' = [w_1 s_1 A_1, …, w_n s_n A_n]`` (along the
  rank), ``B' = [B_1; …; B_n]``, so ``A' B' = Σ w_i ΔW_i`` exactly.
* factor-wise, on ``A`` and ``B`` separately (all ``r_i`` equal, ``r' = r``):
  with ``c_i = w_i s_i``, ``A' = M({A_i}, sign(c_i)·√|c_i|)`` and
  ``B' = M({B_i}, √|c_i|)`` where ``M`` is one of the tensor merges below:
  ``"linear"`` (task arithmetic ``Σ v_i X_i``; ``A' B'`` then also holds the
  cross terms ``A_i B_j``: an approximation), ``"ties"``, ``"dare_linear"``,
  ``"dare_ties"``, ``"magnitude_prune"``.
* on the deltas, then truncated SVD (``r' = rank``, default ``max r_i``):
  ``D = M({ΔW_i}, w_i)``; ``D = U S Vᵀ``, ``A' = U[:, :r']``,
  ``B' = S[:r'] Vᵀ[:r']``: ``"svd"`` (``M`` = task arithmetic), ``"ties_svd"``,
  ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``.
  ``svd_clamp = q``: ``h`` = the ``q``-quantile (linear interpolation) of all
  entries of ``A'`` and ``B'`` together; both are clipped to ``[-h, h]``.

Tensor merges ``M({X_i}, v)`` over ``n`` same-shape tensors, ``density`` ``d``:

* trim (``magnitude_prune``): keep the ``int(d·numel)`` entries of largest
  ``|X_i|`` of each tensor, zero the rest; then ``Σ v_i X̂_i``.
* TIES (``ties``): trim; elect a sign per entry, ``σ = +1`` where
  ``Σ_i X̂_i ≥ 0`` (``"total"``) or ``Σ_i sign(X̂_i) ≥ 0`` (``"frequency"``),
  else ``-1`` (on the unweighted tensors); disjoint mean
  ``Σ_i [sign X̂_i = σ] v_i X̂_i / max(1, Σ_i [sign X̂_i = σ])``.
* DARE (``dare_linear``, ``dare_ties``): drop and rescale,
  ``X̂_i = m_i ⊙ X_i / d`` with ``m_i ~ Bernoulli(d)`` per entry; then
  ``Σ v_i X̂_i`` or TIES' elect and disjoint mean.

``d = 1`` keeps every entry (DARE then draws nothing). The DARE masks come from
``key`` (per target ``fold_in(key, crc32(path))`` as `lorajax.init`, then the
factor and the adapter index) or are given as ``masks``: one tree per adapter,
mirroring the adapters, with ``{"lora_A": [in, r], "lora_B": [r, out]}``
(factor-wise methods) or ``{"delta": [in, out]}`` (``_svd`` methods) of 0/1.

As PEFT: with one adapter the method is ``"linear"``; ranks are per target
(``rank_pattern``). Differences from PEFT: targets must be the same in every
adapter (PEFT skips an adapter at the modules it lacks); the result never uses
rsLoRA (PEFT keeps the first adapter's ``use_rslora`` with ``α' = r'``, which
scales the combined update by ``√r'``); ``svd_full_matrices`` and
``svd_driver`` are not taken (they change how the SVD is computed, not its
rank-``r'`` truncation); ``cat`` gives each target its own ``Σ r_i`` instead of
zero-padding to the largest sum.

Task arithmetic (Ilharco et al.) on merged deltas, for any mergeable variant:
`delta` gives ``ΔW = W' - W`` per target (shaped like the weight, in a tree
mirroring the targeted paths), `add`, `scale` and `negate` combine delta
trees, and `apply_delta` returns ``params`` with ``W + ΔW``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from lorajax import combination
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}
  >>> specs = [lorajax.Spec("lora", rank=r, alpha=4, targets=["dense"], init_weights=False) for r in (2, 3)]
  >>> trees = [lorajax.init(s, params, jax.random.key(i)) for i, s in enumerate(specs)]
  >>> spec, merged = combination.combine(specs, trees, [0.5, -1.0], params, "cat")
  >>> spec.rank, spec.alpha, merged["dense"]["kernel"]["lora_A"].shape
  (5, 5.0, (8, 5))
  >>> want = combination.add([combination.delta(s, params, a) for s, a in zip(specs, trees)], [0.5, -1.0])
  >>> got = combination.delta(spec, params, merged)
  >>> bool(jnp.allclose(got["dense"]["kernel"], want["dense"]["kernel"], atol=1e-5))
  True

References:
  Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
  NeurIPS 2023, arXiv:2306.01708 (trim, elect sign, disjoint merge).
  Yu et al., "Language Models are Super Mario: Absorbing Abilities from
  Homologous Models as a Free Lunch" (DARE), ICML 2024, arXiv:2311.03099.
  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
  arXiv:2212.04089.
  PEFT: ``src/peft/tuners/lora/model.py`` (``LoraModel.add_weighted_adapter``,
  ``_check_add_weighted_adapter``, ``_svd_generalized_task_arithmetic_weighted_adapter``,
  ``_generalized_task_arithmetic_weighted_adapter``) and
  ``src/peft/utils/merge_utils.py`` (the tensor merges).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import adapters as adapters_lib
from lorajax import paths, registry
from lorajax import plan as plan_lib
from lorajax import targets as targets_lib
from lorajax.spec import Spec
from lorajax.variants.base import Target

__all__ = [
    "METHODS",
    "TENSOR_MERGES",
    "SIGN_METHODS",
    "combine",
    "merge_tensors",
    "trim",
    "elect_sign",
    "disjoint_mean",
    "delta",
    "add",
    "scale",
    "negate",
    "apply_delta",
]

#: tensor merges ``M`` (applied to the factors, or to the deltas with ``_svd``)
TENSOR_MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD_OF = {"svd": "linear", **{f"{m}_svd": m for m in TENSOR_MERGES if m != "linear"}}
#: every ``method`` of `combine`
METHODS = ("cat", *TENSOR_MERGES, *_SVD_OF)
#: how TIES elects the sign of an entry
SIGN_METHODS = ("total", "frequency")
_DENSITY_METHODS = frozenset(m for m in METHODS if m.split("_svd")[0] in TENSOR_MERGES[1:])
_FACTOR_IDS = {"lora_A": 1, "lora_B": 2, "delta": 3}


# ----------------------------------------------------------------------------- tensor merges


@functools.partial(jax.jit, static_argnums=1)
def trim(x: jax.Array, density: float) -> jax.Array:
    """``x`` with all but its ``int(density·x.size)`` largest-magnitude entries set to 0 (any shape)."""
    k = int(density * x.size)
    if density >= 1 or k >= x.size:
        return x
    flat = x.reshape(-1)
    keep = jnp.zeros(flat.shape, x.dtype)
    if k > 0:
        keep = keep.at[jax.lax.top_k(jnp.abs(flat), k)[1]].set(1)
    return (flat * keep).reshape(x.shape)


def elect_sign(stacked: jax.Array, method: str = "total") -> jax.Array:
    """Bool ``[n, ...]``: where ``sign(X_i)`` equals the elected sign (``+1`` where the vote is ``≥ 0``).

    ``stacked: [n, ...]``; the vote is ``Σ_i X_i`` (``"total"``) or ``Σ_i sign(X_i)`` (``"frequency"``).
    A zero entry never agrees.
    """
    _check_sign_method(method)
    sign = jnp.sign(stacked)
    vote = (stacked if method == "total" else sign).sum(axis=0)
    return sign == jnp.where(vote >= 0, 1, -1).astype(sign.dtype)[None]


def disjoint_mean(weighted: jax.Array, agree: jax.Array) -> jax.Array:
    """``Σ_i agree_i · Y_i / max(1, Σ_i agree_i)`` over axis 0: ``[n, ...] -> [...]``."""
    count = agree.sum(axis=0).astype(weighted.dtype)
    return (weighted * agree).sum(axis=0) / jnp.maximum(count, 1)


def merge_tensors(
    tensors: Sequence[jax.Array],
    weights: Any,
    method: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    masks: Sequence[jax.Array] | None = None,
) -> jax.Array:
    """One tensor merge ``M({X_i}, v)`` of the module docstring: ``n × [...] -> [...]``.

    Args:
      tensors: ``n`` arrays of one shape.
      weights: ``n`` numbers ``v_i``.
      method: one of `TENSOR_MERGES`.
      density: kept fraction ``d`` in (0, 1] (not for ``"linear"``).
      majority_sign_method: ``"total"`` or ``"frequency"`` (TIES methods).
      masks: DARE's ``n`` Bernoulli(d) 0/1 masks, shaped like ``tensors``.
    """
    if method not in TENSOR_MERGES:
        raise ValueError(f"unknown tensor merge {method!r}; choose one of {TENSOR_MERGES}")
    _check_sign_method(majority_sign_method)
    stacked = jnp.stack([jnp.asarray(x) for x in tensors])
    v = jnp.asarray(weights, stacked.dtype)
    if len(tensors) != v.size:
        raise ValueError(f"weights has {v.size} entries for {len(tensors)} tensors")
    stacked_masks = None  # DARE's masks, only where entries are dropped
    if method == "linear":
        density = None
    elif density is None or not 0 < density <= 1:
        raise ValueError(f"method {method!r} needs density in (0, 1] (the kept fraction), got {density!r}")
    elif method.startswith("dare") and density < 1:
        if masks is None:
            raise ValueError(f"method {method!r} needs the Bernoulli masks (combine draws them from key)")
        stacked_masks = jnp.stack([jnp.asarray(m, stacked.dtype) for m in masks])
    return _merge(stacked, v, stacked_masks, method, None if density is None else float(density), majority_sign_method)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _merge(stacked: jax.Array, v: jax.Array, masks: Any, method: str, density: Any, sign_method: str) -> jax.Array:
    """`merge_tensors` on ``stacked: [n, ...]``, ``v: [n]``, ``masks: [n, ...]`` or None; one compile per shape."""
    v = v.reshape((-1,) + (1,) * (stacked.ndim - 1))
    if method == "linear":
        return (stacked * v).sum(axis=0)
    if method.startswith("dare"):
        if masks is not None:
            stacked = stacked * masks / density
    else:
        stacked = jnp.stack([trim(x, density) for x in stacked])
    if method in ("dare_linear", "magnitude_prune"):
        return (stacked * v).sum(axis=0)
    return disjoint_mean(stacked * v, elect_sign(stacked, sign_method))


# ----------------------------------------------------------------------------- combine


def _check_sign_method(method: str) -> None:
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")


def _lookup(index: dict, keys: tuple, what: str) -> dict:
    """``index[keys]``, with or without the leading ``"params"``."""
    other = keys[1:] if keys[:1] == ("params",) else ("params",) + keys
    for k in (keys, other):
        if k in index:
            return index[k]
    raise ValueError(f"{what} has no entry for the targeted weight {'/'.join(keys)}")


def _check_args(n: int, weights: Any, method: str, density: Any, majority_sign_method: str, rank: Any, clamp: Any):
    if method not in METHODS:
        raise ValueError(f"unknown combination method {method!r}; choose one of {METHODS}")
    if n == 0:
        raise ValueError("combine needs at least one adapter")
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries for {n} adapters; give one weight per adapter")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights[{i}] must be a finite number, got {w!r}")
    if method in _DENSITY_METHODS:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"method {method!r} needs density in (0, 1] (the kept fraction), got {density!r}")
    elif density is not None and n > 1:
        raise ValueError(f"density is not used by method {method!r}; it is for {sorted(_DENSITY_METHODS)}")
    _check_sign_method(majority_sign_method)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if (rank is not None or clamp is not None) and method not in _SVD_OF and n > 1:
        raise ValueError(f"rank and svd_clamp are for the svd methods {tuple(_SVD_OF)}, not {method!r}")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0 <= clamp <= 1):
        raise ValueError(f"svd_clamp must be a quantile in [0, 1], got {clamp!r}")


def _resolve_all(specs: list[Spec], adapters_list: Sequence[Any], params: Any) -> list[plan_lib.Plan]:
    """Each adapter's `Plan`; checks plain LoRA and equal targets."""
    plans = []
    for i, (spec, tree) in enumerate(zip(specs, adapters_list)):
        if not isinstance(spec, Spec):
            raise TypeError(f"specs[{i}] must be a lorajax.Spec, got {type(spec).__name__}")
        variant = registry.plain_lora(spec.variant, f"combination.combine (adapter {i})")
        plans.append(plan_lib.make_plan(spec, params, tree, variant))
    resolved = [p.targets for p in plans]
    names0 = [t.name for t in resolved[0]]
    for i, ts in enumerate(resolved[1:], 1):
        names = [t.name for t in ts]
        if set(names) != set(names0):
            only0 = sorted(set(names0) - set(names))
            only_i = sorted(set(names) - set(names0))
            raise ValueError(
                f"adapters 0 and {i} adapt different targets (only in adapter 0: {only0}; only in adapter {i}: "
                f"{only_i}); combine adapters of the same targets"
            )
    return plans


def _dare_mask(key: jax.Array, t: Target, entry: str, i: int, shape: tuple, density: float) -> jax.Array:
    """Adapter ``i``'s Bernoulli(density) mask for ``entry`` of target ``t``."""
    return _bernoulli(adapters_lib.target_key(key, t), _FACTOR_IDS[entry], i, tuple(shape), density)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _bernoulli(key: jax.Array, entry_id: int, i: int, shape: tuple, density: float) -> jax.Array:
    return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, entry_id), i), density, shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _svd_factors(d: jax.Array, rank: int, clamp: float | None) -> tuple[jax.Array, jax.Array]:
    """``D: [in, out] = U S Vᵀ`` -> ``(U[:, :rank], S[:rank] Vᵀ[:rank])``, clipped at the ``clamp``-quantile."""
    u, sv, vt = jnp.linalg.svd(d, full_matrices=False)
    a, b = u[:, :rank], sv[:rank, None] * vt[:rank]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([b.reshape(-1), a.reshape(-1)]), clamp)
        a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
    return a, b


def combine(
    specs: Spec | Sequence[Spec],
    adapters_list: Sequence[Any],
    weights: Sequence[float],
    params: Any,
    method: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    rank: int | None = None,
    svd_clamp: float | None = None,
    key: jax.Array | None = None,
    masks: Sequence[Any] | None = None,
) -> tuple[Spec, dict]:
    """One plain LoRA adapter combining ``adapters_list`` with ``weights`` (PEFT's ``add_weighted_adapter``).

    Args:
      specs: the adapters' Specs (one per adapter, or one for all); plain LoRA.
      adapters_list: ``n`` adapters trees for ``params``, all of the same targets.
      weights: ``n`` numbers ``w_i`` (negative subtracts).
      params: the base they adapt (for the targets; its weights are not read).
      method: one of `METHODS` (see the module docstring).
      density: kept fraction in (0, 1] for the ties / dare / magnitude_prune methods.
      majority_sign_method: ``"total"`` or ``"frequency"`` (TIES' sign election).
      rank: the result's rank for the ``svd`` methods (default: the largest input rank).
      svd_clamp: quantile in [0, 1] to clip the SVD factors at (``svd`` methods).
      key: PRNG key for DARE's masks (dare methods with ``density < 1``).
      masks: instead of ``key``: DARE's 0/1 masks, one tree per adapter (see the module docstring).

    Returns:
      ``(spec, adapters)``: the first Spec's selection and options with rank ``r'``,
      ``α' = r'`` (``rank_pattern`` / ``alpha_pattern`` where targets differ) and no rsLoRA;
      ``A': [in, r']``, ``B': [r', out]`` per target.

    Raises:
      ValueError: a non-plain-LoRA variant, different targets, unequal ranks for the
      factor-wise methods, an unknown method, density outside (0, 1], ``len(weights) != n``,
      a dare method without ``key`` or ``masks``, a rank above ``min(in, out)``.
    """
    n = len(adapters_list)
    spec_list = [specs] * n if isinstance(specs, Spec) else list(specs)
    if len(spec_list) != n:
        raise ValueError(f"{len(spec_list)} specs for {n} adapters; give one Spec per adapter (or one for all)")
    weights = list(weights)
    _check_args(n, weights, method, density, majority_sign_method, rank, svd_clamp)
    if n == 1:  # as PEFT: one adapter is always combined linearly
        method, density, rank, svd_clamp = "linear", None, None, None
    dare = method.startswith("dare") and density is not None and density < 1
    if dare and key is None and masks is None:
        raise ValueError(f"method {method!r} draws random masks: pass key=jax.random.key(...) (or masks=)")
    if key is not None and not isinstance(key, jax.Array):
        raise TypeError(f"key must be a jax PRNG key (jax.random.key(seed)), got {type(key).__name__}")
    plans = _resolve_all(spec_list, adapters_list, params)
    resolved = [p.targets for p in plans]
    mask_index = None if masks is None else [plan_lib.adapter_paths(m) for m in masks]
    if mask_index is not None and len(mask_index) != n:
        raise ValueError(f"masks has {len(mask_index)} trees for {n} adapters")
    by_name = [{t.name: t for t in ts} for ts in resolved]
    svd_rank = rank or max(t.rank for ts in resolved for t in ts)

    factors = [_factors(p, i) for i, p in enumerate(plans)]
    flat, new_ranks = {}, {}
    for t0 in resolved[0]:
        ts = [m[t0.name] for m in by_name]
        ads = [p.adapters[t.keys] for p, t in zip(plans, ts)]
        a_list = [jnp.asarray(ad[f[0]]) for ad, f in zip(ads, factors)]
        b_list = [jnp.asarray(ad[f[1]]) for ad, f in zip(ads, factors)]
        s_list = [float(f[2](t)) for f, t in zip(factors, ts)]

        def masks_for(entry: str, shapes: list, t0: Target = t0, ts: list = ts) -> list | None:
            if not dare:
                return None
            if mask_index is None:
                assert key is not None and density is not None
                return [_dare_mask(key, t0, entry, i, shape, density) for i, shape in enumerate(shapes)]
            got = [_lookup(mi, t.keys, f"masks[{i}]") for i, (mi, t) in enumerate(zip(mask_index, ts))]
            for i, (g, shape) in enumerate(zip(got, shapes)):
                if entry not in g or tuple(g[entry].shape) != tuple(shape):
                    have = {k: tuple(v.shape) for k, v in g.items()}
                    raise ValueError(
                        f"masks[{i}] at {'/'.join(t0.keys)} needs {entry!r} of shape {tuple(shape)}, has {have}"
                    )
            return [g[entry] for g in got]

        if method in TENSOR_MERGES and len({x.shape[1] for x in a_list}) != 1:
            raise ValueError(
                f"method {method!r} needs equal ranks, but {t0.name!r} has ranks {[x.shape[1] for x in a_list]}; "
                "use 'cat' or an svd method (e.g. 'svd', 'ties_svd')"
            )
        if method in _SVD_OF and svd_rank > min(t0.matrix_shape):
            raise ValueError(
                f"rank {svd_rank} is larger than min(in, out) = {min(t0.matrix_shape)} for {t0.name!r}; "
                "pass a smaller rank="
            )
        a, b = _combine_one(
            method, a_list, b_list, s_list, weights, masks_for, density, majority_sign_method, svd_rank, svd_clamp
        )
        if a.shape[1] > min(t0.matrix_shape):
            raise ValueError(
                f"the combined rank {a.shape[1]} of {t0.name!r} is larger than min(in, out) = "
                f"{min(t0.matrix_shape)}, which plain LoRA does not allow; use an svd method with rank="
            )
        dtype = a_list[0].dtype
        flat[t0.keys] = {factors[0][0]: a.astype(dtype), factors[0][1]: b.astype(dtype)}
        new_ranks[t0.name] = int(a.shape[1])
    return _result_spec(spec_list[0], new_ranks), plan_lib.nest(flat)


def _factors(plan: plan_lib.Plan, i: int) -> tuple[str, str, Callable[[Target], float]]:
    """``(A's entry name, B's entry name, scale)`` of adapter ``i``'s variant."""
    f = plan.variant.factors
    if f is None or f.scale is None:
        raise ValueError(f"adapter {i}: variant {plan.variant.name!r} declares no Factors.scale")
    return f.a, f.b, f.scale


def _combine_one(
    method: str,
    a_list: list,
    b_list: list,
    s_list: list[float],
    weights: list[float],
    masks_for: Callable[[str, list], list | None],
    density: float | None,
    sign_method: str,
    svd_rank: int,
    svd_clamp: float | None,
) -> tuple[jax.Array, jax.Array]:
    """One target's ``(A': [in, r'], B': [r', out])`` from ``A_i: [in, r_i]``, ``B_i: [r_i, out]``, scales ``s_i``."""
    if method == "cat":
        a = jnp.concatenate([w * s * x for w, s, x in zip(weights, s_list, a_list)], axis=1)
        return a, jnp.concatenate(b_list, axis=0)
    if method in TENSOR_MERGES:
        c = [w * s for w, s in zip(weights, s_list)]
        v_a = [math.sqrt(abs(x)) * (1.0 if x >= 0 else -1.0) for x in c]  # the sign on A only
        v_b = [math.sqrt(abs(x)) for x in c]
        masks_a, masks_b = (
            masks_for("lora_A", [x.shape for x in a_list]),
            masks_for("lora_B", [x.shape for x in b_list]),
        )
        a = merge_tensors(a_list, v_a, method, density=density, majority_sign_method=sign_method, masks=masks_a)
        b = merge_tensors(b_list, v_b, method, density=density, majority_sign_method=sign_method, masks=masks_b)
        return a, b
    deltas = [s * (x @ y) for s, x, y in zip(s_list, a_list, b_list)]
    masks = masks_for("delta", [x.shape for x in deltas])
    d = merge_tensors(deltas, weights, _SVD_OF[method], density=density, majority_sign_method=sign_method, masks=masks)
    return _svd_factors(d, svd_rank, None if svd_clamp is None else float(svd_clamp))


def _result_spec(spec: Spec, ranks: dict[str, int]) -> Spec:
    """``spec`` with rank ``r'`` and ``α' = r'`` per target, no rsLoRA."""
    top = max(ranks.values())
    # most specific names first: a key also matches names that end with ".<key>"
    pattern = {re.escape(n): r for n, r in sorted(ranks.items(), key=lambda kv: (-len(kv[0]), kv[0])) if r != top}
    changes: dict[str, Any] = dict(
        rank=top, alpha=float(top), rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in pattern.items()}
    )
    if "use_rslora" in dict(spec.options):
        changes["use_rslora"] = False
    return spec.replace(**changes)


# ----------------------------------------------------------------------------- task arithmetic on deltas


def delta(spec: Spec, params: Any, adapters: Any) -> dict:
    """``ΔW = W' - W`` per targeted weight (``W'`` from `lorajax.merge`), shaped like the weight.

    Returns a tree mirroring the targeted paths of ``params`` (like the adapters'),
    with the ``ΔW`` array where the adapter dict would be.
    """
    plan = plan_lib.make_plan(spec, params, adapters)
    merged = dict(targets_lib.weight_leaves(adapters_lib.merge(spec, params, adapters, variant=plan.variant)))
    base = dict(targets_lib.weight_leaves(params))
    return plan_lib.nest({t.keys: merged[t.keys] - base[t.keys] for t in plan.targets})


def _delta_leaves(tree: Any, what: str) -> dict[tuple, jax.Array]:
    if not isinstance(tree, dict):
        raise TypeError(f"{what} must be a delta tree (dict) from combination.delta, got {type(tree).__name__}")
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {paths.key_names(p): jnp.asarray(x) for p, x in leaves}


def add(deltas: Sequence[Any], weights: Sequence[float] | None = None) -> dict:
    """``Σ_i w_i ΔW_i`` over delta trees (default ``w_i = 1``); a path missing from a tree counts as 0."""
    deltas = list(deltas)
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise ValueError(f"weights has {len(weights)} entries for {len(deltas)} delta trees")
    out: dict[tuple, jax.Array] = {}
    for i, (tree, w) in enumerate(zip(deltas, weights)):
        for keys, x in _delta_leaves(tree, f"deltas[{i}]").items():
            if keys in out and out[keys].shape != x.shape:
                raise ValueError(f"deltas[{i}] at {'/'.join(keys)} has shape {x.shape}, earlier ones {out[keys].shape}")
            out[keys] = out[keys] + w * x if keys in out else w * x
    return plan_lib.nest(out)


def scale(d: Any, c: float) -> dict:
    """``c · ΔW`` for every leaf of a delta tree."""
    return plan_lib.nest({k: c * x for k, x in _delta_leaves(d, "d").items()})


def negate(d: Any) -> dict:
    """``-ΔW`` (task negation: forgetting what the adapter taught)."""
    return scale(d, -1.0)


def apply_delta(params: Any, d: Any, weight: float = 1.0) -> Any:
    """``params`` with ``W + weight · ΔW`` at every path of the delta tree ``d`` (new tree, same type)."""
    wanted = _delta_leaves(d, "d")
    wrapped = paths.is_variables(params)
    if wanted and wrapped and not all(k[0] == "params" for k in wanted):
        wanted = {("params",) + k: v for k, v in wanted.items()}
    elif wanted and not wrapped and all(k[0] == "params" for k in wanted):
        wanted = {k[1:]: v for k, v in wanted.items()}
    seen = set()

    def one(path: tuple, w: Any) -> Any:
        keys = targets_lib.key_names(path)
        if keys not in wanted:
            return w
        x = wanted[keys]
        if x.shape != w.shape:
            raise ValueError(f"delta at {'/'.join(keys)} has shape {x.shape}, the weight {tuple(w.shape)}")
        seen.add(keys)
        return (w + weight * x).astype(w.dtype)

    out = jax.tree_util.tree_map_with_path(one, params)
    missing = [k for k in wanted if k not in seen]
    if missing:
        raise ValueError(f"delta has {'/'.join(missing[0])}, which is not a weight of params")
    return out
