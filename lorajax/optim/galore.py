"""GaLore: full-weight training with Adam run in a low-rank gradient subspace.

This is `optax.contrib.galore` driven by lorajax's target grammar: the weights
that `lorajax.Spec` would adapt (a list of module-name suffixes, a regex or
``"all-linear"``; ``exclude``, ``layers_to_transform``, ``in_axes`` for N-D
kernels) get GaLore-Adam, every other leaf (embeddings, the head, norms,
biases) gets plain Adam. GaLore is for **full** fine-tuning / pre-training:
the optimised tree is the model's params, not an adapters tree. Nothing of the
algorithm is written here; lorajax only turns the selection into optax's
``weight_dimension_numbers`` (`galore_dimension_numbers`) and reports the
state size (`state_bytes`, `galore_state_formula`).

Maths. A targeted kernel is viewed as a matrix ``G ∈ R^{a×b}`` (``a`` =
product of its first ``in_axes`` axes, ``b`` = the rest; a Dense kernel is
``[in, out]``). With ``r = rank``, ``T = update_proj_gap``, ``s = scale``,
``η = learning_rate``, ``λ = weight_decay`` and step count ``t`` (0-based):

* if ``t mod T == 0``: SVD ``G_t = U Σ Vᵀ`` (float32); the projector is
  ``P = U[:, :r]`` (``a×r``) when ``a ≥ b``, else ``P = V[:, :r]`` (``b×r``):
  it sits on the **larger** side;
* ``R = Pᵀ G`` (``r×b``) or ``R = G P`` (``a×r``): Adam's moments live on
  the smaller side, ``M ← β₁M + (1−β₁)R``, ``V ← β₂V + (1−β₂)R²``,
  ``N = M̂ / (√V̂ + ε)`` (optax's ``scale_by_adam``; moments are neither reset
  nor rotated at a refresh);
* ``ΔW = −η (s · P N  [or s · N Pᵀ] + λ W)``.

State per targeted weight: projector ``max(a, b)·r`` + moments
``2·min(a, b)·r``; other leaves: Adam's ``2·size``; plus int32 step counts.

Against the official ``galore_torch.GaLoreAdamW`` (tests/parity/test_galore_torch.py):

* Side. optax (so lorajax) is the official ``proj_type="reverse_std"`` on the
  same ``a×b`` array, step for step. The official default ``"std"`` puts the
  projector on the *smaller* side and the moments on the larger one (more
  memory: ``min·r + 2·max·r``). Both project onto ``trunc_r(G)`` at a
  refresh, but Adam's element-wise normalisation depends on the basis, so the
  two Adam updates differ; they coincide only for a linear base optimiser
  (SGD) at refresh steps.
* ε. optax adds ε to the bias-corrected ``√V̂``; the official code adds it to
  the raw ``√V`` (HF AdamW, default 1e-6). Equal for ε → 0 and, once
  ``1 − β₂ᵗ ≈ 1``, for the same ε. lorajax keeps optax's default 1e-8.
* Weight decay. optax adds ``λW`` to the update before the learning rate;
  the official code decays *after* the step: ``W ← (W − ηU)(1 − ηλ)``, an
  ``η²λU`` difference per step.
* SVD signs. Singular vectors are defined up to sign; moments carried across
  a refresh mix old and new coordinates, so after the second refresh the
  trajectory depends on the SVD routine's sign choice (torch and XLA differ
  for some shapes). Within one projector period the update is sign-invariant.
* Rank. optax and the official code silently clamp ``r`` to ``min(a, b)``;
  lorajax raises, naming the weight. N-D kernels: the official code uses a
  Tucker projector; lorajax (optax) reshapes to ``a×b`` by ``in_axes``.

``rank = min(a, b)`` is *not* Adam: the projector is then an orthonormal
basis of ``G₀``'s range, and Adam run in that rotated basis differs from Adam
(Adam is not rotation-invariant). It equals the base optimiser exactly for a
rotation-invariant base (SGD, momentum) on square weights, or with ``T = 1``.

8-bit states (the official ``GaLoreAdamW8bit``): ``optim_bits=8`` runs
`lorajax.optim.scale_by_adam_8bit` — bitsandbytes' block-wise dynamically
quantised Adam (one ``uint8`` code per element and one float32 absmax per
256-element block for each moment; tensors with fewer than ``min_8bit_size``
= 4096 elements keep float32 moments) — in the subspace and on every other
leaf, as the official optimiser runs bitsandbytes' ``Optimizer2State("adam",
optim_bits=8)`` on all parameters. bitsandbytes' ε is outside the
bias-corrected ``√V̂`` (as optax's), so only the side and the weight-decay
order differ from the official 8-bit optimiser (tests/parity/test_galore_torch.py;
there also: galore-torch 1.0 on bitsandbytes ≥ 0.50 passes ``percentile_clipping``
and ``block_wise`` into bnb's ``max_unorm`` and ``skip_zeros``, which freezes
GaLore weights whose projected gradient is on bnb's 32-bit path).
Note that optax's side keeps the moments small: a weight's projected gradient
``min(a, b)·r`` must reach 4096 elements to be stored in 8 bits. A non-finite
gradient is skipped by the 8-bit base (state unchanged), but at a refresh step
optax's SVD of it still makes the projector — and so that step's update —
NaN; wrap the whole transform in `lorajax.optim.skip_nonfinite` to skip such
steps entirely. `state_bytes` = ``galore_state_formula(..., optim_bits=8)``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"q": {"kernel": jnp.ones((16, 8))}, "emb": {"embedding": jnp.ones((10, 16))},
  ...           "o": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)}}
  >>> from lorajax.optim.galore import galore, galore_mask, galore_state_formula, state_bytes
  >>> tx = galore(1e-3, targets=["q", "o"], rank=4, update_proj_gap=200)
  >>> state = tx.init(params)
  >>> state[0].projector["q"]["kernel"].shape, state[0].projector["o"]["kernel"].shape
  ((16, 4), (16, 4))
  >>> state[0].base_optimizer_state.mu["q"]["kernel"].shape   # moments on the smaller side
  (4, 8)
  >>> galore_mask(params, ["q", "o"], rank=4)["emb"]["embedding"]
  False
  >>> state_bytes(tx, params) == galore_state_formula(params, ["q", "o"], rank=4).total
  True
  >>> tx8 = galore(1e-3, targets=["q", "o"], rank=4, optim_bits=8, min_8bit_size=16)
  >>> tx8.init(params)[0].base_optimizer_state.inner_state.mu["q"]["kernel"].codes.dtype   # 4x8 = 32 >= 16
  dtype('uint8')
  >>> state_bytes(tx8, params) == galore_state_formula(
  ...     params, ["q", "o"], rank=4, optim_bits=8, min_8bit_size=16).total
  True

References:
  J. Zhao, Z. Zhang, B. Chen, Z. Wang, A. Anandkumar, Y. Tian, "GaLore:
  Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
  arXiv:2403.03507. Official code jiaweizzhao/GaLore (PyPI ``galore-torch``
  1.0): ``galore_torch/adamw.py``, ``galore_torch/galore_projector.py``.
  optax: ``optax/contrib/_galore.py`` (``galore``, ``scale_by_galore``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax
from optax.contrib import GaLoreDimensionNumbers

from lorajax.optim._checks import check, is_traced, require_static
from lorajax.optim.adam8bit import check_block_size, moment_bytes, scale_by_adam_8bit
from lorajax.paths import key_names
from lorajax.selection import Selection, Weight
from lorajax.spec import Spec
from lorajax.variants.base import Target

__all__ = [
    "galore",
    "galore_targets",
    "galore_dimension_numbers",
    "galore_mask",
    "state_bytes",
    "galore_state_formula",
    "GaLoreStateSize",
]

_SELECTION_DEFAULTS = dict(exclude=None, layers_to_transform=None, layers_pattern=None, in_axes=1)


def _check_rank(rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")


def _is_target_list(targets: Any) -> bool:
    return (
        isinstance(targets, (list, tuple)) and bool(targets) and all(isinstance(t, (Target, Weight)) for t in targets)
    )


def galore_targets(
    params: Any,
    targets: Any = "all-linear",
    *,
    rank: int,
    exclude: Any = None,
    layers_to_transform: Any = None,
    layers_pattern: Any = None,
    in_axes: int | dict = 1,
) -> list[Target | Weight]:
    """The kernels of ``params`` that get GaLore, checked against ``rank``.

    Args:
      params: the trained tree (bare params or a Flax ``variables`` dict);
        arrays or ``jax.ShapeDtypeStruct``.
      targets: the target grammar of `lorajax.Spec` (suffix list, regex,
        ``"all-linear"``), a `lorajax.selection.Selection`, a `lorajax.Spec`
        (its selection is used, not its rank), or a list of `Target` records
        from `lorajax.select` (or `Weight`s from ``Selection.resolve``).
      rank: GaLore rank ``r``; must be ``≤ min(a, b)`` for every selected
        kernel viewed as ``a×b``.
      exclude, layers_to_transform, layers_pattern, in_axes: as in
        `lorajax.Spec`.

    Raises:
      ValueError: a target that matches nothing (from `lorajax.select`), a
        ``Target`` whose path is not in ``params``, or ``rank`` larger than a
        selected kernel's smaller side (naming its path).
    """
    _check_rank(rank)
    selection = dict(
        exclude=exclude, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, in_axes=in_axes
    )
    if _is_target_list(targets) or isinstance(targets, (Spec, Selection)):
        changed = [k for k, v in selection.items() if v != _SELECTION_DEFAULTS[k]]
        if changed:
            raise ValueError(f"{changed} given together with a Spec or Target list, which already fixes the selection")
    if _is_target_list(targets):
        found = {key_names(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        for t in targets:
            if found.get(tuple(t.keys)) != tuple(t.shape):
                raise ValueError(
                    f"target {'/'.join(t.keys)!r} with shape {t.shape} is not a leaf of params "
                    f"(found shape {found.get(tuple(t.keys))})"
                )
        selected = list(targets)
    else:
        if isinstance(targets, Spec):
            targets = targets.selection
        sel = targets if isinstance(targets, Selection) else Selection(targets, **selection)
        selected = sel.resolve(params)
    for t in selected:
        a, b = t.matrix_shape
        if rank > min(a, b):
            raise ValueError(
                f"GaLore rank {rank} is larger than min(in, out) = {min(a, b)} for {t.name!r} "
                f"(path {'/'.join(t.keys)}, kernel {tuple(t.shape)} viewed as {a}x{b} with in_axes={t.in_axes}); "
                f"lower the rank or exclude this weight"
            )
    return selected


def _dimension_numbers(t: Target | Weight) -> GaLoreDimensionNumbers:
    return GaLoreDimensionNumbers(
        reduction_axis=tuple(range(t.in_axes)), output_axis=tuple(range(t.in_axes, len(t.shape)))
    )


def galore_dimension_numbers(params: Any, targets: Any = "all-linear", *, rank: int, **selection) -> Any:
    """optax's ``weight_dimension_numbers`` pytree for ``params``.

    A `GaLoreDimensionNumbers` (input axes = the first ``in_axes``, output axes
    = the rest) at every selected kernel, ``None`` (plain base optimiser)
    elsewhere. Arguments as `galore_targets`.
    """
    by_keys = {tuple(t.keys): _dimension_numbers(t) for t in galore_targets(params, targets, rank=rank, **selection)}
    return jax.tree_util.tree_map_with_path(lambda p, _: by_keys.get(key_names(p)), params)


def galore_mask(params: Any, targets: Any = "all-linear", *, rank: int, **selection) -> Any:
    """A bool tree: ``True`` where a leaf gets GaLore, ``False`` where plain Adam.

    For ``optax.masked`` / ``multi_transform`` or for logging which rule caught
    which weight. Arguments as `galore_targets`.
    """
    dims = galore_dimension_numbers(params, targets, rank=rank, **selection)
    return jax.tree.map(lambda _, d: d is not None, params, dims, is_leaf=lambda x: x is None)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    *,
    targets: Any = "all-linear",
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    base_optimizer: optax.GradientTransformation | None = None,
    optim_bits: int = 32,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    exclude: Any = None,
    layers_to_transform: Any = None,
    layers_pattern: Any = None,
    in_axes: int | dict = 1,
    params: Any = None,
) -> optax.GradientTransformation:
    """GaLore-Adam on the selected kernels, Adam on every other leaf (`optax.contrib.galore`).

    Args:
      learning_rate: ``η``, a float or an optax schedule.
      targets: the target grammar of `lorajax.Spec`, a `Spec`, or a list of
        `Target` records (see `galore_targets`). Default ``"all-linear"``:
        every 2-D kernel but the output head.
      rank: ``r`` (official scripts: 128 for 60M, 1024 for 1B/7B).
      update_proj_gap: ``T``, steps between projector refreshes (official 200).
      scale: ``s``, applied to the projected-back update of GaLore weights only
        (official pre-training scripts: 0.25).
      b1, b2, eps, eps_root, mu_dtype: `optax.scale_by_adam`'s, used when
        ``base_optimizer`` is None.
      weight_decay: ``λ``, decoupled, applied to every leaf in full space.
      weight_decay_mask: optax ``mask`` for the decay (a bool tree or callable).
      base_optimizer: a params-free gradient transformation run in the
        subspace (and on untargeted leaves); default ``scale_by_adam``.
      optim_bits: 32, or 8 for the official ``GaLoreAdamW8bit``'s state:
        `scale_by_adam_8bit` (``b1``, ``b2``, ``eps``) as the base, with
        ``block_size`` (bitsandbytes ≥ 0.44: 256; 2048 before) and
        ``min_8bit_size`` (4096). Not with ``base_optimizer``, ``mu_dtype``
        or ``eps_root``.
      exclude, layers_to_transform, layers_pattern, in_axes: as `lorajax.Spec`.
      params: optional; when given, the selection is validated now. Otherwise
        it is resolved (and validated) on the tree passed to ``init`` and
        ``update`` (Python, at trace time).

    Returns:
      An optax ``GradientTransformation``; its state is
      ``(GaLoreState, add_decayed_weights state, learning-rate state)``.

    Under ``optax.inject_hyperparams``, the integers that fix shapes and
    control flow must be static: ``static_args=("rank", "update_proj_gap",
    "optim_bits", "block_size", "min_8bit_size", "in_axes")`` (as optax's own
    tests do for ``optax.contrib.galore``); the float hyper-parameters
    (``learning_rate``, ``scale``, ``b1``, ``b2``, ``eps``, ``weight_decay``)
    are injectable.
    """
    require_static(
        "galore",
        rank=rank,
        update_proj_gap=update_proj_gap,
        optim_bits=optim_bits,
        block_size=block_size,
        min_8bit_size=min_8bit_size,
        in_axes=in_axes,
    )
    _check_rank(rank)
    if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap <= 0:
        raise ValueError(f"update_proj_gap must be a positive int, got {update_proj_gap!r}")
    check("scale", scale, math.isfinite, "a finite number")
    selection = dict(
        exclude=exclude, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, in_axes=in_axes
    )

    def dimension_numbers(tree: Any) -> Any:
        return galore_dimension_numbers(tree, targets, rank=rank, **selection)

    if optim_bits not in (8, 32) or isinstance(optim_bits, bool):
        raise ValueError(f"optim_bits must be 32 or 8, got {optim_bits!r}")
    if optim_bits == 32 and (block_size, min_8bit_size) != (256, 4096):
        raise ValueError("block_size and min_8bit_size only apply to optim_bits=8")
    if optim_bits == 8:
        given = [n for n, v in (("base_optimizer", base_optimizer), ("mu_dtype", mu_dtype)) if v is not None]
        given += ["eps_root"] if not is_traced(eps_root) and eps_root != 0.0 else []
        if given:
            raise ValueError(
                f"optim_bits=8 chooses the base optimiser (scale_by_adam_8bit); {given} cannot be "
                f"combined with it (pass base_optimizer=scale_by_adam_8bit(...) instead)"
            )
        base_optimizer = scale_by_adam_8bit(b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size)
    if params is not None:
        dimension_numbers(params)
    if base_optimizer is None:
        base_optimizer = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype)
    return _none_leaves_as_masked(
        optax.contrib.galore(
            learning_rate,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale if is_traced(scale) else float(scale),
            base_optimizer=base_optimizer,
            weight_decay=weight_decay,
            mask=weight_decay_mask,
            weight_dimension_numbers=dimension_numbers,
        )
    )


def _none_leaves_as_masked(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run ``inner`` with ``None`` leaves (frozen, from a partition) as ``optax.MaskedNode``, giving ``None`` back.

    `optax.contrib.galore` maps its ``None``-for-untargeted dimension-number tree
    with ``is_leaf`` catching ``None``, which then also stops at a ``None``
    parameter; a ``MaskedNode`` (an empty node, as ``optax.masked`` uses) is skipped.
    """
    inner = optax.with_extra_args_support(inner)
    is_none = lambda x: x is None  # noqa: E731
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731

    def masked(tree):
        return (
            None
            if tree is None
            else jax.tree.map(lambda x: optax.MaskedNode() if x is None else x, tree, is_leaf=is_none)
        )

    def init(params):
        return inner.init(masked(params))

    def update(updates, state, params=None, **extra_args):
        new, state = inner.update(masked(updates), state, masked(params), **extra_args)
        return jax.tree.map(lambda x: None if is_masked(x) else x, new, is_leaf=is_masked), state

    return optax.GradientTransformationExtraArgs(init, update)


def state_bytes(tx: optax.GradientTransformation | Callable[[Any], Any], params: Any) -> int:
    """Exact optimiser-state size in bytes: ``Σ size × itemsize`` over ``tx.init(params)``'s leaves.

    Nothing is allocated: the state's shapes come from `jax.eval_shape`, so
    ``params`` may be ``jax.ShapeDtypeStruct`` leaves (e.g. from
    ``jax.eval_shape(model.init, ...)``). ``tx`` is any optax transformation or
    an ``init`` function.
    """
    init = tx.init if hasattr(tx, "init") else tx
    shapes = jax.eval_shape(init, params)
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes)))


class GaLoreStateSize(NamedTuple):
    """Optimiser-state bytes by part (see `galore_state_formula`)."""

    projector: int  # Σ_targets max(a, b)·r  (official "std": min(a, b)·r)
    low_rank_moments: int  # Σ_targets 2·min(a, b)·r (official "std": 2·max(a, b)·r); 8-bit: see moment_bytes
    full_moments: int  # Σ_other leaves 2·size (Adam's m, v); 8-bit: see moment_bytes
    scalars: int  # int32 step counts (8-bit: + the skipped-steps count)

    @property
    def total(self) -> int:
        return self.projector + self.low_rank_moments + self.full_moments + self.scalars


def galore_state_formula(
    params: Any,
    targets: Any = "all-linear",
    *,
    rank: int = 128,
    mu_dtype: Any = None,
    schedule: bool = False,
    side: str = "optax",
    optim_bits: int = 32,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    **selection,
) -> GaLoreStateSize:
    """Analytic state size of `galore` with the default Adam base, in bytes.

    For each selected kernel viewed as ``a×b``: projector ``max(a, b)·r`` and
    Adam's moments of the projected gradient ``min(a, b)·r`` each (``mu`` in
    ``mu_dtype`` if given), in the kernel's dtype; every other leaf: Adam's
    ``m``, ``v`` of full size; scalars: GaLore's and Adam's int32 counts, plus
    one for a learning-rate ``schedule``. Equal to `state_bytes` of the
    matching `galore` (tested).

    ``side="official-std"`` gives instead the official ``galore-torch``
    default (projector ``min(a, b)·r``, moments ``2·max(a, b)·r``), for
    comparison only (its scalar counts are Python ints, counted as 0).

    ``optim_bits=8`` (`galore` with ``optim_bits=8``): each moment of ``n``
    elements takes ``n`` bytes of codes plus ``4·⌈n / block_size⌉`` bytes of
    float32 absmax if ``n ≥ min_8bit_size``, else ``4·n`` (float32 whatever the
    weight dtype); scalars gain the 8-bit base's skipped-steps count. With
    ``side="official-std"`` this is the official ``GaLoreAdamW8bit``'s state
    (bitsandbytes' shared 256-entry maps not counted).
    """
    if side not in ("optax", "official-std"):
        raise ValueError(f"side must be 'optax' or 'official-std', got {side!r}")
    if optim_bits not in (8, 32) or isinstance(optim_bits, bool):
        raise ValueError(f"optim_bits must be 32 or 8, got {optim_bits!r}")
    if optim_bits == 8:
        check_block_size(block_size)
        if mu_dtype is not None:
            raise ValueError("mu_dtype has no meaning with optim_bits=8")

    def moments(n: int, item: int, mu_item: int) -> int:
        if optim_bits == 8:
            return 2 * moment_bytes(n, block_size=block_size, min_8bit_size=min_8bit_size)
        return n * (mu_item + item)

    chosen = {tuple(t.keys): t for t in galore_targets(params, targets, rank=rank, **selection)}
    projector = low_rank = full = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        item = np.dtype(leaf.dtype).itemsize
        mu_item = np.dtype(mu_dtype).itemsize if mu_dtype is not None else item
        t = chosen.get(key_names(path))
        if t is None:
            full += moments(math.prod(leaf.shape), item, mu_item)
            continue
        a, b = t.matrix_shape
        proj_side, moment_side = (max(a, b), min(a, b)) if side == "optax" else (min(a, b), max(a, b))
        projector += proj_side * rank * item
        low_rank += moments(moment_side * rank, item, mu_item)
    scalars = 0 if side != "optax" else 4 * (2 + int(schedule) + int(optim_bits == 8))
    return GaLoreStateSize(projector, low_rank, full, scalars)
