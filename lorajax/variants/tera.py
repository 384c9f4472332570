"""TeRA: a tensorised update in Tucker form with frozen shared random factors and trained diagonals.

What the paper's abstract fixes (no code or paper body could be read here):
the weight update is **tensorised** and written as a **Tucker-like tensor
network**; **large random factors are frozen and shared across layers**; only
**small per-layer scaling vectors, the diagonals of diagonal factor
matrices, are trained**, so the update's rank is decoupled from the trainable
count. Everything below beyond that is lorajax's design (**UNVERIFIED**
against the paper): the tensorisation, where the diagonals sit, the init that
makes ``ΔW = 0``, the random distributions and the absence of a scaling.

Maths (Flax orientation, kernel ``K: [in, out]``). Factor ``in = Π_k i_k`` and
``out = Π_k o_k`` (``k = 1..N``) and view ``ΔK`` as an order-``N`` tensor
whose mode ``k`` pairs ``i_k`` with ``o_k`` (size ``I_k = i_k·o_k``)::

    ΔK[(i_1..i_N), (o_1..o_N)] = Σ_{r_1..r_N} G[r_1..r_N] Π_k F_k[i_k, o_k, r_k] λ_k[r_k]
    i.e.  ΔT = G ×_1 (F_1 diag(λ_1)) ×_2 … ×_N (F_N diag(λ_N)),   K' = K + ΔK

``(i_1..i_N)`` and ``(o_1..o_N)`` are row-major (C-order) multi-indices of the
kernel's input and output axes, i.e. ``ΔK = ΔT`` reshaped from
``[i_1, o_1, …, i_N, o_N]``, transposed to ``[i_1..i_N, o_1..o_N]`` and reshaped to
``[in, out]``.

* ``G = tera_core: [R]*N`` ~ N(0, 1/in) and ``F_k = tera_factor_k: [i_k, o_k, R]``
  ~ N(0, 1/R): frozen, random, **shared** by all targets with the same
  tensorisation and rank (``adapters["_shared"]["tera_bases"][key]``, ``key`` e.g.
  ``"i3x2x2_o5x2x2_r4"``), drawn from ``fold_in(key(projection_prng_key),
  crc32(key))`` (not from the init key), as VeRA's projections. With every
  ``λ_k = 1`` each entry of ``ΔK`` has variance ``1/in`` (a LeCun-normal layer).
* ``λ_k = tera_lambda_k: [R]`` trainable per target: ``λ_1..λ_{N-1} =
  lambda_init`` (default 1.0) and ``λ_N = 0`` at init, so ``ΔK = 0`` (VeRA's
  ``b = 0`` choice; at the first step only ``λ_N`` gets a gradient).
* ``R = rank`` for every mode (``rank_pattern`` per target); ``R`` may exceed
  ``I_k`` and ``min(in, out)``: the rank of ``ΔK`` is not bounded by the
  trainable count ``N·R`` (up to ``min(in, out)``; tested).
* No ``α`` scaling (``alpha`` is ignored, as VeRA).

Tensorisation (``factors``): ``None`` (default) splits ``in`` and ``out`` each
into ``n_modes`` (default 3) near-equal factors (prime factors, largest
first, each to the currently smallest factor; sorted in decreasing order, so
a prime dimension gets ``(p, 1, 1)``); a pair ``((i_1..i_N), (o_1..o_N))``
for every target; or ``{regex: pair}`` per module name (PEFT's
``rank_pattern`` rule; two keys matching one module with different pairs is
an error; unmatched modules use the automatic split). Factors that do not
multiply to a target's ``in`` / ``out`` raise, naming the module.

Factored forward (``x: [T, in]``, never forms ``ΔK``): contract ``x`` with
``F_1 diag(λ_1)`` over ``i_1``, then with ``G ×_N F_N diag(λ_N)`` over ``r_1``
and ``i_N``, then with ``F_k diag(λ_k)`` over ``(i_k, r_k)`` for ``k = 2..N-1``.
Its intermediates hold about ``T · R · o_1 · in / i_1`` numbers (``N ≤ 3``;
``R^{N-2}`` times more beyond), far more than LoRA's ``T · r``: a high-rank
update has no cheap factored form. The merged mode forms ``ΔK`` (and, in
training, its ``[in, out]`` gradient) instead; pick by ``T`` versus ``in · out``.
``compute="dense"`` does that inside the factored mode (`fused_matmul`): ``ΔK``
from `contract` (``≈ 2·R·in·out`` FLOPs), one product ``x (K + ΔK)``, ``∂x = g (K +
ΔK)ᵀ`` and ``∂ΔK = xᵀ g`` (one ``[in, out]`` product, which the default path
never forms), ``∂λ`` through `contract`'s VJP; ``ΔK`` is not kept for the backward
pass. Equal to `apply_reference` (the factored formula) up to float rounding. On
the tiny-Llama CPU benchmark (T = 512, R = 16, ``in = 512 = 8·8·8``) the default
costs ~11x a LoRA step, the dense one ~1.3x (``experiments/results/variants.md``).

Trainable per target: ``N · R``. Frozen, once per (tensorisation, R):
``R^N + R · Σ_k i_k o_k``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"q": {"kernel": jnp.ones((12, 20))}, "v": {"kernel": jnp.ones((12, 20))}}
  >>> spec = lorajax.Spec("tera", rank=4, targets=["q", "v"])
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> sorted(adapters["_shared"]["tera_bases"])   # q and v share one set of random factors
  ['i3x2x2_o5x2x2_r4']
  >>> base = adapters["_shared"]["tera_bases"]["i3x2x2_o5x2x2_r4"]
  >>> base["tera_core"].shape, base["tera_factor_0"].shape
  ((4, 4, 4), (3, 5, 4))
  >>> lorajax.count_params(spec, params, adapters)["trainable"]   # 2 targets · N · R
  24

References:
  Gu, Zhou, Iacovides, Mandic, "TeRA: Vector-based Random Tensor Network for
  High-Rank Adaptation of Large Language Models", ACL 2026 (long 106),
  arXiv:2509.03234 (abstract only was readable). Official code announced at
  github.com/guyuxuan9/TeRA (not obtainable here). Not in PEFT. Sources
  tried: ``docs/unverified.md``. Related
  design: VeRA (``lorajax/variants/vera.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lorajax.variants import options
from lorajax.variants.base import EVAL, Context, Target, Variant, additive
from lorajax.variants.options import checks, option

COMPUTES = ("factored", "dense")
#: Largest number of tensor modes (einsum letters are provided up to it).
MAX_MODES = 8
_R, _I, _O = "abcdefgh", "ijklmnpq", "stuvwxyz"  # einsum letters for r_k, i_k, o_k; "T" for tokens


# ----------------------------------------------------------------------------
# Tensorisation plan
# ----------------------------------------------------------------------------


def split(n: int, n_modes: int) -> tuple[int, ...]:
    """``n`` as ``n_modes`` near-equal factors in decreasing order (greedy over prime factors)."""
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    parts = [1] * n_modes
    for q in sorted(primes, reverse=True):
        j = min(range(n_modes), key=lambda k: parts[k])
        parts[j] *= q
    return tuple(sorted(parts, reverse=True))


def _is_pair(value) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (list, tuple)) for v in value)
        and all(isinstance(e, int) and not isinstance(e, bool) for v in value for e in v)
    )


def _factor_table(factors) -> list[tuple[str | None, tuple]] | None:
    """``None`` | ``[(None, pair)]`` | ``[(regex, pair), ...]`` from the option (also its frozen form)."""
    if factors is None:
        return None
    if isinstance(factors, Mapping):
        return [(str(k), v) for k, v in factors.items()]
    if _is_pair(factors):
        return [(None, factors)]
    if isinstance(factors, (list, tuple)) and all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str) for e in factors
    ):
        return [(k, v) for k, v in factors]  # a dict frozen by Spec into ((key, value), ...)
    raise ValueError(
        "factors must be None, a pair ((i_1, ..., i_N), (o_1, ..., o_N)) of int tuples, or a "
        f"{{module-name regex: pair}} dict; got {factors!r}"
    )


def _check_pair(pair, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not _is_pair(pair):
        raise ValueError(f"{where}: expected a pair ((i_1, ..., i_N), (o_1, ..., o_N)) of int tuples, got {pair!r}")
    f_in, f_out = (tuple(int(e) for e in v) for v in pair)
    if len(f_in) != len(f_out) or not 1 <= len(f_in) <= MAX_MODES:
        raise ValueError(
            f"{where}: the in and out factors need the same length N in [1, {MAX_MODES}], "
            f"got {len(f_in)} and {len(f_out)}"
        )
    if min(f_in + f_out) < 1:
        raise ValueError(f"{where}: factors must be positive ints, got {pair!r}")
    return f_in, f_out


def _check_n_modes(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MODES:
        raise ValueError(f"{name} must be an int in [1, {MAX_MODES}], got {value!r}")


def _check_factors(name: str, value: Any) -> None:
    for k, pair in _factor_table(value) or ():
        where = name if k is None else f"{name}[{k!r}]"
        if k is not None:
            try:
                re.compile(k)
            except re.error as e:
                raise ValueError(f"{where}: key is not a valid regex: {e}") from None
        _check_pair(pair, where)


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: number of tensor modes ``N`` of the automatic tensorisation (``factors=None``)
    n_modes: int = option(3, _check_n_modes)
    #: None (split ``in`` and ``out`` into ``n_modes`` near-equal factors), a pair
    #: ``((i_1..i_N), (o_1..o_N))`` for every target, or ``{module-name regex: pair}``
    factors: Any = option(None, _check_factors)
    #: initial value of ``λ_1..λ_{N-1}`` (non-zero: 0 would leave every λ without a gradient); ``λ_N = 0``
    lambda_init: float = option(1.0, checks.nonzero)
    #: seed of the shared random core and factors (not the init key), as VeRA's projections
    projection_prng_key: int = option(0, checks.integer)
    #: adapter dtype; None: float32
    dtype: str | None = option(None, checks.dtype)
    #: the factored mode's compute: ``"factored"`` (pairwise contractions, no weight-sized array) or
    #: ``"dense"`` (form ``ΔK``, one matmul ``x (K + ΔK)``, ``λ``-gradients through ``xᵀ g: [in, out]``)
    compute: str = option("factored", checks.one_of(*COMPUTES))


def plan(t: Target) -> tuple[tuple[int, ...], tuple[int, ...], str]:
    """``(in factors, out factors, shared key)`` of a target; raises naming the module if they do not fit."""
    d_in, d_out = t.matrix_shape
    pair = None
    table = _factor_table(t.options.factors)
    if table is not None:
        hits = {tuple(map(tuple, v)) for k, v in table if k is None or re.match(rf"(.*\.)?({k})$", t.name)}
        if len(hits) > 1:
            raise ValueError(
                f"TeRA at {t.name!r}: several factors keys match with different tensorisations {sorted(hits)}"
            )
        pair = hits.pop() if hits else None
    if pair is None:
        n = t.options.n_modes
        f_in, f_out = split(d_in, n), split(d_out, n)
    else:
        f_in, f_out = _check_pair(pair, f"TeRA at {t.name!r}")
        for what, f, d in (("in", f_in, d_in), ("out", f_out, d_out)):
            if math.prod(f) != d:
                raise ValueError(
                    f"TeRA at {t.name!r}: {what} factors {f} multiply to {math.prod(f)}, but the weight "
                    f"(viewed as [in, out] = [{d_in}, {d_out}]) has {what} = {d}; the factors must multiply to it"
                )
    key = f"i{'x'.join(map(str, f_in))}_o{'x'.join(map(str, f_out))}_r{t.rank}"
    return f_in, f_out, key


# ----------------------------------------------------------------------------
# Init
# ----------------------------------------------------------------------------


def _dtype(t: Target):
    return jnp.dtype(t.options.dtype or jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def draw_base(seed: int, key: str, f_in: tuple, f_out: tuple, rank: int, dtype: str = "float32") -> dict:
    """``{"tera_core": [R]*N ~ N(0, 1/in), "tera_factor_k": [i_k, o_k, R] ~ N(0, 1/R)}``.

    One standard-normal draw from ``fold_in(key(seed), crc32(key))`` is cut into
    the core and the factors, in that order (row-major).
    """
    shapes = [(rank,) * len(f_in)] + [(i, o, rank) for i, o in zip(f_in, f_out)]
    sizes = [math.prod(s) for s in shapes]
    k = jax.random.fold_in(jax.random.key(seed), zlib.crc32(key.encode()) & 0x7FFFFFFF)
    flat = jax.random.normal(k, (sum(sizes),), jnp.dtype(dtype))
    parts, pos = [], 0
    for shape, size in zip(shapes, sizes):
        parts.append(flat[pos : pos + size].reshape(shape))
        pos += size
    out = {"tera_core": parts[0] / math.sqrt(math.prod(f_in))}
    for j, part in enumerate(parts[1:]):
        out[f"tera_factor_{j}"] = part / math.sqrt(rank)
    return out


def init_shared(key: jax.Array, targets: list[Target]) -> dict:
    """``{"tera_bases": {plan key: frozen core and factors}}``, one entry per (tensorisation, rank)."""
    del key  # from projection_prng_key, as VeRA
    bases = {}
    for t in targets:
        f_in, f_out, name = plan(t)
        if name not in bases:
            bases[name] = draw_base(t.options.projection_prng_key, name, f_in, f_out, t.rank, _dtype(t).name)
    return {"tera_bases": bases}


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"tera_lambda_k": [R]}``: ``lambda_init`` for ``k < N-1``, 0 for the last."""
    del key, w
    f_in, _, _ = plan(t)
    n = len(f_in)
    out = {f"tera_lambda_{k}": jnp.full((t.rank,), t.options.lambda_init, _dtype(t)) for k in range(n - 1)}
    out[f"tera_lambda_{n - 1}"] = jnp.zeros((t.rank,), _dtype(t))
    return out


# ----------------------------------------------------------------------------
# Update
# ----------------------------------------------------------------------------


def _operands(w: jax.Array, adapter: dict, t: Target):
    """``(in factors, out factors, core, [F_k diag(λ_k)])``, checked against the weight."""
    f_in, f_out, name = plan(t)
    if tuple(w.shape) != (math.prod(f_in), math.prod(f_out)):
        raise ValueError(f"TeRA at {t.name!r}: weight {w.shape} does not fit the tensorisation {f_in} x {f_out}")
    bases = adapter.get("tera_bases", {})
    if name not in bases:
        raise ValueError(
            f"TeRA at {t.name!r}: adapters['_shared']['tera_bases'] has no entry {name!r} "
            f"(it has {sorted(bases)[:5]}): the adapters were made for other shapes or options"
        )
    base, n = bases[name], len(f_in)
    scaled = []
    for k in range(n):
        lam = adapter[f"tera_lambda_{k}"]
        if lam.shape != (t.rank,):
            raise ValueError(f"TeRA at {t.name!r}: tera_lambda_{k} has shape {lam.shape}, expected ({t.rank},)")
        scaled.append(base[f"tera_factor_{k}"] * lam[None, None, :])
    return f_in, f_out, base["tera_core"], scaled


def contract(core: jax.Array, scaled: list[jax.Array]) -> jax.Array:
    """``G ×_1 H_1 … ×_N H_N`` as ``[i_1..i_N, o_1..o_N]`` for ``H_k: [i_k, o_k, R]``."""
    n = len(scaled)
    subs = ",".join([_R[:n]] + [_I[k] + _O[k] + _R[k] for k in range(n)])
    return jnp.einsum(f"{subs}->{_I[:n]}{_O[:n]}", core, *scaled)


def delta(w: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``ΔK: [in, out]`` (formed: merged mode)."""
    _, _, core, scaled = _operands(w, adapter, t)
    return contract(core, scaled).reshape(w.shape)


#: ``K + ΔK`` and its inverse, in the weight's dtype.
adapted, unadapted = additive(delta)


def factored_update(x: jax.Array, f_in, f_out, core: jax.Array, scaled: list[jax.Array]) -> jax.Array:
    """``x ΔK: [T, out]`` for ``x: [T, in]`` by pairwise contractions; ``ΔK`` is never formed."""
    n, tokens = len(f_in), x.shape[0]
    h = x.reshape(tokens, *f_in)
    if n == 1:
        h = jnp.einsum("Ti,isa->Tsa", h, scaled[0])
        return jnp.einsum("Tsa,a->Ts", h, core)
    i, o, r = _I[:n], _O[:n], _R[:n]
    # x ×_{i_1} H_1: [T, i_2..i_N, o_1, r_1]
    h = jnp.einsum(f"T{i},{i[0]}{o[0]}{r[0]}->T{i[1:]}{o[0]}{r[0]}", h, scaled[0])
    # G ×_N H_N: [r_1..r_{N-1}, i_N, o_N] (weights only), contracted over r_1 and i_N
    k_n = jnp.einsum(f"{r},{i[-1]}{o[-1]}{r[-1]}->{r[:-1]}{i[-1]}{o[-1]}", core, scaled[-1])
    cur = f"T{i[1:]}{o[0]}{r[0]}"
    nxt = f"T{i[1:-1]}{o[0]}{o[-1]}{r[1:-1]}"
    h = jnp.einsum(f"{cur},{r[:-1]}{i[-1]}{o[-1]}->{nxt}", h, k_n)
    for k in range(1, n - 1):  # the middle modes: contract (i_k, r_k) with H_k
        cur, nxt = nxt, nxt.replace(i[k], "").replace(r[k], "") + o[k]
        h = jnp.einsum(f"{cur},{i[k]}{o[k]}{r[k]}->{nxt}", h, scaled[k])
    y = jnp.einsum(f"{nxt}->T{o}", h)
    return y.reshape(tokens, math.prod(f_out))


@jax.custom_vjp
def fused_matmul(x: jax.Array, w: jax.Array, dk: jax.Array) -> jax.Array:
    """``x (K + ΔK): [T, out]``, one matmul; only ``x``, ``K``, ``ΔK`` are kept for the backward pass.

    Backward: ``∂x = g (K + ΔK)ᵀ`` (skipped when ``x`` is not differentiated) and
    ``∂ΔK = xᵀ g`` (one ``[in, out]`` product, also ``∂K`` when the base is
    differentiated); ``∂λ`` follows from ``∂ΔK`` through `contract`'s VJP.
    """
    return x @ (w + dk)


def _fused_fwd(x, w, dk):
    flags = tuple(() if a.perturbed else None for a in (x, w, dk))
    x, w, dk = x.value, w.value, dk.value
    return fused_matmul(x, w, dk), (x, w, dk, flags)


def _fused_bwd(res, g):
    x, w, dk, (dx, dw, ddk) = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):  # the output does not reach the loss
        return None, None, None
    gx = g @ (w + dk).T if dx == () else None
    full = x.T @ g if dw == () or ddk == () else None
    return gx, full if dw == () else None, full if ddk == () else None


fused_matmul.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def apply_reference(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x K + x ΔK`` with `factored_update` (the formula `apply` is tested against)."""
    f_in, f_out, core, scaled = _operands(w, adapter, t)
    y = x @ w
    return y + factored_update(x.astype(core.dtype), f_in, f_out, core, scaled).astype(y.dtype)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x K + x ΔK`` for ``x: [T, in]``.

    ``compute="factored"``: `apply_reference` (never forms ``ΔK``). ``"dense"``:
    `fused_matmul` on ``ΔK = contract(...)`` when ``x``, ``K`` and the adapter
    share a dtype (else `apply_reference`).
    """
    if t.options.compute == "dense":
        _, _, core, scaled = _operands(w, adapter, t)
        if x.dtype == w.dtype == core.dtype:
            return fused_matmul(x, w, contract(core, scaled).reshape(w.shape))
    return apply_reference(x, w, adapter, t, ctx)


def trainable_count(targets: list[Target]) -> int:
    """``Σ N · R`` (the shared core and factors are buffers)."""
    return sum(len(plan(t)[0]) * t.rank for t in targets)


VARIANT = Variant(
    name="tera",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    init_shared=init_shared,
    options=Options,
    buffers=("tera_core", r"tera_factor_\d+"),
    rank_limited=False,
    trainable_count=trainable_count,
    doc=__doc__,
)
