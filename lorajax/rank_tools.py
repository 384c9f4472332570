"""Rank tools: cut a trained adapter down to a lower rank.

Two tools, both ``(spec, adapters, rank) -> (spec', adapters')``:

* `truncate` keeps an adapter's own leading components (DyLoRA's nested ranks).
* `squeeze` (LoRA-Squeeze) replaces every ``s·A B`` by its best rank-``b``
  approximation, computed from the factors without forming ``[in, out]``.

`truncate(spec, adapters, rank)` keeps the first ``b = rank`` components of a
LoRA-style adapter (``lora_A[:, :b]``, ``lora_B[:b]``) and returns the spec
that gives the rank-``b`` model with them:

* ``dylora``: the rank-``b`` model is DyLoRA evaluated at ``b``,
  ``W + (α/b) A[:, :b] B[:b]``; the new spec has ``rank=b`` and the same
  ``α`` (its scale ``α/b`` is DyLoRA's), ``eval_rank=None``.
* ``lora`` (and rsLoRA): the rank-``b`` model is the sum of the first ``b``
  rank-one terms of the trained update with its scale unchanged,
  ``W + s A[:, :b] B[:b]`` with ``s = α/r`` (``α/√r``); the new spec has
  ``rank=b`` and ``α' = α·b/r`` (``α·√(b/r)``), so that ``α'/b = α/r``. Where
  targets end up with different ``α'`` (rank or alpha patterns), ``α'`` is
  written per target into ``alpha_pattern``.

The slices are the adapter's own leading components, as DyLoRA orders them;
for a plain LoRA they are not the best rank-``b`` approximation (use an SVD
for that).

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from lorajax.rank_tools import truncate
  >>> params = {"q": {"kernel": jnp.ones((6, 4))}}
  >>> spec = lorajax.Spec("lora", rank=4, alpha=8, targets=["q"])
  >>> spec2, small = truncate(spec, lorajax.init(spec, params, jax.random.key(0)), 2)
  >>> spec2.rank, spec2.alpha, small["q"]["kernel"]["lora_A"].shape
  (2, 4.0, (6, 2))

LoRA-Squeeze (Flax orientation, ``A: [in, r]``, ``B: [r, out]``, ``ΔW = s·A B``)::

    A = Q_A R_A,  Bᵀ = Q_B R_B            (thin QR: [in, r]·[r, r], [out, r]·[r, r])
    R_A R_Bᵀ = U Σ Vᵀ                      (SVD of the r × r core)
    ΔW = s · (Q_A U) Σ (Q_B V)ᵀ            (exact: a thin SVD of ΔW)
    A' = Q_A U_b · √(s Σ_b / s'),  B' = √(s Σ_b / s') · (Q_B V_b)ᵀ
    s' A' B' = trunc_b(ΔW)                 (best rank-b approximation, Eckart–Young)

``s' = α'/b`` (``α'/√b`` with rsLoRA) is the new spec's scale: by default the
new spec keeps ``α`` (and ``alpha_pattern``), i.e. it is the spec one would
write to train at rank ``b`` directly; ``alpha=`` sets another ``α'``. Either
way the merged weights are ``W + trunc_b(s·A B)``. ``method="rsvd"`` gets
``U_b, Σ_b, V_b`` by a randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4
with power iterations) that touches ``ΔW`` only through ``ΔW·X = A(B X)`` and
``ΔWᵀ·Y = Bᵀ(Aᵀ Y)``; its sketch is at most ``r`` wide because
``rank(ΔW) <= r``, so with ``oversample >= r - b`` it is exact up to round-off.

Decisions where the paper (Vulić et al., arXiv:2602.10993; no official code
found; only its abstract and introduction were readable, see
``docs/unverified.md``) is UNVERIFIED here:

* Σ split: balanced, ``√Σ_b`` into each factor (``A'ᵀA' = B'B'ᵀ``), so that
  neither factor dominates the gradients of continued training.
* ``α'``: kept (``s' = α/b``), see above.
* DoRA: the directional update ``s·A B`` is squeezed the same way and the
  magnitude ``m`` is kept, so the merged weight is
  ``(W + trunc_b(s·A B))·m/‖W + trunc_b(s·A B)‖`` (column norms still ``m``).
* In-training squeezes (`squeeze_schedule`, `squeeze_opt_state`): ranks
  decrease geometrically at evenly spaced steps, and Adam's moments are
  reset by default (``mode="project"`` maps them to the new factors).

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"q": {"kernel": jnp.ones((6, 5))}}
  >>> spec = lorajax.Spec("lora", rank=4, alpha=8, targets=["q"], init_weights=False)
  >>> spec2, small = lorajax.squeeze(spec, lorajax.init(spec, params, 0), 2)
  >>> spec2.rank, spec2.alpha, small["q"]["kernel"]["lora_B"].shape
  (2, 8.0, (2, 5))
  >>> squeeze_schedule(64, 8, steps=1000, n_stages=3)
  ((250, 32), (500, 16), (750, 8))

References:
  Vulić et al., "LoRA-Squeeze", arXiv:2602.10993 (abstract; no official code).
  Halko, Martinsson & Tropp, "Finding Structure with Randomness", SIAM Review
  53(2), 2011 (randomized SVD with power iterations).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import registry, targets
from lorajax.plan import adapter_paths
from lorajax.spec import Spec
from lorajax.variants.base import SHARED_KEY, Factors, Target

__all__ = [
    "truncate",
    "squeeze",
    "squeeze_factors",
    "squeeze_schedule",
    "squeeze_opt_state",
]


SQUEEZE_METHODS = ("qr", "rsvd")


def _factors(
    fn: str, path: str, adapter: dict, entries: tuple, exact: bool = True, ab: tuple[str, str] = ("lora_A", "lora_B")
) -> tuple[jax.Array, jax.Array, int]:
    """``(A [in, r], B [r, out], r)`` of one adapter holding ``entries`` (exactly, or at least); else a clear error."""
    if (set(adapter) != set(entries)) if exact else not set(entries) <= set(adapter):
        raise ValueError(f"{fn}: adapter at {path} has entries {sorted(adapter)}, expected {list(entries)}")
    a, b = adapter[ab[0]], adapter[ab[1]]
    r = a.shape[-1]
    if a.ndim != 2 or b.ndim != 2 or b.shape[0] != r:
        raise ValueError(
            f"{fn}: adapter at {path} has lora_A {a.shape} and lora_B {b.shape}; expected [in, r] and [r, out]"
        )
    return a, b, r


def _nest_like(adapters: dict, new: dict[tuple, dict]) -> dict:
    """``adapters`` with the adapter dict at each path in ``new`` replaced."""

    def walk(node: Any, prefix: tuple) -> Any:
        if prefix in new:
            return new[prefix]
        if prefix == ():
            return {k: (v if k == SHARED_KEY else walk(v, (str(k),))) for k, v in node.items()}
        return {k: walk(v, prefix + (str(k),)) for k, v in node.items()}

    return walk(adapters, ())


def truncate(spec: Spec, adapters: dict, rank: int) -> tuple[Spec, dict]:
    """``(spec', adapters')``: every adapter cut to its first ``rank`` components.

    Args:
      spec: the `Spec` the adapters were made with (variant ``lora`` or ``dylora``).
      adapters: the adapters tree (`lorajax.init` layout).
      rank: the new rank ``b``, ``1 <= b <=`` every target's rank.

    Returns:
      The new spec (``rank=b``, no ``rank_pattern``, alpha set as described in
      the module docstring) and a new adapters tree; nothing is mutated.

    Raises:
      ValueError: another variant, a bad ``rank``, or ``rank`` larger than the
        rank of the adapter at some path (named).
    """
    variant = registry.get(spec.variant)
    if variant.truncate is None:
        raise ValueError(
            f"truncate supports the variants with nested ranks {registry.with_capability('truncate')}, "
            f"got {spec.variant!r}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    index = adapter_paths(adapters)
    if not index:
        raise ValueError("truncate: the adapters tree holds no adapter")
    new: dict[tuple, dict] = {}
    ranks: dict[str, int] = {}
    for keys, adapter in index.items():
        path = "/".join(keys)
        a, b, r = _factors("truncate", path, adapter, ("lora_A", "lora_B"))
        if rank > r:
            raise ValueError(f"truncate: rank {rank} is larger than the rank {r} of the adapter at {path}")
        new[keys] = {"lora_A": a[:, :rank], "lora_B": b[:rank]}
        ranks[targets.module_name(keys)] = r
    spec2 = variant.truncate(spec, ranks, rank)
    return spec2, _nest_like(adapters, new)


# ----------------------------------------------------------------------------- LoRA-Squeeze


def _check_int(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
    return value


def _qr_core_svd(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``(U [in, p], σ [p], Vᵀ [p, out])`` of ``A B`` via ``A = Q_A R_A``, ``Bᵀ = Q_B R_B``."""
    q_a, r_a = jnp.linalg.qr(a)  # [in, p], [p, r]
    q_b, r_b = jnp.linalg.qr(b.T)  # [out, p'], [p', r]
    u_c, sigma, vt_c = jnp.linalg.svd(r_a @ r_b.T, full_matrices=False)  # the small core
    return q_a @ u_c, sigma, vt_c @ q_b.T


def _rsvd(a: jax.Array, b: jax.Array, width: int, key: jax.Array, niter: int):
    """Randomized SVD of ``A B`` through products with ``A B`` and ``(A B)ᵀ`` only."""
    omega = jax.random.normal(key, (b.shape[1], width), a.dtype)  # [out, l]
    q, _ = jnp.linalg.qr(a @ (b @ omega))  # [in, l]: range of A B
    for _ in range(niter):  # power iterations, re-orthonormalised
        z, _ = jnp.linalg.qr(b.T @ (a.T @ q))  # [out, l]
        q, _ = jnp.linalg.qr(a @ (b @ z))  # [in, l]
    u_s, sigma, vt = jnp.linalg.svd((q.T @ a) @ b, full_matrices=False)  # [l, out] sketch
    return q @ u_s, sigma, vt


def squeeze_factors(
    a: jax.Array,
    b: jax.Array,
    rank: int,
    *,
    scale: float = 1.0,
    new_scale: float = 1.0,
    method: str = "qr",
    key: jax.Array | None = None,
    niter: int = 4,
    oversample: int = 10,
) -> tuple[jax.Array, jax.Array]:
    """``(A' [in, b], B' [b, out])`` with ``new_scale·A'B' = trunc_b(scale·A B)``; never forms ``[in, out]``.

    Args:
      a: ``lora_A``, ``[in, r]``.
      b: ``lora_B``, ``[r, out]``.
      rank: the new rank ``b``, ``1 <= b <= min(in, r, out)``.
      scale: the scale ``s`` of ``A B`` in the trained model.
      new_scale: the scale ``s'`` the new factors are used with (non-zero).
      method: ``"qr"`` (exact: QR of both factors, SVD of the ``r × r`` core) or
        ``"rsvd"`` (randomized SVD by matrix products with ``A B``).
      key: PRNG key of the ``"rsvd"`` sketch (``None``: ``jax.random.key(0)``).
      niter: power iterations of ``"rsvd"``.
      oversample: extra sketch columns of ``"rsvd"`` (the sketch width is
        ``min(b + oversample, r, in, out)``).

    Returns:
      The balanced factors (``√Σ_b`` in each, times ``√|s/s'|``; the sign of
      ``s/s'`` goes into ``B'``), in ``a``'s dtype; the maths runs in at least
      float32.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"squeeze: expected lora_A [in, r] and lora_B [r, out], got {a.shape} and {b.shape}")
    if method not in SQUEEZE_METHODS:
        raise ValueError(f"squeeze: method must be one of {SQUEEZE_METHODS}, got {method!r}")
    d_in, r = a.shape
    d_out = b.shape[1]
    _check_int(rank, "rank", 1)
    if rank > min(d_in, r, d_out):
        raise ValueError(f"squeeze: rank {rank} exceeds min(in, r, out) = {min(d_in, r, d_out)}")
    _check_int(niter, "niter", 0)
    _check_int(oversample, "oversample", 0)
    if new_scale == 0:
        raise ValueError("squeeze: the new scale s' is 0 (alpha' = 0); it cannot carry the update")
    dtype = jnp.promote_types(a.dtype, jnp.float32)
    a32, b32 = a.astype(dtype), b.astype(dtype)
    if method == "qr":
        u, sigma, vt = _qr_core_svd(a32, b32)
    else:
        key = jax.random.key(0) if key is None else key
        u, sigma, vt = _rsvd(a32, b32, min(rank + oversample, r, d_in, d_out), key, niter)
    ratio = scale / new_scale
    root = jnp.sqrt(sigma[:rank] * abs(ratio))  # [b]
    a_new = u[:, :rank] * root[None, :]
    b_new = (math.copysign(1.0, ratio) * root)[:, None] * vt[:rank]
    return a_new.astype(a.dtype), b_new.astype(b.dtype)


def _target_scale(factors: Factors, spec: Spec, keys: tuple, a: jax.Array, b: jax.Array, rank: int) -> float:
    """The variant's ``s`` for the adapter at ``keys`` under ``spec`` at ``rank`` (alpha patterns applied)."""
    name = targets.module_name(keys)
    alpha = float(targets.pattern_value(spec.alpha_pattern, name, spec.alpha))
    t = Target(
        keys=keys, name=name, shape=(a.shape[0], b.shape[-1]), in_axes=1, rank=rank, alpha=alpha, options=spec.options
    )
    if factors.scale is None:
        raise ValueError(f"variant {spec.variant!r} declares no Factors.scale: the scale of its s·A·B term is unknown")
    return factors.scale(t)


def squeeze(
    spec: Spec,
    adapters: dict,
    rank: int,
    method: str = "qr",
    key: Any = None,
    *,
    alpha: float | None = None,
    niter: int = 4,
    oversample: int = 10,
) -> tuple[Spec, dict]:
    """``(spec', adapters')``: every ``s·A B`` replaced by its best rank-``rank`` approximation.

    See the module docstring for the maths and the decisions taken.

    Args:
      spec: the `Spec` the adapters were made with (a variant that declares ``factors``).
      adapters: the adapters tree (`lorajax.init` layout).
      rank: the new rank ``b``; ``1 <= b <`` every target's rank.
      method: ``"qr"`` (exact, QR-core route) or ``"rsvd"`` (randomized SVD).
      key: PRNG key or int seed of ``"rsvd"`` (``None``: 0); each target uses
        ``fold_in(key, crc32(path))``.
      alpha: the new spec's ``α'``; ``None`` keeps ``α`` and ``alpha_pattern``
        (``s' = α/b``). A number replaces both (``s' = α'/b`` everywhere).
      niter, oversample: randomized-SVD power iterations and extra sketch columns.

    Returns:
      The new spec (``rank=b``, no ``rank_pattern``) and a new adapters tree
      whose merged weights are ``W + trunc_b(s·A B)`` (DoRA: the magnitude is
      kept); nothing is mutated.

    Raises:
      ValueError: another variant (the supported ones are named), a bad
        ``rank`` / ``method`` / ``alpha``, or ``rank`` not below the rank of
        the adapter at some path (named).
    """
    factors = registry.get(spec.variant).factors
    if factors is None:
        raise ValueError(
            f"squeeze supports the variants with an s·A·B term {registry.with_capability('factors')}, "
            f"got {spec.variant!r}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"squeeze: rank must be an int >= 1, got {rank!r}")
    if method not in SQUEEZE_METHODS:
        raise ValueError(f"squeeze: method must be one of {SQUEEZE_METHODS}, got {method!r}")
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0
    ):
        raise ValueError(f"squeeze: alpha must be a finite non-zero number or None, got {alpha!r}")
    _check_int(niter, "niter", 0)
    _check_int(oversample, "oversample", 0)
    index = adapter_paths(adapters)
    if not index:
        raise ValueError("squeeze: the adapters tree holds no adapter")
    if alpha is None:
        spec2 = spec.replace(rank=rank, rank_pattern={})
    else:
        spec2 = spec.replace(rank=rank, rank_pattern={}, alpha=float(alpha), alpha_pattern={})
    if key is None:
        key = jax.random.key(0)
    elif isinstance(key, int):
        key = jax.random.key(key)
    new: dict[tuple, dict] = {}
    for keys, adapter in index.items():
        path = "/".join(keys)
        a, b, r = _factors(
            "squeeze", path, adapter, (factors.a, factors.b), exact=factors.exact, ab=(factors.a, factors.b)
        )
        if rank >= r:
            raise ValueError(f"squeeze: rank {rank} is not below the rank {r} of the adapter at {path}")
        s_old = _target_scale(factors, spec, keys, a, b, r)
        s_new = _target_scale(factors, spec2, keys, a, b, rank)
        tkeys = keys[1:] if keys[0] == "params" else keys
        tkey = jax.random.fold_in(key, zlib.crc32(".".join(tkeys).encode()) & 0x7FFFFFFF)
        a2, b2 = squeeze_factors(
            a, b, rank, scale=s_old, new_scale=s_new, method=method, key=tkey, niter=niter, oversample=oversample
        )
        new[keys] = {**adapter, factors.a: a2, factors.b: b2}
    return spec2, _nest_like(adapters, new)


def squeeze_schedule(r0: int, r_target: int, steps: int, n_stages: int) -> tuple[tuple[int, int], ...]:
    """In-training squeezes ("In-Squeeze"): ``((step_1, r_1), …, (step_K, r_K))`` with ``r_K = r_target``.

    Training of ``steps`` steps is cut into ``K + 1 = n_stages + 1`` equal
    segments: squeeze ``i`` happens at ``step_i = round(i·steps/(K+1))`` (before
    that step's update), to ``r_i ≈ r0·(r_target/r0)^(i/K)`` (geometric,
    rounded, kept strictly decreasing), so the last segment trains at
    ``r_target``. The paper's schedule is UNVERIFIED; this one is a design choice.

    Raises:
      ValueError: ``r0 <= r_target``, ``r_target < 1``, ``n_stages < 1``,
        more stages than ranks between ``r0`` and ``r_target`` or than steps.
    """
    for value, what, low in ((r0, "r0", 2), (r_target, "r_target", 1), (steps, "steps", 1), (n_stages, "n_stages", 1)):
        _check_int(value, what, low)
    if r_target >= r0:
        raise ValueError(f"squeeze_schedule: r_target {r_target} must be below r0 {r0}")
    if n_stages > r0 - r_target:
        raise ValueError(
            f"squeeze_schedule: {n_stages} stages need {n_stages} distinct ranks below r0={r0} "
            f"and >= r_target={r_target}; there are only {r0 - r_target}"
        )
    if steps < n_stages + 1:
        raise ValueError(f"squeeze_schedule: {n_stages} stages need steps >= {n_stages + 1}, got {steps}")
    out, prev = [], r0
    for i in range(1, n_stages + 1):
        r_i = round(r0 * (r_target / r0) ** (i / n_stages))
        r_i = max(min(r_i, prev - 1), r_target + (n_stages - i))  # strictly decreasing, room for the rest
        out.append((round(i * steps / (n_stages + 1)), r_i))
        prev = r_i
    return tuple(out)


def _is_record(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def squeeze_opt_state(
    opt_state: Any, spec: Spec, adapters: dict, new_spec: Spec, new_adapters: dict, *, mode: str = "reset"
) -> Any:
    """The optimiser state for ``new_adapters`` after a `squeeze` of ``adapters``.

    Every sub-tree of ``opt_state`` with the structure of ``adapters`` (the
    tree the optimiser was initialised on, e.g. Adam's ``mu`` and ``nu``) is
    replaced by one shaped like ``new_adapters``:

    * ``mode="reset"`` (default): zeros. Where such a tree is a whole field of
      a state record (optax's ``ScaleByAdamState``), the record's ``count`` is
      reset to 0 as well, so Adam's bias correction restarts with its moments,
      exactly as ``tx.init(new_adapters)`` would; other state (schedule
      counts) is kept.
    * ``mode="project"``: the moments follow the factors. With ``A' = A T_A``
      and ``B' = T_B B`` (``T_A = A⁺A'``, ``T_B = B'B⁺``), a gradient of the
      same full-weight gradient ``G`` maps as ``g_A' = (s'/s)·g_A T_Bᵀ`` and
      ``g_B' = (s'/s)·T_Aᵀ g_B``; first moments (``mu*`` fields) are mapped so,
      second moments (``nu*`` fields) by the element-wise squared maps (exact
      only for signed permutations; an approximation). Counts are kept.
      Other entries (DoRA's ``magnitude``) keep their moments.

    Which to use after a squeeze is UNVERIFIED in the paper; reset is the
    spec's proposal.

    Args:
      opt_state: an optax state built with ``tx.init(adapters)``.
      spec, adapters: before the squeeze.
      new_spec, new_adapters: `squeeze`'s result.
      mode: ``"reset"`` or ``"project"``.

    Raises:
      ValueError: a bad mode, no sub-tree matching ``adapters``, or (project)
        a matched field whose name starts with neither ``mu`` nor ``nu``.
    """
    if mode not in ("reset", "project"):
        raise ValueError(f"squeeze_opt_state: mode must be 'reset' or 'project', got {mode!r}")
    old_def = jax.tree_util.tree_structure(adapters)
    old_index, new_index = adapter_paths(adapters), adapter_paths(new_adapters)
    if set(old_index) != set(new_index):
        raise ValueError("squeeze_opt_state: adapters and new_adapters have different targets")
    maps: dict[tuple, tuple] = {}
    if mode == "project":
        factors = registry.get(spec.variant).factors
        if factors is None:
            raise ValueError(
                f"squeeze_opt_state: mode='project' needs a variant with an s·A·B term "
                f"{registry.with_capability('factors')}, got {spec.variant!r}"
            )
        for keys, ad in old_index.items():
            nd = new_index[keys]
            s_old = _target_scale(factors, spec, keys, ad[factors.a], ad[factors.b], ad[factors.a].shape[1])
            s_new = _target_scale(factors, new_spec, keys, nd[factors.a], nd[factors.b], nd[factors.a].shape[1])
            f32 = jnp.promote_types(ad["lora_A"].dtype, jnp.float32)
            t_a = jnp.linalg.lstsq(ad["lora_A"].astype(f32), nd["lora_A"].astype(f32))[0]  # [r, b]
            t_b_t = jnp.linalg.lstsq(ad["lora_B"].T.astype(f32), nd["lora_B"].T.astype(f32))[0]  # [r, b] = T_Bᵀ
            maps[keys] = (s_new / s_old, t_a, t_b_t)

    def moments(tree: Any, field: str) -> Any:
        out: dict[tuple, dict] = {}
        for keys, m in adapter_paths(tree).items():
            nd = new_index[keys]
            if mode == "reset":
                out[keys] = jax.tree_util.tree_map(jnp.zeros_like, nd)
                continue
            if not (field.startswith("mu") or field.startswith("nu")):
                raise ValueError(
                    f"squeeze_opt_state: cannot project the optimiser field {field!r} "
                    "(only mu* first and nu* second moments); use mode='reset'"
                )
            ratio, t_a, t_b_t = maps[keys]
            if field.startswith("nu"):
                ratio, t_a, t_b_t = ratio**2, t_a**2, t_b_t**2
            mu_a, mu_b = m["lora_A"], m["lora_B"]
            out[keys] = {
                **m,
                "lora_A": (ratio * (mu_a.astype(t_b_t.dtype) @ t_b_t)).astype(mu_a.dtype),  # [in, b]
                "lora_B": (ratio * (t_a.T @ mu_b.astype(t_a.dtype))).astype(mu_b.dtype),  # [b, out]
            }
        return _nest_like(tree, out)

    found = []

    def same_structure(node: Any) -> bool:
        structure: Any = jax.tree_util.tree_structure(node)  # Any: jaxlib has no stubs for PyTreeDef
        return structure == old_def

    def walk(node: Any, field: str) -> Any:
        if same_structure(node):
            found.append(field)
            return moments(node, field)
        if _is_record(node):
            fields = {f: walk(getattr(node, f), f) for f in node._fields}
            whole = [f for f in node._fields if same_structure(getattr(node, f))]
            if mode == "reset" and whole and "count" in fields and "count" not in whole:
                fields["count"] = jnp.zeros_like(getattr(node, "count"))
            return type(node)(**fields)
        if isinstance(node, (tuple, list)):
            return type(node)(walk(v, field) for v in node)
        if isinstance(node, dict):
            return {k: walk(v, field) for k, v in node.items()}
        return node

    result = walk(opt_state, "")
    if not found:
        raise ValueError(
            "squeeze_opt_state: no part of opt_state has the structure of the adapters; "
            "pass the tree the optimiser was initialised on"
        )
    return result
