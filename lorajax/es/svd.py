"""SVD form of LoRA adapters: the search space of ESSA (arXiv 2507.04453).

ESSA "compresses [the LoRA] parameter space by optimizing only the singular
values from an SVD of each adapter matrix" (abstract, v3). Which matrix is
decomposed is **UNVERIFIED** (the paper body was not readable; no official code
was found), so both readings are implemented (Flax orientation: ``lora_A:
[in, r]``, ``lora_B: [r, out]``, ``ΔW = s·A·B: [in, out]``, see
`lorajax.variants.lora`):

``form="product"`` — one SVD per adapted weight of the update itself::

    s·A·B = U diag(σ) Vᵀ,   U: [in, r], V: [out, r], σ: [r]        (r numbers searched)

  computed without forming ``A·B``: ``A = Q_A R_A``, ``Bᵀ = Q_B R_B`` (thin
  QR), ``s·R_A R_Bᵀ = Ũ Σ Ṽᵀ`` (an r×r SVD), ``U = Q_A Ũ``, ``V = Q_B Ṽ``.
  Back to LoRA: ``lora_A = U diag(σ)/s``, ``lora_B = Vᵀ``.

``form="factor"`` — one SVD per factor (the abstract's "each adapter matrix")::

    A = U_A diag(σ_A) V_Aᵀ  (U_A: [in, r], V_A: [r, r])
    B = U_B diag(σ_B) V_Bᵀ  (U_B: [r, r],  V_B: [out, r])       (2r numbers searched)

  Back to LoRA: ``lora_A = U_A diag(σ_A) V_Aᵀ``, ``lora_B = U_B diag(σ_B) V_Bᵀ``.

An SVD tree mirrors the adapters tree; each target holds ``{"U", "sigma", "V"}``
(product) or ``{"U_A", "sigma_A", "V_A", "U_B", "sigma_B", "V_B"}`` (factor).
Singular values come in descending order and singular-vector signs are fixed
(the largest-magnitude entry of each left singular vector is positive), so
converting twice gives the same tree. The round trip ``from_svd(to_svd(x))``
reproduces ``s·A·B`` (product) or ``A`` and ``B`` themselves (factor) up to
float rounding.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from lorajax.es import svd
  >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
  >>> spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["dense"], init_weights=False)
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> tree = svd.to_svd(spec, params, adapters, form="product")
  >>> sorted(tree["dense"]["kernel"]), tree["dense"]["kernel"]["sigma"].shape
  (['U', 'V', 'sigma'], (2,))
  >>> back = svd.from_svd(spec, params, tree)
  >>> a, b = lorajax.merge(spec, params, back), lorajax.merge(spec, params, adapters)
  >>> bool(jnp.allclose(a["dense"]["kernel"], b["dense"]["kernel"], atol=1e-6))
  True
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import registry
from lorajax.adapters import resolve
from lorajax.plan import adapter_paths, nest
from lorajax.spec import Spec
from lorajax.variants import lora

__all__ = ["FORMS", "SIGMA_KEYS", "to_svd", "from_svd", "as_svd", "form_of", "sigma_leaves", "scales"]

FORMS = ("product", "factor")
_KEYS = {
    "product": frozenset({"U", "sigma", "V"}),
    "factor": frozenset({"U_A", "sigma_A", "V_A", "U_B", "sigma_B", "V_B"}),
}
#: the searched entries of each form, in genome order
SIGMA_KEYS = {"product": ("sigma",), "factor": ("sigma_A", "sigma_B")}
_LORA_KEYS = frozenset({"lora_A", "lora_B"})


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} (UNVERIFIED which one ESSA uses), got {form!r}")


def _check_spec(spec: Spec) -> None:
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a lorajax.Spec, got {type(spec).__name__}")
    registry.plain_lora(
        spec.variant,
        "ESSA's SVD form (base-shifting inits such as PiSSA, OLoRA, LoRA-GA export "
        "to plain LoRA with lorajax.inits.to_plain_lora)",
    )


def _fix_signs(u: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flip singular-vector pairs so that each column of ``u`` has its largest-|·| entry positive."""
    idx = jnp.argmax(jnp.abs(u), axis=0)
    sign = jnp.sign(u[idx, jnp.arange(u.shape[1])])
    sign = jnp.where(sign == 0, 1.0, sign).astype(u.dtype)
    return u * sign[None, :], v * sign[None, :]


def _svd(m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``m = U diag(σ) Vᵀ`` with ``V`` returned as ``[n, k]`` and fixed signs."""
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    u, v = _fix_signs(u, vt.T)
    return u, s, v


def _product(a: jax.Array, b: jax.Array, s: float) -> dict:
    qa, ra = jnp.linalg.qr(a)  # a: [in, r] -> [in, r], [r, r]
    qb, rb = jnp.linalg.qr(b.T)  # bᵀ: [out, r] -> [out, r], [r, r]
    u_c, sigma, v_c = _svd(s * (ra @ rb.T))
    u, v = _fix_signs(qa @ u_c, qb @ v_c)
    return {"U": u, "sigma": sigma, "V": v}


def _factor(a: jax.Array, b: jax.Array) -> dict:
    ua, sa, va = _svd(a)  # [in, r], [r], [r, r]
    ub, sb, vb = _svd(b)  # [r, r], [r], [out, r]
    return {"U_A": ua, "sigma_A": sa, "V_A": va, "U_B": ub, "sigma_B": sb, "V_B": vb}


def form_of(tree: Any) -> str | None:
    """``"product"`` / ``"factor"`` for an SVD tree, ``"lora"`` for LoRA adapters, None otherwise."""
    try:
        leaves = adapter_paths(tree)
    except (TypeError, ValueError):
        return None
    kinds = set()
    for entry in leaves.values():
        keys = frozenset(entry)
        kinds.add(next((f for f, k in _KEYS.items() if keys == k), "lora" if keys == _LORA_KEYS else None))
    return kinds.pop() if len(kinds) == 1 else None


def scales(spec: Spec, params: Any) -> dict[tuple, float]:
    """``{target keys: s}`` with LoRA's ``s = α/r`` (or ``α/√r`` with rsLoRA) per adapted weight."""
    from lorajax import targets

    _check_spec(spec)
    return {t.keys: lora.scaling(t) for t in targets.select(spec, params)}


def _index(spec: Spec, params: Any, tree: Any) -> tuple[list, dict]:
    selected, index, _ = resolve(spec, params, tree)
    return selected, index


def to_svd(spec: Spec, params: Any, adapters: Any, form: str = "product") -> dict:
    """LoRA adapters -> SVD tree (see the module docstring for both forms).

    Args:
      spec: the `lorajax.Spec` of the adapters (variant ``"lora"``).
      params: the base params the adapters were made for (only shapes and
        names are read).
      adapters: ``{"lora_A", "lora_B"}`` per target, as from `lorajax.init`.
      form: ``"product"`` or ``"factor"``.

    Raises:
      ValueError: another variant, entries other than ``lora_A``/``lora_B``,
        shapes that do not fit, or non-finite factors.
    Warns when every singular value of a target is zero (e.g. a fresh LoRA with
    ``B = 0``): ESSA then searches σ along arbitrary fixed directions; the paper
    starts from a supervised fine-tune.
    """
    _check_form(form)
    _check_spec(spec)
    kind = form_of(adapters)
    if kind in FORMS:
        raise ValueError(f"adapters are already in SVD form ({kind!r}); use as_svd to accept either")
    selected, index = _index(spec, params, adapters)
    flat = {}
    zero = []
    for t in selected:
        entry = index[t.keys]
        if frozenset(entry) != _LORA_KEYS:
            raise ValueError(f"adapter at {'/'.join(t.keys)} has entries {sorted(entry)}; expected lora_A and lora_B")
        a = jnp.asarray(entry["lora_A"], jnp.promote_types(entry["lora_A"].dtype, jnp.float32))
        b = jnp.asarray(entry["lora_B"], a.dtype)
        d_in, d_out = t.matrix_shape
        if a.shape != (d_in, t.rank) or b.shape != (t.rank, d_out):
            raise ValueError(
                f"adapter at {'/'.join(t.keys)}: lora_A {a.shape} / lora_B {b.shape} do not fit "
                f"weight {t.matrix_shape} at rank {t.rank} "
                f"(expected {(d_in, t.rank)} / {(t.rank, d_out)})"
            )
        if not (np.all(np.isfinite(np.asarray(a))) and np.all(np.isfinite(np.asarray(b)))):
            raise ValueError(f"adapter at {'/'.join(t.keys)} has non-finite entries")
        out = _product(a, b, lora.scaling(t)) if form == "product" else _factor(a, b)
        if all(float(jnp.max(out[k])) == 0.0 for k in SIGMA_KEYS[form]):
            zero.append(t.name)
        flat[t.keys] = out
    if zero:
        warnings.warn(
            f"all singular values are zero for {zero[:3]}{'...' if len(zero) > 3 else ''} "
            "(a fresh LoRA has B = 0): searching σ then moves along arbitrary fixed directions; "
            "ESSA starts from a supervised fine-tune",
            stacklevel=2,
        )
    return nest(flat)


def _lora_from(entry: dict, form: str, s: float) -> dict:
    if form == "product":
        return {"lora_A": entry["U"] * (entry["sigma"] / s)[None, :], "lora_B": entry["V"].T}
    a = (entry["U_A"] * entry["sigma_A"][None, :]) @ entry["V_A"].T
    b = (entry["U_B"] * entry["sigma_B"][None, :]) @ entry["V_B"].T
    return {"lora_A": a, "lora_B": b}


def from_svd(spec: Spec, params: Any, tree: Any, *, scale: dict | None = None) -> dict:
    """SVD tree -> LoRA adapters ``{"lora_A", "lora_B"}`` (jit/vmap-safe; σ may be any real number).

    ``scale``: precomputed `scales` (avoids re-reading ``params``; then
    ``params`` may be None).
    """
    form = form_of(tree)
    if form not in FORMS:
        raise ValueError(
            "tree is not an SVD tree: each target must hold {'U','sigma','V'} (product) or "
            "{'U_A','sigma_A','V_A','U_B','sigma_B','V_B'} (factor)"
        )
    if scale is None:
        scale = scales(spec, params)
        _index(spec, params, tree)  # shape/name check
    out = {}
    for keys, entry in adapter_paths(tree).items():
        s = scale.get(keys)
        if s is None:
            s = scale.get(keys[1:] if keys[:1] == ("params",) else ("params",) + keys)
        if s is None:
            raise ValueError(f"SVD entry at {'/'.join(keys)} matches no adapted weight of the spec")
        out[keys] = _lora_from(entry, form, s)
    return nest(out)


def _check_svd(spec: Spec, params: Any, tree: Any, form: str) -> None:
    selected, index = _index(spec, params, tree)
    for t in selected:
        e = index[t.keys]
        (d_in, d_out), r = t.matrix_shape, t.rank
        want = (
            {"U": (d_in, r), "sigma": (r,), "V": (d_out, r)}
            if form == "product"
            else {"U_A": (d_in, r), "sigma_A": (r,), "V_A": (r, r), "U_B": (r, r), "sigma_B": (r,), "V_B": (d_out, r)}
        )
        for k, shape in want.items():
            if tuple(e[k].shape) != shape:
                raise ValueError(f"SVD entry {'/'.join(t.keys)}/{k} has shape {tuple(e[k].shape)}, expected {shape}")


def as_svd(spec: Spec, params: Any, tree: Any, form: str = "product") -> dict:
    """An SVD tree of ``form`` from LoRA adapters (converted with `to_svd`) or an SVD tree (checked).

    Raises ValueError for anything else, or for an SVD tree of the other form.
    """
    _check_form(form)
    _check_spec(spec)
    kind = form_of(tree)
    if kind == "lora":
        return to_svd(spec, params, tree, form)
    if kind == form:
        _check_svd(spec, params, tree, form)
        return tree
    if kind in FORMS:
        raise ValueError(
            f"adapters are in SVD form {kind!r}, ESSA was asked for {form!r}; convert back with from_svd first"
        )
    raise ValueError(
        "expected LoRA adapters ({'lora_A','lora_B'} per target, from lorajax.init) or an SVD tree "
        "from lorajax.es.svd.to_svd; got a tree with other entries"
    )


def sigma_leaves(tree: Any) -> list[tuple[tuple, str]]:
    """``[(target keys, sigma key)]`` in genome order: targets sorted by path, then ``SIGMA_KEYS``.

    Sorted, not insertion order: ``jax.tree`` operations and checkpoint restores
    rebuild dicts with sorted keys, and the genome layout must not change.
    """
    form = form_of(tree)
    if form not in FORMS:
        raise ValueError("not an SVD tree")
    return [(keys, k) for keys in sorted(adapter_paths(tree)) for k in SIGMA_KEYS[form]]
