"""8-bit Adam: bitsandbytes' block-wise dynamically quantised optimiser state, as an optax transform.

`scale_by_adam_8bit` is Adam whose two moments are stored as one byte per
element plus one float32 scale per block, as bitsandbytes'
``Optimizer2State("adam", optim_bits=8)`` stores them (``bnb.optim.Adam8bit``;
the official ``galore_torch.GaLoreAdamW8bit`` runs it on the projected
gradient). It is params-free, so it is a GaLore base optimiser
(``lorajax.optim.galore(..., optim_bits=8)``).

Dynamic map (`dynamic_map`; bnb ``create_dynamic_map(signed, max_exponent_bits=7,
total_bits=8)``). 256 sorted float32 values in ``[-1, 1]``: for each decade
``i = 0..6``, ``n_i`` values ``10^(i−6) · (b_k + b_{k+1}) / 2`` where ``b`` is
``linspace(0.1, 1, n_i + 1)`` — ``n_i = 2^i`` and its negatives for the
signed map (first moment ``m``), ``n_i = 2^(i+1)`` for the unsigned one (second
moment ``v``) — plus ``0`` and ``1``. Every step of that formula is float32 as
torch computes it (``linspace``: ``step = 0.9/n_i`` rounded to float32; the
first half ``0.1 + k·step``, the second ``1 − (n_i − k)·step``, each rounded
once; the products with ``10^(i−6)`` in float32), so the maps equal
bitsandbytes' bit for bit (tested).

Block-wise quantisation (`quantize_blockwise` / `dequantize_blockwise`; bnb
``quantize_blockwise``): ``x`` is flattened and cut into blocks of ``B``
elements (the last may be shorter); per block ``a = max |x|`` (float32), and
each element gets the index of the map value nearest to ``x · (1/a)``
(clipped to ``[−1, 1]``; the boundaries are the float32 midpoints between
neighbouring map values; a value exactly on a midpoint takes the lower code),
stored as ``uint8``. An all-zero block stores ``a = 0`` and the index of the
map's 0. Dequantised: ``map[code] · a``. Non-finite inputs give non-finite
``a`` and meaningless codes (the optimiser never quantises them, see below).

Adam step (bnb's CPU kernel ``_optimizer_update_8bit_blockwise_cpu``, the same
equations as its CUDA kernel ``kOptimizerStatic8bit2StateBlockwise``), with
``t`` the 1-based step and ``g`` the gradient in float32:

* ``m = deq(m_codes)``, ``v = deq(v_codes)``;
* ``m ← β₁·m + (1−β₁)·g``, ``v ← β₂·v + (1−β₂)·g²``;
* ``u = (m / c₁) / (√v / c₂ + ε)`` with ``c₁ = 1 − β₁ᵗ``, ``c₂ = √(1 − β₂ᵗ)``:
  ε outside the bias-corrected square root, exactly as `optax.scale_by_adam`
  (bnb's CUDA form ``(c₂/c₁)·m / (√v + ε·c₂)`` is the same number);
* ``m``, ``v`` re-quantised with their maps (new block absmax).

The output ``u`` is the direction (positive, like `optax.scale_by_adam`): chain
a negative learning rate, e.g. ``optax.chain(scale_by_adam_8bit(),
optax.scale_by_learning_rate(lr))`` (that is `adam_8bit`, ``lr`` first as every
lorajax optimiser), or use it as GaLore's base. A leaf with
fewer than ``min_8bit_size`` elements keeps ``m``, ``v`` in float32 (bnb:
``p.numel() < min_8bit_size`` → 32-bit state), whatever the parameter dtype.

State: per 8-bit leaf ``2 × (size`` bytes of codes ``+ 4·⌈size/B⌉`` bytes of
absmax``)``, per 32-bit leaf ``2 × 4·size``, plus an int32 step count (and the
int32 ``skipped`` count with ``nonfinite="skip"``); `adam_8bit_state_bytes`
gives it without building anything. The two 256-entry maps are constants, not
state (bnb keeps one shared copy per optimiser).

Non-finite gradients (``nonfinite``):

* ``"skip"`` (default; lorajax's convention, `lorajax.optim.skip_nonfinite`): a
  step whose gradients (or updates) hold NaN/Inf anywhere gives zero updates
  and leaves every code, absmax and the step count as they were; the outer
  ``SkipNonFiniteState.skipped`` counts it.
* ``"reset"``: bnb's CUDA kernel, element by element — where ``g`` is not
  finite, that element's ``m`` and ``v`` become 0 and its update is 0; the
  other elements step normally. (bnb's CPU kernel has no check: NaN reaches
  the state and, through the absmax, the whole block.)

Differences from bitsandbytes that remain (all below one code step): bnb's
CPU C quantiser (``csrc/cpu_ops.cpp``, used by its CPU optimiser for float32)
looks codes up in a 65536-bin table over ``[−1, 1]`` instead of the exact
nearest code, which moves values with ``|x|/a ≲ 1e−3`` by up to one bin
(``≈ 3·10⁻⁵·a``); its CUDA kernel finds the nearest code by binary search
(``quantize_2D``) and moves a negative ``m`` that rounds to the code ``0`` one
code down so that it keeps its sign. lorajax rounds exactly to the nearest
code, as bnb's device-independent ``default`` backend kernel does (tested
bit-exact against it). The bias corrections are float32 here, float64 in bnb.

Block size. bitsandbytes' 8-bit block-wise optimisers use ``B = 256`` since
0.44.0 (commit aa57bd89, PR #1365, 2024-09-20, "Change 8bit optimizer
blocksize 2048->256"); ``B = 2048`` before, which is what GaLore's paper-time
code (galore-torch 1.0, March 2024, bitsandbytes 0.43) ran with. Default here
256; ``block_size=2048`` gives the older layout.

Example:
  >>> import jax.numpy as jnp, optax, lorajax
  >>> tx = lorajax.optim.scale_by_adam_8bit(min_8bit_size=4)
  >>> params = {"w": jnp.ones((3, 300)), "b": jnp.ones(3)}
  >>> state = tx.init(params)
  >>> s = state.inner_state                 # nonfinite="skip" wraps the 8-bit state
  >>> s.mu["w"].codes.dtype, s.mu["w"].codes.shape, s.mu["w"].absmax.shape   # ⌈900/256⌉ = 4 blocks
  (dtype('uint8'), (3, 300), (4,))
  >>> s.mu["b"].dtype                       # 3 < min_8bit_size: float32 moments
  dtype('float32')
  >>> u, state = tx.update({"w": jnp.full((3, 300), 0.5), "b": jnp.ones(3)}, state)
  >>> float(u["w"][0, 0])                   # first Adam step: g / (|g| + ε) ≈ 1
  1.0
  >>> from lorajax.optim.adam8bit import adam_8bit_state_bytes
  >>> lorajax.optim.state_bytes(tx, params) == adam_8bit_state_bytes(params, min_8bit_size=4)
  True

References:
  T. Dettmers, M. Lewis, S. Shleifer, L. Zettlemoyer, "8-bit Optimizers via
  Block-wise Quantization", ICLR 2022, arXiv:2110.02861. bitsandbytes 0.50.2
  (PyPI wheel, the tested reference); source read at
  bitsandbytes-foundation/bitsandbytes commit 95f9af30 (2026-08-19; its Python
  files equal tag 0.50.1, 37d2a938, and the 0.50.2 wheel):
  ``bitsandbytes/functional.py`` (``create_dynamic_map``,
  ``quantize_blockwise``), ``bitsandbytes/optim/optimizer.py``
  (``Optimizer2State.init_state``: 256-element blocks, ``min_8bit_size``;
  ``update_step``), ``bitsandbytes/backends/default/ops.py``
  (``quantize_blockwise``, ``dequantize_blockwise``),
  ``bitsandbytes/backends/cpu/ops.py`` (``_optimizer_update_8bit_blockwise_cpu``),
  ``csrc/cpu_ops.cpp`` (``quantize_cpu_impl``), ``csrc/kernels.cu``
  (``kOptimizerStatic8bit2StateBlockwise``, ``quantize_2D``). GaLore's use:
  jiaweizzhao/GaLore ``galore_torch/adamw8bit.py``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorajax.optim._checks import check, is_traced, require_static
from lorajax.optim.lora_pro import skip_nonfinite

__all__ = [
    "dynamic_map",
    "quantize_blockwise",
    "dequantize_blockwise",
    "QuantizedMoment",
    "ScaleByAdam8bitState",
    "scale_by_adam_8bit",
    "adam_8bit",
    "adam_8bit_state_bytes",
    "moment_bytes",
    "BLOCK_SIZES",
]

#: block sizes bitsandbytes' block-wise quantiser accepts (``functional.quantize_blockwise``)
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_NONFINITE = ("skip", "reset")


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)``'s values: float32 step, each half from its own end."""
    lo, hi = np.float32(start), np.float32(end)
    step = np.float32((hi - lo) / np.float32(steps - 1))
    k = np.arange(steps, dtype=np.float64)
    # one rounding of the exact product-and-sum (float32 × small int is exact in float64)
    first = (np.float64(lo) + np.float64(step) * k).astype(np.float32)
    second = (np.float64(hi) - np.float64(step) * (steps - 1 - k)).astype(np.float32)
    return np.where(k < steps // 2, first, second)


@functools.lru_cache(maxsize=None)
def _dynamic_map(signed: bool) -> np.ndarray:
    values = [np.float32(0.0), np.float32(1.0)]
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        b = _torch_linspace_f32(0.1, 1.0, n + 1)
        means = (b[:-1] + b[1:]) / np.float32(2.0)
        decade = np.float32(10.0 ** (i - 6)) * means
        values.extend(decade)
        if signed:
            values.extend(-decade)
    out = np.sort(np.asarray(values, np.float32))
    assert out.shape == (256,)
    out.setflags(write=False)
    return out


def dynamic_map(signed: bool = True) -> np.ndarray:
    """bitsandbytes' 8-bit dynamic quantisation map: 256 sorted float32 values in ``[-1, 1]``.

    ``signed=True`` for Adam's first moment (values in ``[-0.993, 1]``, one
    zero), ``False`` for the second (``[0, 1]``). Read-only numpy array.
    """
    return _dynamic_map(bool(signed))


def check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size not in BLOCK_SIZES:
        raise ValueError(
            f"block_size must be one of bitsandbytes' block sizes {BLOCK_SIZES} "
            f"(8-bit optimisers: 256; before bitsandbytes 0.44: 2048), got {block_size!r}"
        )
    return int(block_size)


def _check_code(code: Any) -> jax.Array:
    code = jnp.asarray(code, jnp.float32)
    if code.shape != (256,):
        raise ValueError(f"code must be a 256-entry map (see dynamic_map), got shape {code.shape}")
    return code


def _blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def quantize_blockwise(x: jax.Array, code: Any, block_size: int = 256) -> tuple[jax.Array, jax.Array]:
    """Block-wise dynamic quantisation: ``(codes, absmax)`` (see the module docstring).

    Args:
      x: any shape, any float dtype (computed in float32).
      code: a sorted 256-entry map (`dynamic_map`).
      block_size: elements per block of the flattened ``x`` (the last block
        may be shorter); one of `BLOCK_SIZES`.

    Returns:
      ``codes``: ``uint8``, ``x``'s shape, indices into ``code``;
      ``absmax``: float32 ``[⌈x.size / block_size⌉]``.
    """
    block_size = check_block_size(block_size)
    code = _check_code(code)
    x = jnp.asarray(x)
    n = math.prod(x.shape)
    nb = _blocks(n, block_size)
    flat = jnp.pad(x.astype(jnp.float32).reshape(-1), (0, nb * block_size - n)).reshape(nb, block_size)
    absmax = jnp.max(jnp.abs(flat), axis=1)
    # bnb multiplies by the reciprocal; an all-zero block maps to the code nearest 0 (no 1/0: XLA flushes
    # bnb's 1e-38 floor, a float32 subnormal, to zero)
    inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    scaled = jnp.clip(flat * inv[:, None], -1.0, 1.0)
    bounds = (code[:-1] + code[1:]) / 2.0
    idx = jnp.searchsorted(bounds, scaled.reshape(-1), side="left")
    codes = idx.astype(jnp.uint8)[:n].reshape(x.shape)
    return codes, absmax


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array, code: Any, block_size: int = 256) -> jax.Array:
    """``code[codes] · absmax[block]``, float32, ``codes``' shape (inverse of `quantize_blockwise`)."""
    block_size = check_block_size(block_size)
    code = _check_code(code)
    codes, absmax = jnp.asarray(codes), jnp.asarray(absmax)
    n = math.prod(codes.shape)
    nb = _blocks(n, block_size)
    if absmax.shape != (nb,):
        raise ValueError(f"absmax has shape {absmax.shape}; {n} elements in blocks of {block_size} need ({nb},)")
    values = jnp.pad(code[codes.reshape(-1).astype(jnp.int32)], (0, nb * block_size - n))
    return (values.reshape(nb, block_size) * absmax[:, None]).reshape(-1)[:n].reshape(codes.shape)


class QuantizedMoment(NamedTuple):
    """One moment of one leaf in 8 bits: ``codes`` (uint8, the leaf's shape) and per-block ``absmax`` (float32)."""

    codes: jax.Array
    absmax: jax.Array


class ScaleByAdam8bitState(NamedTuple):
    """``count``: int32 steps taken; ``mu``, ``nu``: per leaf a `QuantizedMoment` or a float32 array."""

    count: jax.Array  # type: ignore[assignment]  # the field shadows tuple.count, as in optax's states
    mu: Any
    nu: Any


def _uses_8bit(size: int, min_8bit_size: int) -> bool:
    return size >= min_8bit_size


def moment_bytes(size: int, *, block_size: int = 256, min_8bit_size: int = 4096) -> int:
    """Bytes of *one* moment of a leaf with ``size`` elements: ``size + 4·⌈size/B⌉`` in 8 bits, else ``4·size``."""
    if _uses_8bit(size, min_8bit_size):
        return size + 4 * _blocks(size, block_size)
    return 4 * size


def adam_8bit_state_bytes(
    params: Any, *, block_size: int = 256, min_8bit_size: int = 4096, nonfinite: str = "skip"
) -> int:
    """`scale_by_adam_8bit`'s state size in bytes for ``params`` (arrays or shape structs), from the formula."""
    check_block_size(block_size)
    total = sum(
        2 * moment_bytes(math.prod(x.shape), block_size=block_size, min_8bit_size=min_8bit_size)
        for x in jax.tree.leaves(params)
    )
    return total + 4 * (2 if nonfinite == "skip" else 1)


def _one_minus_power(b: Any, t: jax.Array) -> jax.Array:
    """``1 − bᵗ`` in float32 to ~1e-7 relative (``1 − float32(0.999)`` alone is 1.3e-5 off)."""
    if is_traced(b):  # injected (optax.inject_hyperparams): b is already an array of the params' dtype
        return -jnp.expm1(t * jnp.log(jnp.asarray(b, jnp.float32)))
    if b == 0.0:
        return jnp.ones_like(t)
    return -jnp.expm1(t * jnp.float32(math.log(b)))


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    nonfinite: str = "skip",
) -> optax.GradientTransformation:
    """Adam with block-wise 8-bit moments (bitsandbytes ``Adam8bit``); params-free, outputs ``m̂ / (√v̂ + ε)``.

    Args:
      b1, b2: decay rates, in ``[0, 1)`` (bnb and GaLore's ``AdamW8bit``: 0.9, 0.999).
      eps: ``ε ≥ 0`` added to ``√v̂`` (bnb default 1e-8; so is GaLore's 8-bit optimiser's).
      block_size: elements per quantisation block (bnb ≥ 0.44: 256; before: 2048).
      min_8bit_size: leaves with fewer elements keep float32 moments (bnb 4096).
      nonfinite: ``"skip"`` (whole step, the default) or ``"reset"`` (per
        element, bnb's CUDA kernel); see the module docstring.

    Raises:
      ValueError: a bad ``b1``, ``b2``, ``eps``, ``block_size``, ``min_8bit_size`` or ``nonfinite``.
    """
    require_static("scale_by_adam_8bit", block_size=block_size, min_8bit_size=min_8bit_size)
    for name, b in (("b1", b1), ("b2", b2)):
        check(name, b, lambda x: 0.0 <= x < 1.0, "a number in [0, 1)")
    check("eps", eps, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")
    block_size = check_block_size(block_size)
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, (int, np.integer)) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
    if nonfinite not in _NONFINITE:
        raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
    b1, b2, eps = (x if is_traced(x) else float(x) for x in (b1, b2, eps))
    signed, unsigned = dynamic_map(True), dynamic_map(False)

    def zeros_moment(x):
        size = math.prod(x.shape)
        if _uses_8bit(size, min_8bit_size):
            # bnb starts from zero codes and zero absmax: dequantises to 0
            return QuantizedMoment(jnp.zeros(x.shape, jnp.uint8), jnp.zeros((_blocks(size, block_size),), jnp.float32))
        return jnp.zeros(x.shape, jnp.float32)

    def init(params):
        mu = jax.tree.map(zeros_moment, params)
        nu = jax.tree.map(zeros_moment, params)
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), mu, nu)

    def load(moment, code):
        if isinstance(moment, QuantizedMoment):
            return dequantize_blockwise(moment.codes, moment.absmax, code, block_size)
        return moment

    def store(old, value, code):
        if isinstance(old, QuantizedMoment):
            return QuantizedMoment(*quantize_blockwise(value, code, block_size))
        return value

    def update(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        c1 = _one_minus_power(b1, t)
        c2 = jnp.sqrt(_one_minus_power(b2, t))
        treedef: Any = jax.tree.structure(updates)  # Any: jaxlib has no stubs for PyTreeDef
        grads = treedef.flatten_up_to(updates)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        outs, new_mu, new_nu = [], [], []
        for g, mu, nu in zip(grads, mus, nus):
            g32 = g.astype(jnp.float32)
            m = b1 * load(mu, signed) + (1.0 - b1) * g32
            v = b2 * load(nu, unsigned) + (1.0 - b2) * g32 * g32
            if nonfinite == "reset":
                ok = jnp.isfinite(g32)
                m, v = jnp.where(ok, m, 0.0), jnp.where(ok, v, 0.0)
            u = (m / c1) / (jnp.sqrt(v) / c2 + eps)
            if nonfinite == "reset":
                u = jnp.where(ok, u, 0.0)
            outs.append(u.astype(g.dtype))
            new_mu.append(store(mu, m, signed))
            new_nu.append(store(nu, v, unsigned))
        return (
            treedef.unflatten(outs),
            ScaleByAdam8bitState(count, treedef.unflatten(new_mu), treedef.unflatten(new_nu)),
        )

    tx = optax.GradientTransformation(init, update)
    return skip_nonfinite(tx) if nonfinite == "skip" else tx


def adam_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    block_size: int = 256,
    min_8bit_size: int = 4096,
    nonfinite: str = "skip",
) -> optax.GradientTransformation:
    """bitsandbytes' ``Adam8bit`` (``weight_decay > 0``: ``AdamW8bit``, decoupled) as an optax optimiser.

    ``chain(scale_by_adam_8bit(b1, b2, eps, ...), add_decayed_weights(weight_decay),
    scale_by_learning_rate(learning_rate))``, as ``optax.adamw`` chains
    ``scale_by_adam``. Under ``optax.inject_hyperparams``:
    ``static_args=("block_size", "min_8bit_size")`` (they fix the state's shapes).
    """
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size, nonfinite=nonfinite),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
