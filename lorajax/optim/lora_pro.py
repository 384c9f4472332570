"""LoRA-Pro: adjust LoRA's gradients so that the step on ``W`` is the best low-rank step.

A step on the factors of ``W' = W + s · A B`` moves ``W`` (to first order) by
``s · (g_A B + A g_B)``, the *equivalent gradient*. LoRA-Pro replaces the
LoRA gradients ``(g_A, g_B)`` by the pair whose equivalent gradient is closest
(Frobenius) to the full gradient ``G = ∂L/∂W``, using only ``g_A`` and
``g_B`` (``G`` itself is never formed by the model).

Maths, Flax orientation (``A = lora_A: [in, r]``, ``B = lora_B: [r, out]``,
``G: [in, out]``; the paper and the official code use PyTorch's
``[out, in]``: ``B_pt = Bᵀ``, ``A_pt = Aᵀ``, ``G_pt = Gᵀ``)::

    g_A = s · G Bᵀ,   g_B = s · Aᵀ G                         (LoRA's own gradients)
    Aᵢ = (AᵀA + δI)⁺,   Bᵢ = (BBᵀ + δI)⁺                      (r × r, damped pseudo-inverses)
    P_B = Bᵀ Bᵢ B   (out side),   P_A = A Aᵢ Aᵀ   (in side)       (never formed)
    g̃_A = (1/s²) · g_A Bᵢ + A X
    g̃_B = (1/s²) · Aᵢ g_B (I − P_B) − X B                     (X ∈ R^{r×r} free)
    s · (g̃_A B + A g̃_B) = G P_B + P_A G (I − P_B)          (independent of X)

The right-hand side is the least-squares projection of ``G`` onto the
achievable set ``{s(a B + A b)}``. ``X`` is chosen to keep the adjusted
gradients closest to the raw ones, ``min ‖g̃_A − g_A‖² + ‖g̃_B − g_B‖²``,
which is the Sylvester equation (`optimal_x`)::

    (AᵀA) X + X (BBᵀ) = −(1/s²) · Aᵀ g_A Bᵢ

(this ``X`` is the transpose of the paper's; ``x="zero"`` sets ``X = 0``;
``x="symmetry"`` is the official code's third choice, reproduced as written:
``X = −(1/(2s²)) · (AᵀA) g_B Bᵀ Bᵢ``). `solve_sylvester` diagonalises the two
symmetric PSD Grams with ``eigh`` (exact, real, runs on any backend); the
official code uses a complex ``eig`` routine that equals
``scipy.linalg.solve_sylvester``. Where ``λᵢ + μⱼ`` vanishes (both factors
rank-deficient) that component of ``X`` is set to 0 instead of dividing by 0.
``(M + δI)⁺`` is a pseudo-inverse from the same ``eigh`` with
``torch.linalg.pinv``'s cutoff (``r · eps · largest eigenvalue``); ``δ = 1e-8``.

The optimiser, `lora_pro` (``mode="full"``, the released method, official
``stage_1_and_2.py::lorapro_full_adjustment``), runs AdamW **in the full
``[in, out]`` space** of each adapted weight, at step ``t = 1, 2, …``::

    g̃_t = s(g̃_A B + A g̃_B)  with X = 0                         # equivalent gradient
    m_t = β1 m_{t−1} + (1−β1) g̃_t,   v_t = β2 v_{t−1} + (1−β2) g̃_t²
    Ĝ = (m_t / (1−β1^t)) / (√v_t / √(1−β2^t) + ε)
    (Δ_A, Δ_B) = adjusted gradients of (s Ĝ Bᵀ, s Aᵀ Ĝ)  with the Sylvester X
    A ← c A − lr Δ_A,   B ← c B − lr Δ_B,   c = √(1 − lr · wd)

so ``W`` moves by ``−lr · (Ĝ P_B + P_A Ĝ (I − P_B))`` to first order: Adam's
full-rank direction, projected. Weight decay follows the official ``peta``
AdamW: ``√(1−lr·wd)`` on both factors decays ``s A B`` by ``(1−lr·wd)``; its
decay of the frozen base weight is **not** done (the base is not in this
tree). The released runs use ``wd = 0``.

**State memory (full mode): two ``[in, out]`` moments per adapted weight**
(``moment_dtype``, default float32) — as much optimiser memory as full
fine-tuning of those weights — plus ``[in, out]`` temporaries each step.
``mode="efficient"`` (official ``peta/optim.py``) instead runs ordinary AdamW
(``optax.adamw``) on the adjusted gradients ``(g̃_A, g̃_B)`` (Sylvester ``X``):
state ``2 · r · (in + out)``, as LoRA. ``mode="sgd"`` is plain SGD on them.
Cost per step: ~6 matmuls of ``O(in · out · r)`` and two ``r × r`` ``eigh``.

Leaves that are not in a ``lora_A``/``lora_B`` pair (a head, biases; e.g. a
``{"adapters": ..., "head": ...}`` tree) get ``other`` (default
``optax.adamw`` with the same hyper-parameters, as the official ``peta`` AdamW
does for non-LoRA parameters), through ``optax.multi_transform``. Pairs are
found by leaf name: the dict that holds ``lora_A`` and ``lora_B``; ``None``
leaves (from `lorajax.partition`) are ignored; a factor without its partner,
or a tree without any pair, raises ``ValueError`` naming the path.

The scale ``s`` comes from ``spec``: a LoRA `lorajax.Spec` (``α / r`` or
``α / √r`` with ``use_rslora``, ``α`` from ``alpha_pattern`` matched on the
dotted module name, ``r`` from ``lora_A``'s shape), or the scale itself: a
number, a ``{regex: s}`` mapping (PEFT's suffix rule on the module name), or a
callable ``path -> s`` (``path`` joined with ``/``).

Non-finite gradients (``skip_nonfinite=True``, default): a step whose
gradients, or the updates computed from them, contain NaN/Inf is skipped —
zero updates, every moment and step count left as they were, and
``skipped`` in the outer `SkipNonFiniteState` counts it. (The official bf16
path has no check; DeepSpeed's fp16 path skips overflowing steps the same way.)

Official-code quirks (`specs/optim.md` §1.5): ``official_quirks=True``
reproduces the two that change the numbers of the released optimiser: bias
corrections use ``t + 1`` (the step counter is incremented before the
adjustment: the first step is ``≈ 0.74 · sign`` instead of ``sign``) and, from
the second step on, ``v`` accumulates squares of the bf16-rounded ``g̃_t``.
``official_clip_norm=c`` reproduces the clipping order: the norm of the *raw*
gradients scales the *adjusted* update by ``1 / max(1, (‖g‖ + 1e-6) / c)``
(HF's default ``c = 1.0``; without it, chain ``optax.clip_by_global_norm``
before, which clips the raw gradients). Not reproduced: the scale hard-coded to
``16/8`` even for rsLoRA (pass ``spec=2.0`` to get it), pairing by alternating
order, the materialised ``out × out`` projector, and the inactivity of the
method on one GPU.

Defaults (official ``stage_1_and_2.py``, hard-coded there): ``β1 = 0.9``,
``β2 = 0.999``, ``ε = 1e-8``, ``δ = 1e-8``; ``weight_decay = 0``; recipe
``minimal_lora_llama2_math_transformers.py`` / ``scripts/llama-2-7b_transformers.sh``:
``r = 8``, ``α = 16``, ``lr = 2e-5`` cosine with 3 % warm-up.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
  >>> spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["dense"], init_weights=False)
  >>> adapters = lorajax.init(spec, params, 0)
  >>> tx = lorajax.optim.lora_pro(1e-3, spec=spec)
  >>> grads = jax.tree.map(jnp.ones_like, adapters)
  >>> updates, state = tx.update(grads, tx.init(adapters), adapters)
  >>> jax.tree.map(jnp.shape, updates)
  {'dense': {'kernel': {'lora_A': (6, 2), 'lora_B': (2, 4)}}}
  >>> a, b = adapters["dense"]["kernel"]["lora_A"], adapters["dense"]["kernel"]["lora_B"]
  >>> from lorajax.optim.lora_pro import adjusted_gradients, equivalent_gradient, lora_pro_projection
  >>> ga, gb = adjusted_gradients(a, b, jnp.ones((6, 4)), 2.0)
  >>> eq = equivalent_gradient(a, b, ga, gb, 2.0)
  >>> bool(jnp.allclose(eq, lora_pro_projection(a, b, jnp.ones((6, 4))), atol=1e-4))
  True

References:
  Wang, Liang, Zhang, Tan, "LoRA-Pro: Are Low-Rank Adapters Properly
  Optimized?", ICLR 2025, arXiv:2407.18242. Official code mrflogs/LoRA-Pro:
  ``DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py``
  (``lorapro_full_adjustment``, ``solve_sylvester``; commit fe260272),
  ``peta/optim.py`` (``AdamW`` full/efficient modes, ``X_mode``, ``SGD``;
  commit a5de2f43), ``minimal_lora_llama2_math_transformers.py``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lorajax import registry
from lorajax.optim._checks import check, is_number, is_traced
from lorajax.optim.labels import leaf_name
from lorajax.spec import Spec
from lorajax.targets import key_names, module_name, pattern_value
from lorajax.variants.base import Target

__all__ = [
    "lora_gradients",
    "equivalent_gradient",
    "lora_pro_projection",
    "solve_sylvester",
    "optimal_x",
    "adjusted_gradients",
    "ScaleByLoraProState",
    "scale_by_lora_pro",
    "adjust_lora_gradients",
    "SkipNonFiniteState",
    "skip_nonfinite",
    "lora_pro",
]

X_MODES = ("sylvester", "zero", "symmetry")
MODES = ("full", "efficient", "sgd")


# --------------------------------------------------------------------------- pure maths (Flax orientation)


def _compute_dtype(*xs: jax.Array) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def lora_gradients(A: jax.Array, B: jax.Array, G: jax.Array, s: Any) -> tuple[jax.Array, jax.Array]:
    """LoRA's gradients from a full gradient: ``(s · G Bᵀ, s · Aᵀ G)`` (``[in, r]``, ``[r, out]``)."""
    return s * (G @ B.T), s * (A.T @ G)


def equivalent_gradient(A: jax.Array, B: jax.Array, g_A: jax.Array, g_B: jax.Array, s: Any) -> jax.Array:
    """``s · (g_A B + A g_B): [in, out]`` — the first-order change of ``W`` per unit step on (A, B)."""
    return s * (g_A @ B + A @ g_B)


class _Grams(NamedTuple):
    """Eigen-decompositions of ``AᵀA`` and ``BBᵀ`` and the damped pseudo-inverses built from them."""

    a_vals: jax.Array
    a_vecs: jax.Array
    b_vals: jax.Array
    b_vecs: jax.Array
    a_inv: jax.Array  # (AᵀA + δI)⁺
    b_inv: jax.Array  # (BBᵀ + δI)⁺


def _damped_pinv(vals: jax.Array, vecs: jax.Array, delta: Any) -> jax.Array:
    """``(M + δI)⁺`` for ``M = V diag(vals) Vᵀ``, zeroing eigenvalues below torch.linalg.pinv's cutoff."""
    d = vals + delta
    cutoff = d.shape[0] * jnp.finfo(d.dtype).eps * jnp.max(jnp.abs(d))
    keep = jnp.abs(d) > cutoff
    inv = jnp.where(keep, 1.0 / jnp.where(keep, d, 1.0), 0.0)
    return (vecs * inv[None, :]) @ vecs.T


def _grams(A: jax.Array, B: jax.Array, delta: Any) -> _Grams:
    a_vals, a_vecs = jnp.linalg.eigh(A.T @ A)
    b_vals, b_vecs = jnp.linalg.eigh(B @ B.T)
    return _Grams(
        a_vals, a_vecs, b_vals, b_vecs, _damped_pinv(a_vals, a_vecs, delta), _damped_pinv(b_vals, b_vecs, delta)
    )


def _sylvester_eigh(lam: jax.Array, P: jax.Array, mu: jax.Array, Q: jax.Array, C: jax.Array) -> jax.Array:
    """Solve ``M X + X N = C`` given ``M = P diag(λ) Pᵀ``, ``N = Q diag(μ) Qᵀ``."""
    den = lam[:, None] + mu[None, :]
    tol = max(den.shape) * jnp.finfo(den.dtype).eps * jnp.max(jnp.abs(den))
    ok = den > tol
    F = P.T @ C @ Q
    Y = jnp.where(ok, F / jnp.where(ok, den, 1.0), 0.0)
    return P @ Y @ Q.T


def solve_sylvester(M: jax.Array, N: jax.Array, C: jax.Array) -> jax.Array:
    """``X`` with ``M X + X N = C`` for symmetric positive semi-definite ``M: [p, p]``, ``N: [q, q]``.

    With ``M = P diag(λ) Pᵀ`` and ``N = Q diag(μ) Qᵀ`` (``eigh``):
    ``X = P [(Pᵀ C Q) ⊘ (λᵢ + μⱼ)] Qᵀ``; entries with ``λᵢ + μⱼ ≈ 0`` (both
    singular) are set to 0. Equals ``scipy.linalg.solve_sylvester`` /
    ``jax.scipy.linalg.solve_sylvester`` when every ``λᵢ + μⱼ`` is non-zero,
    and, unlike the latter's ``"schur"`` method, runs on GPU/TPU.
    """
    dtype = _compute_dtype(M, N, C)
    lam, P = jnp.linalg.eigh(M.astype(dtype))
    mu, Q = jnp.linalg.eigh(N.astype(dtype))
    return _sylvester_eigh(lam, P, mu, Q, C.astype(dtype))


def _sylvester_x(A, g_A, grams: _Grams, s) -> jax.Array:
    C = -(1.0 / s**2) * (A.T @ g_A) @ grams.b_inv
    return _sylvester_eigh(grams.a_vals, grams.a_vecs, grams.b_vals, grams.b_vecs, C)


def _free_matrix(x: Any, A, B, g_A, g_B, grams: _Grams, s) -> jax.Array:
    r = A.shape[1]
    if isinstance(x, str):
        if x == "sylvester":
            return _sylvester_x(A, g_A, grams, s)
        if x == "zero":
            return jnp.zeros((r, r), A.dtype)
        if x == "symmetry":
            return -(0.5 / s**2) * (A.T @ A) @ (g_B @ B.T) @ grams.b_inv
        raise ValueError(f"x must be one of {X_MODES} or an [r, r] array, got {x!r}")
    x = jnp.asarray(x, A.dtype)
    if x.shape != (r, r):
        raise ValueError(f"x must have shape {(r, r)} (rank r = {r}), got {x.shape}")
    return x


def _adjust(A, B, g_A, g_B, s, x, grams: _Grams) -> tuple[jax.Array, jax.Array]:
    c = 1.0 / s**2
    gA0 = c * (g_A @ grams.b_inv)
    gB_perp = g_B - ((g_B @ B.T) @ grams.b_inv) @ B  # g_B (I − P_B) without an [out, out] matrix
    gB0 = c * (grams.a_inv @ gB_perp)
    X = _free_matrix(x, A, B, g_A, g_B, grams, s)
    return gA0 + A @ X, gB0 - X @ B


def _as_pair(A, B, grads, s):
    if isinstance(grads, (tuple, list)):
        if len(grads) != 2:
            raise ValueError(f"grads must be (g_A, g_B) or a full gradient [in, out], got {len(grads)} arrays")
        g_A, g_B = grads
    else:
        G = jnp.asarray(grads)
        if G.shape != (A.shape[0], B.shape[1]):
            raise ValueError(f"full gradient must have shape {(A.shape[0], B.shape[1])} ([in, out]), got {G.shape}")
        g_A, g_B = lora_gradients(A, B, G, s)
    if g_A.shape != A.shape or g_B.shape != B.shape:
        raise ValueError(f"g_A {g_A.shape} / g_B {g_B.shape} do not match lora_A {A.shape} / lora_B {B.shape}")
    return g_A, g_B


def optimal_x(A: jax.Array, B: jax.Array, g_A: jax.Array, s: Any, *, delta: float = 1e-8) -> jax.Array:
    """The Sylvester choice of ``X: [r, r]``: ``(AᵀA) X + X (BBᵀ) = −(1/s²) Aᵀ g_A (BBᵀ + δI)⁺``.

    It minimises ``‖g̃_A − g_A‖² + ‖g̃_B − g_B‖²`` when ``(g_A, g_B) = (s Ĝ Bᵀ, s Aᵀ Ĝ)`` for
    some ``Ĝ`` (``δ = 0``). Flax orientation: the transpose of the paper's ``X``.
    """
    dtype = _compute_dtype(A, B, g_A)
    A, B, g_A = A.astype(dtype), B.astype(dtype), g_A.astype(dtype)
    return _sylvester_x(A, g_A, _grams(A, B, delta), s)


def adjusted_gradients(
    A: jax.Array, B: jax.Array, grads: Any, s: Any, *, x: Any = "sylvester", delta: float = 1e-8
) -> tuple[jax.Array, jax.Array]:
    """LoRA-Pro's adjusted ``(g̃_A: [in, r], g̃_B: [r, out])``.

    Args:
      A, B: ``lora_A: [in, r]``, ``lora_B: [r, out]``.
      grads: ``(g_A, g_B)`` (LoRA's gradients), or a full gradient ``G: [in, out]``
        (then ``g_A = s G Bᵀ``, ``g_B = s Aᵀ G``).
      s: the LoRA scale (``α / r``).
      x: ``"sylvester"`` (default, `optimal_x`), ``"zero"``, ``"symmetry"`` or an ``[r, r]`` array.
      delta: ridge ``δ`` in ``(AᵀA + δI)⁺``, ``(BBᵀ + δI)⁺`` (official 1e-8).

    Returns:
      ``(g̃_A, g̃_B)`` with ``s(g̃_A B + A g̃_B) = G P_B + P_A G (I − P_B)`` for every ``X``,
      in the dtype of the gradients.
    """
    g_A, g_B = _as_pair(A, B, grads, s)
    out = jnp.result_type(g_A, g_B)
    dtype = _compute_dtype(A, B, g_A, g_B)
    A, B, g_A, g_B = (t.astype(dtype) for t in (A, B, g_A, g_B))
    ga, gb = _adjust(A, B, g_A, g_B, s, x, _grams(A, B, delta))
    return ga.astype(out), gb.astype(out)


def lora_pro_projection(A: jax.Array, B: jax.Array, G: jax.Array, *, delta: float = 0.0) -> jax.Array:
    """``G P_B + P_A G (I − P_B)`` — the achievable equivalent gradient closest to ``G: [in, out]``."""
    dtype = _compute_dtype(A, B, G)
    A, B, G = A.astype(dtype), B.astype(dtype), G.astype(dtype)
    grams = _grams(A, B, delta)
    GPB = ((G @ B.T) @ grams.b_inv) @ B
    return GPB + A @ (grams.a_inv @ (A.T @ (G - GPB)))


# --------------------------------------------------------------------------- finding (A, B) pairs


class _Pair(NamedTuple):
    keys: tuple  # path of the dict holding lora_A / lora_B
    ia: int  # index of lora_A among the flattened leaves
    ib: int


def _path_str(keys: tuple) -> str:
    return "/".join(keys) or "<root>"


def _find_pairs(tree: Any, who: str, *, allow_other: bool) -> tuple[list[_Pair], list, Any]:
    """``(pairs, leaves, treedef)`` of ``tree``; errors name the offending path."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    groups: dict[tuple, dict[str, int]] = {}
    others = []
    for i, (path, _) in enumerate(flat):
        name = leaf_name(path)
        if name in ("lora_A", "lora_B"):
            groups.setdefault(key_names(path)[:-1], {})[name] = i
        else:
            others.append(key_names(path))
    pairs = []
    for keys, g in groups.items():
        if len(g) != 2:
            have, lack = ("lora_A", "lora_B") if "lora_A" in g else ("lora_B", "lora_A")
            raise ValueError(
                f"{who}: {_path_str(keys)} has {have} but no {lack} (frozen or None?): "
                "LoRA-Pro needs both factors of every adapted weight"
            )
        a, b = flat[g["lora_A"]][1], flat[g["lora_B"]][1]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(
                f"{who}: {_path_str(keys)} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected [in, r] and [r, out]"
            )
        pairs.append(_Pair(keys, g["lora_A"], g["lora_B"]))
    if not pairs:
        shown = [_path_str(k) for k in others[:8]] + (["..."] if len(others) > 8 else [])
        raise ValueError(
            f"{who}: no lora_A/lora_B pair in the tree (leaves: {shown or 'none'}); LoRA-Pro needs a LoRA adapters tree"
        )
    if others and not allow_other:
        raise ValueError(
            f"{who}: leaf {_path_str(others[0])} is not a lora_A/lora_B factor; "
            "use lorajax.optim.lora_pro (routes other leaves to AdamW) or optax.multi_transform"
        )
    return pairs, [leaf for _, leaf in flat], treedef


def _scale_fn(spec: Any) -> Callable[[tuple, jax.Array], float]:
    """``(pair keys, lora_A) -> s`` from a Spec, a number, a ``{regex: s}`` mapping or a callable."""
    if isinstance(spec, Spec):
        factors = registry.plain_lora(
            spec.variant,
            "lora_pro (its equations assume W + s·A·B; pass the scale itself, a number or mapping, to use other trees)",
        ).factors
        scale = None if factors is None else factors.scale
        if scale is None:
            raise ValueError(
                f"lora_pro: variant {spec.variant!r} declares no Factors.scale; pass the scale itself, "
                "a number or mapping"
            )

        def from_spec(keys, a):
            name = module_name(keys)
            alpha = float(pattern_value(spec.alpha_pattern, name, spec.alpha))
            t = Target(
                keys=tuple(keys),
                name=name,
                shape=(a.shape[0], 1),
                in_axes=1,
                rank=a.shape[1],
                alpha=alpha,
                options=spec.options,
            )
            return scale(t)

        return from_spec
    if is_number(spec):
        if is_traced(spec):  # injected by optax.inject_hyperparams
            return lambda keys, a: spec
        if not (math.isfinite(spec) and spec > 0):
            raise ValueError(f"lora_pro: scale must be a positive finite number, got {spec!r}")
        return lambda keys, a: float(spec)
    if isinstance(spec, Mapping):
        pattern = tuple((str(k), float(v)) for k, v in spec.items())
        if not pattern or not all(math.isfinite(v) and v > 0 for _, v in pattern):
            raise ValueError(f"lora_pro: scale mapping must be non-empty with positive values, got {dict(spec)!r}")

        def from_mapping(keys, a):
            name = module_name(keys)
            s = pattern_value(pattern, name, None)
            if s is None:
                raise ValueError(
                    f"lora_pro: no scale for the pair at {_path_str(keys)} (module name {name!r}); "
                    f"scale keys: {[k for k, _ in pattern]}"
                )
            return s

        return from_mapping
    if callable(spec):
        return lambda keys, a: float(spec(_path_str(keys)))
    raise TypeError(
        "lora_pro: spec must be a lorajax.Spec, a number, a {regex: scale} mapping or a "
        f"callable(path) -> scale, got {type(spec).__name__}"
    )


def _check_hparams(b1, b2, eps, delta, x_mode):
    for name, v in (("b1", b1), ("b2", b2)):
        check(name, v, lambda x: 0.0 <= x < 1.0, "in [0, 1)")
    check("eps", eps, lambda x: x >= 0, ">= 0")
    check("delta", delta, lambda x: x >= 0, ">= 0")
    if x_mode not in X_MODES:
        raise ValueError(f"x_mode must be one of {X_MODES}, got {x_mode!r}")


# --------------------------------------------------------------------------- transformations


class ScaleByLoraProState(NamedTuple):
    """Full-space Adam state: ``mu``/``nu`` map each pair's path (``"q/kernel"``) to ``[in, out]``."""

    count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count, as in optax's states
    mu: dict
    nu: dict


def scale_by_lora_pro(
    spec: Any,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    x_mode: str = "sylvester",
    delta: float = 1e-8,
    moment_dtype: Any = None,
    official_quirks: bool = False,
) -> optax.GradientTransformation:
    """The full-mode direction ``(Δ_A, Δ_B)`` per pair (no learning rate, no decay; needs ``params``).

    Every leaf must be a ``lora_A``/``lora_B`` factor (wrap with ``optax.masked`` /
    ``multi_transform`` otherwise, as `lora_pro` does). See the module docstring.
    """
    _check_hparams(b1, b2, eps, delta, x_mode)
    scale_of = _scale_fn(spec)
    who = "scale_by_lora_pro"

    def init(params):
        pairs, leaves, _ = _find_pairs(params, who, allow_other=False)
        zeros = {}
        for p in pairs:
            a, b = leaves[p.ia], leaves[p.ib]
            scale_of(p.keys, a)  # a missing scale raises here, naming the pair
            dt = moment_dtype or _compute_dtype(a, b)
            zeros[_path_str(p.keys)] = jnp.zeros((a.shape[0], b.shape[1]), dt)
        # mu and nu get their own buffers: a train step that donates the state must not see one array twice
        return ScaleByLoraProState(jnp.zeros([], jnp.int32), zeros, {k: jnp.zeros_like(v) for k, v in zeros.items()})

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(f"{who} needs params: call tx.update(grads, state, params)")
        pairs, grads, treedef = _find_pairs(updates, who, allow_other=False)
        _, plist, _ = _find_pairs(params, who, allow_other=False)
        count = state.count
        k = (count + (2 if official_quirks else 1)).astype(jnp.float32)
        new, mu, nu = list(grads), {}, {}
        for p in pairs:
            key = _path_str(p.keys)
            A, B, gA, gB = plist[p.ia], plist[p.ib], grads[p.ia], grads[p.ib]
            dtype = _compute_dtype(A, B, gA, gB)
            A, B, gA, gB = (t.astype(dtype) for t in (A, B, gA, gB))
            s = scale_of(p.keys, A)
            grams = _grams(A, B, delta)
            # 1. equivalent gradient (X irrelevant: 0)
            eq = equivalent_gradient(A, B, *_adjust(A, B, gA, gB, s, "zero", grams), s)
            # 2. Adam moments in the full [in, out] space
            sq = eq
            if official_quirks:  # after the first step the official code squares bf16-rounded values
                sq = jnp.where(count == 0, eq, eq.astype(jnp.bfloat16).astype(dtype))
            m = b1 * state.mu[key].astype(dtype) + (1 - b1) * eq
            v = b2 * state.nu[key].astype(dtype) + (1 - b2) * (sq * sq)
            bc1 = 1 - jnp.asarray(b1, dtype) ** k.astype(dtype)
            bc2 = 1 - jnp.asarray(b2, dtype) ** k.astype(dtype)
            G_hat = (m / bc1) / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps)
            # 3. pretend Ĝ is the full gradient; adjust with the chosen X
            dA, dB = _adjust(A, B, *lora_gradients(A, B, G_hat, s), s, x_mode, grams)
            new[p.ia] = dA.astype(grads[p.ia].dtype)
            new[p.ib] = dB.astype(grads[p.ib].dtype)
            mu[key] = m.astype(state.mu[key].dtype)
            nu[key] = v.astype(state.nu[key].dtype)
        return (jax.tree_util.tree_unflatten(treedef, new), ScaleByLoraProState(optax.safe_increment(count), mu, nu))

    return optax.GradientTransformation(init, update)


def adjust_lora_gradients(spec: Any, *, x_mode: str = "sylvester", delta: float = 1e-8) -> optax.GradientTransformation:
    """Stateless: replace each pair's ``(g_A, g_B)`` by `adjusted_gradients` (needs ``params``).

    Chain an optimiser after it (``mode="efficient"``: AdamW; ``"sgd"``: SGD).
    """
    _check_hparams(0.0, 0.0, 0.0, delta, x_mode)
    scale_of = _scale_fn(spec)
    who = "adjust_lora_gradients"

    def init(params):
        pairs, leaves, _ = _find_pairs(params, who, allow_other=False)
        for p in pairs:
            scale_of(p.keys, leaves[p.ia])
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(f"{who} needs params: call tx.update(grads, state, params)")
        pairs, grads, treedef = _find_pairs(updates, who, allow_other=False)
        _, plist, _ = _find_pairs(params, who, allow_other=False)
        new = list(grads)
        for p in pairs:
            A = plist[p.ia]
            new[p.ia], new[p.ib] = adjusted_gradients(
                A, plist[p.ib], (grads[p.ia], grads[p.ib]), scale_of(p.keys, A), x=x_mode, delta=delta
            )
        return jax.tree_util.tree_unflatten(treedef, new), state

    return optax.GradientTransformation(init, update)


class _DecayState(NamedTuple):
    count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count, as in optax's states


def _decay_product(learning_rate: Any, weight_decay: float) -> optax.GradientTransformation:
    """Add ``(√(1 − lr·wd) − 1) · p`` (official ``peta`` full mode: ``s A B`` decays by ``1 − lr·wd``)."""

    def init(params):
        del params
        return _DecayState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("lora_pro weight decay needs params: call tx.update(grads, state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        c = jnp.sqrt(jnp.maximum(1.0 - lr * weight_decay, 0.0)) - 1.0
        new = jax.tree.map(lambda u, p: (u + c * p).astype(u.dtype), updates, params)
        return new, _DecayState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


class SkipNonFiniteState(NamedTuple):
    """``inner_state`` of the wrapped optimiser; ``skipped``: how many steps were skipped."""

    inner_state: Any
    skipped: jax.Array


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Skip a step (zero updates, ``inner``'s state unchanged) whose gradients or updates are not finite."""

    def init(params):
        return SkipNonFiniteState(inner.init(params), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        ok = jnp.logical_and(_all_finite(updates), _all_finite(new_updates))
        out = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_inner, state.inner_state)
        return out, SkipNonFiniteState(kept, state.skipped + jnp.where(ok, 0, 1).astype(jnp.int32))

    return optax.GradientTransformation(init, update)


class _ClipState(NamedTuple):
    inner_state: Any


def _official_clip(inner: optax.GradientTransformation, max_norm: float) -> optax.GradientTransformation:
    """Scale ``inner``'s update by ``1 / max(1, (‖raw grads‖ + 1e-6) / max_norm)`` (DeepSpeed's order)."""

    def init(params):
        return _ClipState(inner.init(params))

    def update(updates, state, params=None):
        clip = jnp.maximum((optax.global_norm(updates) + 1e-6) / max_norm, 1.0)
        new, inner_state = inner.update(updates, state.inner_state, params)
        return jax.tree.map(lambda u: (u / clip).astype(u.dtype), new), _ClipState(inner_state)

    return optax.GradientTransformation(init, update)


def lora_pro(
    learning_rate: optax.ScalarOrSchedule,
    *,
    spec: Any,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mode: str = "full",
    x_mode: str = "sylvester",
    delta: float = 1e-8,
    other: optax.GradientTransformation | None = None,
    moment_dtype: Any = None,
    official_quirks: bool = False,
    official_clip_norm: float | None = None,
    skip_nonfinite_steps: bool = True,
) -> optax.GradientTransformation:
    """LoRA-Pro's optimiser over an adapters tree (see the module docstring for the maths).

    Args:
      learning_rate: float or optax schedule.
      spec: a LoRA `lorajax.Spec` (gives ``s`` per pair), or the scale: a number, a
        ``{regex: s}`` mapping on module names, or a callable ``path -> s`` (under
        ``optax.inject_hyperparams`` a callable needs ``static_args="spec"``).
      b1, b2, eps: Adam's (official 0.9, 0.999, 1e-8).
      weight_decay: full mode: ``√(1−lr·wd)`` on A and B; efficient/sgd: optax's
        decoupled ``lr·wd·p``; ``other`` leaves: AdamW's. Official runs: 0.
      mode: ``"full"`` (moments ``[in, out]`` per weight; released method),
        ``"efficient"`` (AdamW on the adjusted ``g̃_A, g̃_B``) or ``"sgd"``.
      x_mode: ``"sylvester"`` (default), ``"zero"`` or ``"symmetry"``.
      delta: ridge in the damped pseudo-inverses (official 1e-8).
      other: transform for the leaves outside any pair (default ``optax.adamw`` with
        the same hyper-parameters).
      moment_dtype: dtype of the full-mode moments (default float32; the old official
        optimiser used bfloat16); in efficient mode, AdamW's ``mu_dtype``.
      official_quirks: full mode: bias correction at ``t + 1``, bf16-rounded squares.
      official_clip_norm: scale the update by the raw gradients' clip factor (see doc).
      skip_nonfinite_steps: wrap in `skip_nonfinite` (default True).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_hparams(b1, b2, eps, delta, x_mode)
    check("weight_decay", weight_decay, lambda x: x >= 0, ">= 0")
    if official_quirks and mode != "full":
        raise ValueError("official_quirks reproduces the full-mode optimiser only; use mode='full'")
    if official_clip_norm is not None:
        check("official_clip_norm", official_clip_norm, lambda x: x > 0, "> 0")
    _scale_fn(spec)  # validate now
    if mode == "full":
        pair_tx = optax.chain(
            scale_by_lora_pro(
                spec,
                b1,
                b2,
                eps,
                x_mode=x_mode,
                delta=delta,
                moment_dtype=moment_dtype,
                official_quirks=official_quirks,
            ),
            optax.scale_by_learning_rate(learning_rate),
            _decay_product(learning_rate, weight_decay),  # always (as optax.adamw): one state for every decay
        )
    elif mode == "efficient":
        pair_tx = optax.chain(
            adjust_lora_gradients(spec, x_mode=x_mode, delta=delta),
            optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay, mu_dtype=moment_dtype),
        )
    else:
        pair_tx = optax.chain(
            adjust_lora_gradients(spec, x_mode=x_mode, delta=delta),
            optax.add_decayed_weights(weight_decay),
            optax.scale_by_learning_rate(learning_rate),
        )
    if other is None:
        other = optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay)

    def labels(tree):
        pairs, leaves, treedef = _find_pairs(tree, "lora_pro", allow_other=True)
        out = ["other"] * len(leaves)
        for p in pairs:
            out[p.ia] = out[p.ib] = "lora_pro"
        return jax.tree_util.tree_unflatten(treedef, out)

    tx = optax.multi_transform({"lora_pro": pair_tx, "other": other}, labels)
    if official_clip_norm is not None:
        tx = _official_clip(tx, official_clip_norm)
    return skip_nonfinite(tx) if skip_nonfinite_steps else tx
