"""SHiRA: sparse high-rank adapter — train a fixed sparse set of entries of the weight.

Maths (Flax orientation, kernel ``W: [in, out]``, ``y = x W``)::

    idx = shira_indices: [2, K] int32   (frozen; row 0 = input index i, row 1 = output index o)
    v   = shira_weight:  [K]            (trainable)
    S   = scatter(zeros[in, out], idx, v)      S[i_k, o_k] = v_k
    W'  = W + c · S,     y = x W + c · (x S)
    K   = r · (in + out)  (LoRA's budget; an error if K > in · out)

``c = scale`` (default 1.0; PEFT's ``set_scale``, the paper's ``W + αS`` at
inference). No α/r scaling. ``v = 0`` at init (``init_weights=True``), so the
model is unchanged; ``init_weights=False`` draws ``v ~ N(0, 1)`` (tests only).

Index order: entries are sorted by ``(o, i)``, i.e. row-major over PEFT's
``[out, in]`` weight, which is the order of PEFT's ``shira_indices`` (from
``torch.where(mask)``). PEFT's ``shira_indices: [2, K]`` (row 0 = output index)
is ``shira_indices[::-1]`` here and ``shira_weight`` is the same vector, so
importing a PEFT adapter swaps the two index rows and permutes nothing.

Masks (``mask_type``):

* ``"random"`` (default, PEFT's only built-in mask): ``K`` distinct positions
  drawn uniformly. With ``random_seed=None`` each target draws from its own
  per-target key (``lorajax.init``'s key); with an int, every target draws from
  ``jax.random.key(random_seed)``, as PEFT re-seeds one generator per layer
  (same-shaped layers then share a mask). JAX's RNG is not torch's: to
  reproduce a PEFT adapter, import its ``shira_indices``.
* ``"wm"``: the ``K`` entries of largest ``|W|`` in each adapted layer, the
  paper's SHiRA-WM (§3.1 item 3: "top-K parameters ... based on their weight
  magnitudes ... for each layer"; App. B.3: top-K weight magnitudes at each
  layer where SHiRA is employed, K chosen so the trainable count is comparable
  to LoRA's, which ``K = r · (in + out)`` does). Ties are not specified by the
  paper; here the lower flat index of ``[out, in]`` wins. The paper's
  data-dependent masks need gradients and are not built by ``init``:
  SHiRA-Grad = top-K of gradient magnitudes collected on a small calibration
  set (§3.1 item 4, App. B.4), SHiRA-SNIP = top-K of ``|W ⊙ ∂L/∂W|`` (§3.1
  item 5, App. B.5 eq. 2); `topk_indices` turns any such ``[in, out]`` score
  into indices in this layout. The paper text was read from a Markdown
  conversion of the arXiv v2 PDF (see ``docs/unverified.md``).

Forward: PEFT adds the dense ``S`` to ``W`` and runs one matmul, so its backward
forms the full ``[in, out]`` weight gradient and gathers ``K`` entries of it
(that is lorajax's merged mode, which also keeps each ``W'`` for the backward
pass). The factored mode (`fused_matmul`, a custom VJP) runs the same single
product ``x (W + c · S)`` with ``S`` scattered from ``v``, keeps only ``x``,
``W``, ``v``, ``idx`` for the backward pass and forms ``∂x = g (W + c · S)ᵀ``
(one matmul, skipped where ``x`` needs no gradient); ``∂W = xᵀ g`` only if the
base itself is differentiated. It equals the two-product formula
``x W + c · (x S)`` (`apply_reference`, also used when ``x``, ``W`` and ``v``
differ in dtype, e.g. a bf16 base) up to float rounding. ``backward`` picks the
``v``-gradient ``∂v_k = c · Σ_t x[t, i_k] · g[t, o_k]``:

* ``"sampled"`` (default): gathered in token chunks (`CHUNK_ELEMENTS`); no
  weight-sized array is ever formed in the frozen-base step (what
  ``tests/test_conformance.py`` checks for every variant). It gathers ``2·T·K``
  elements; on XLA-CPU a gathered element costs ~10 ns against ~0.02 ns per
  matmul FLOP, so this gather dominates the step (tiny Llama, T = 512, r = 16,
  2 busy cores: ~7x a LoRA step; ``experiments/results/variants.md``).
* ``"dense"``: ``c · (xᵀ g)[i_k, o_k]``: one transient ``[in, out]`` product per
  layer, as PEFT (``2·T·in·out`` FLOPs, i.e. ``in·out / K`` times the sampled
  product's, but at matmul speed); ~1.3x a LoRA step on the same benchmark.

`sparse_matmul` is the unfused ``x S`` with the same two backward choices, and
`sparse_matmul_reference` (gather + segment sum) the plain-jnp reference both
are tested against, forward and backward.

Trainable per target: ``K = r · (in + out)``; frozen: ``2K`` int32 indices.
Flat indices must fit int32 (``in · out < 2³¹``).

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((10, 6))}}
  >>> spec = lorajax.Spec("shira", rank=2, targets=["dense"])
  >>> ad = lorajax.init(spec, params, jax.random.key(0))["dense"]["kernel"]
  >>> ad["shira_weight"].shape, ad["shira_indices"].shape, ad["shira_indices"].dtype
  ((32,), (2, 32), dtype('int32'))
  >>> lorajax.registry.get("shira").is_buffer("shira_indices")
  True

References:
  Bhardwaj et al., "Sparse High Rank Adapters", NeurIPS 2024, arXiv:2406.13175
  (official code is PEFT's implementation, contributed by the authors).
  PEFT: ``src/peft/tuners/shira/layer.py`` (``Linear.get_delta_weight``,
  ``forward``), ``shira/mask_functions.py`` (``random_mask``),
  ``shira/config.py`` and ``shira/model.py`` (saving ``shira_indices``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from lorajax.variants import options
from lorajax.variants.base import EVAL, Context, PeftFormat, Target, Variant
from lorajax.variants.options import checks, option

MASK_TYPES = ("random", "wm")
#: Elements of one ``[tokens, K]`` chunk in the backward pass (64 MiB in float32).
CHUNK_ELEMENTS = 1 << 24
BACKWARDS = ("sampled", "dense")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: ``"random"`` (K distinct uniform positions, PEFT's mask) or ``"wm"`` (the K largest ``|W|``)
    mask_type: str = option("random", checks.one_of(*MASK_TYPES))
    #: None: each target draws its random mask from its own init key; an int: every target from this seed
    random_seed: int | None = option(None, checks.optional(checks.integer))
    #: True: ``v = 0`` (identity at init); False: ``v ~ N(0, 1)`` (tests)
    init_weights: bool = option(True, checks.boolean)
    #: ``c`` in ``W' = W + c · S`` (PEFT's ``set_scale``)
    scale: float = option(1.0, checks.finite)
    #: the factored mode's ``v``-gradient: ``"sampled"`` (chunked gathers, no weight-sized array) or
    #: ``"dense"`` (``(xᵀ g)[idx]``, one ``[in, out]`` product; much faster on XLA-CPU)
    backward: str = option("sampled", checks.one_of(*BACKWARDS))
    #: adapter dtype; None: float32, or the weight's dtype if wider
    dtype: str | None = option(None, checks.dtype)


def num_entries(d_in: int, d_out: int, r: int) -> int:
    """``K = r · (in + out)``."""
    return r * (d_in + d_out)


def _flat_to_indices(flat: jax.Array, d_in: int) -> jax.Array:
    """Flat positions over ``[out, in]`` (sorted) -> ``[2, K]`` = (input index, output index)."""
    flat = jnp.sort(flat)
    return jnp.stack([flat % d_in, flat // d_in]).astype(jnp.int32)


def topk_indices(scores: jax.Array, k: int) -> jax.Array:
    """``[2, k]`` indices of the ``k`` largest ``scores: [in, out]`` (ties: lower ``o·in + i`` first)."""
    d_in, d_out = scores.shape
    _, flat = jax.lax.top_k(scores.T.reshape(-1), k)  # flat over [out, in]
    return _flat_to_indices(flat, d_in)


def random_indices(key: jax.Array, d_in: int, d_out: int, k: int) -> jax.Array:
    """``[2, k]`` indices of ``k`` distinct uniformly drawn positions."""
    flat = jax.random.permutation(key, d_in * d_out)[:k]
    return _flat_to_indices(flat, d_in)


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"shira_weight": [K], "shira_indices": [2, K] int32}`` for ``w: [in, out]``."""
    d_in, d_out = w.shape
    k = num_entries(d_in, d_out, t.rank)
    if k > d_in * d_out:
        raise ValueError(
            f"SHiRA target {t.name!r} (weight [in={d_in}, out={d_out}]): rank {t.rank} gives "
            f"r·(in+out) = {k} entries, more than the {d_in * d_out} entries of the weight; lower the rank"
        )
    if d_in * d_out >= 2**31:
        raise ValueError(f"SHiRA target {t.name!r}: in·out = {d_in * d_out} does not fit int32 indices")
    opts = t.options
    key_mask, key_val = jax.random.split(key)
    if opts.mask_type == "wm":
        idx = topk_indices(jnp.abs(w.astype(jnp.float32)), k)
    else:
        if opts.random_seed is not None:
            key_mask = jax.random.key(opts.random_seed)
        idx = random_indices(key_mask, d_in, d_out, k)
    dtype = jnp.dtype(opts.dtype or jnp.promote_types(w.dtype, jnp.float32))
    if opts.init_weights:
        values = jnp.zeros((k,), dtype)
    else:
        values = jax.random.normal(key_val, (k,), dtype)
    return {"shira_weight": values, "shira_indices": idx}


def _check(shape: tuple, adapter: dict) -> tuple[jax.Array, jax.Array]:
    v, idx = adapter["shira_weight"], adapter["shira_indices"]
    if idx.ndim != 2 or idx.shape[0] != 2 or v.shape != (idx.shape[1],):
        raise ValueError(f"shira_weight {v.shape} and shira_indices {idx.shape} do not pair up (want [K], [2, K])")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"shira_indices must be integers, got {idx.dtype}")
    return v, idx


def densify(values: jax.Array, idx: jax.Array, shape: tuple) -> jax.Array:
    """``S: [in, out]`` with ``S[i_k, o_k] = v_k``."""
    return jnp.zeros(shape, values.dtype).at[idx[0], idx[1]].add(values)


def delta(w: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``c · S: [in, out]``."""
    v, idx = _check(w.shape, adapter)
    return t.options.scale * densify(v, idx, w.shape)


def adapted(w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``W + c · S`` in ``w``'s dtype."""
    d = delta(w, adapter, t)
    return (w.astype(d.dtype) + d).astype(w.dtype)


def unadapted(w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``W' − c · S``."""
    d = delta(w, adapter, t)
    return (w.astype(d.dtype) - d).astype(w.dtype)


def sparse_matmul_reference(x: jax.Array, values: jax.Array, idx: jax.Array, d_out: int) -> jax.Array:
    """``x S: [T, out]`` by gather and segment sum (plain jnp; ``[T, K]`` intermediates)."""
    contrib = x[:, idx[0]] * values[None, :]  # [T, K]
    return jax.ops.segment_sum(contrib.T, idx[1], num_segments=d_out).T


def _sampled_product(x: jax.Array, g: jax.Array, idx: jax.Array) -> jax.Array:
    """``Σ_t x[t, i_k] g[t, o_k]: [K]``, in token chunks of at most `CHUNK_ELEMENTS` / K tokens."""
    n_tok, k = x.shape[0], idx.shape[1]
    chunk = max(1, min(n_tok, CHUNK_ELEMENTS // max(k, 1)))
    n = -(-n_tok // chunk)
    pad = n * chunk - n_tok
    if pad:  # zero tokens add nothing
        x = jnp.pad(x, ((0, pad), (0, 0)))
        g = jnp.pad(g, ((0, pad), (0, 0)))
    xs = x.reshape(n, chunk, x.shape[1])
    gs = g.reshape(n, chunk, g.shape[1])

    def body(acc, xg):
        xc, gc = xg
        return acc + jnp.sum(xc[:, idx[0]] * gc[:, idx[1]], axis=0), None

    acc, _ = jax.lax.scan(body, jnp.zeros((k,), jnp.promote_types(x.dtype, g.dtype)), (xs, gs))
    return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def sparse_matmul(x: jax.Array, values: jax.Array, idx: jax.Array, d_out: int, backward: str = "sampled") -> jax.Array:
    """``x S: [T, out]`` for ``x: [T, in]``; only ``x``, ``values``, ``idx`` are kept for the backward pass.

    ``backward="sampled"``: ``∂values`` by the chunked sampled product (no
    weight-sized array); ``"dense"``: ``(xᵀ g)[i_k, o_k]`` (one transient
    ``[in, out]`` product, fast on matmul hardware).
    """
    return x @ densify(values, idx, (x.shape[1], d_out))


def _sparse_matmul_fwd(x, values, idx, d_out, backward):
    return sparse_matmul(x, values, idx, d_out, backward), (x, values, idx)


def _sparse_matmul_bwd(d_out, backward, res, g):
    x, values, idx = res
    gx = g @ densify(values, idx, (x.shape[1], d_out)).T
    if backward == "dense":  # the [in, out] product x^T g, then K entries of it
        gv = (x.T @ g)[idx[0], idx[1]]
    else:
        gv = _sampled_product(x, g, idx)
    gv = gv.astype(values.dtype)
    return gx.astype(x.dtype), gv, None


sparse_matmul.defvjp(_sparse_matmul_fwd, _sparse_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fused_matmul(
    x: jax.Array, w: jax.Array, values: jax.Array, idx: jax.Array, scale: float, backward: str = "sampled"
) -> jax.Array:
    """``x (W + c · S): [T, out]``, one matmul; only ``x``, ``W``, ``values``, ``idx`` are kept for backward.

    Backward: ``∂x = g (W + c · S)ᵀ`` (one matmul; skipped when ``x`` is not
    differentiated), ``∂values = c · Σ_t x[t, i_k] g[t, o_k]`` as in
    `sparse_matmul` (``backward``), and ``∂W = xᵀ g`` only when ``W`` itself is
    differentiated (never in the factored mode's frozen-base step). Equal to
    ``x W + c · (x S)`` up to float rounding (`apply_reference`).
    """
    return x @ (w + scale * densify(values, idx, w.shape))


def _fused_fwd(x, w, values, idx, scale, backward):
    # symbolic zeros: which inputs are differentiated is known here, so the bwd skips the rest
    flags = tuple(() if a.perturbed else None for a in (x, w, values))
    x, w, values, idx = x.value, w.value, values.value, idx.value
    return fused_matmul(x, w, values, idx, scale, backward), (x, w, values, idx, flags)


def _fused_bwd(scale, backward, res, g):
    x, w, values, idx, (dx, dw, dv) = res
    gx = gw = gv = None
    if isinstance(g, jax.custom_derivatives.SymbolicZero):  # the output does not reach the loss
        return gx, gw, gv, None
    if dx == ():
        gx = g @ (w + scale * densify(values, idx, w.shape)).T
    full = x.T @ g if dw == () or (dv == () and backward == "dense") else None  # the [in, out] product
    if dw == () and full is not None:
        gw = full.astype(w.dtype)
    if dv == ():
        gv = full[idx[0], idx[1]] if full is not None else _sampled_product(x, g, idx)
        gv = (scale * gv).astype(values.dtype)
    return gx, gw, gv, None


fused_matmul.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def apply_reference(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + c · (x S)`` as two products (the formula `apply` is tested against)."""
    v, idx = _check(w.shape, adapter)
    y = x @ w
    h = sparse_matmul(x.astype(v.dtype), v, idx, w.shape[1], t.options.backward)
    return y + (t.options.scale * h).astype(y.dtype)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + c · (x S)`` for ``x: [T, in]``: `fused_matmul` when ``x``, ``W`` and ``v`` share a dtype.

    Otherwise (e.g. a bf16 base under an f32 adapter) `apply_reference`, which
    keeps the base product in the weight's dtype.
    """
    v, idx = _check(w.shape, adapter)
    if not x.dtype == w.dtype == v.dtype:
        return apply_reference(x, w, adapter, t, ctx)
    return fused_matmul(x, w, v, idx, float(t.options.scale), t.options.backward)


def trainable_count(targets: list[Target]) -> int:
    """``Σ K = Σ r · (in + out)`` (the indices are buffers)."""
    return sum(num_entries(*t.matrix_shape, t.rank) for t in targets)


# ----------------------------------------------------------------------------- PEFT format (ShiraConfig)


def peft_from_config(config: dict, common: dict, options: dict | None = None) -> Any:
    from lorajax.spec import Spec

    return Spec("shira", **common, mask_type=config.get("mask_type", "random"))


def peft_to_config(spec: Any, targets: list[Target]) -> dict:
    if spec.options.scale != 1.0:
        raise ValueError("PEFT's SHiRA format has no scale: save with scale=1.0")
    return {"peft_type": "SHIRA", "mask_type": "random", "random_seed": None}


VARIANT = Variant(
    name="shira",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    options=Options,
    buffers=("shira_indices",),
    peft=PeftFormat(
        ("SHIRA",),
        fields=frozenset({"mask_type"}),
        # PEFT's [2, K] indices are (out, in): the rows swapped
        tensors=(("shira_weight", "shira_weight", None), ("shira_indices", "shira_indices", "swap")),
        from_config=peft_from_config,
        to_config=peft_to_config,
    ),
    trainable_count=trainable_count,
    doc=__doc__,
)
