"""Quantised frozen bases (QLoRA): NF4 with double quantisation, int8 and int4 weight-only, bf16.

``quantize(params, selection, kind)`` returns a params tree whose selected
kernels are `QuantizedArray` leaves (codes + scales, the kernel's logical shape
and float dtype kept as static fields). Nothing else needs a wrapper: a linen
layer reads its kernel through ``self.param``, which unboxes the leaf (it is a
``flax.core.meta.AxisMetadata``) to the dequantised kernel, so the base is
dequantised layer by layer at use, inside your ``jit``; ``jnp.asarray(leaf)``
(``__jax_array__``) gives the same array. `lorajax.init`, ``lorajax.adapt``
(factored, and merged as ``W_deq + ΔW`` formed in the call), the models'
``apply`` and generation, and ``lorajax.train`` accept such a tree; the adapter
gradient never forms a weight-sized product (the integer codes are frozen data).
`lorajax.merge` refuses a quantised target unless told to dequantise
(``merge(..., dequantize=True)`` or `dequantize` first).

Kinds (``W`` a Flax kernel viewed as the matrix ``[in, out]``, ``n = in·out``):

* ``"nf4"`` (QLoRA §3): the PyTorch layout ``Wᵀ: [out, in]`` flattened row
  major (what bitsandbytes quantises for a ``Linear``), cut into blocks of
  ``blocksize`` (64) values; each block is scaled by its absmax ``c`` and each
  value stored as the index of the nearest of the 16 NormalFloat levels ``q_j``
  (4 bits, two per byte, the first value in the high nibble): ``W ≈ q · c``.
  Double quantisation (on by default): the block constants ``c`` (f32) minus
  their mean ``μ`` are quantised again, in blocks of 256, to bitsandbytes'
  signed 8-bit dynamic map with f32 constants ``c₂``: ``c ≈ d[k] · c₂ + μ``.
  Bytes: ``⌈n/2⌉ + nb + 4⌈nb/256⌉ + 4`` with ``nb = ⌈n/blocksize⌉`` (without
  double quantisation ``⌈n/2⌉ + 4 nb``): 0.5159 bytes per parameter at
  blocksize 64 (the paper's 4.127 bits).
* ``"int8"``: symmetric per output channel, ``s_o = max_i |W_io| / 127``,
  ``q = round(W / s) ∈ [-127, 127]`` kept in the kernel's own shape (int8);
  bytes ``n + 4·out``.
* ``"int4"``: symmetric per group of ``group_size`` (64) consecutive inputs,
  ``s_go = max_{i∈g} |W_io| / 7``, ``q = round(W / s) ∈ [-7, 7]`` as 4-bit two's
  complement, two consecutive inputs per byte (the first in the high nibble):
  codes ``[G·group_size/2, out]`` uint8, scales ``[G, out]`` f32 with ``G = ⌈in/group_size⌉`` (a shorter
  last group is zero-padded; bytes ``(G·group_size/2 + 4G)·out``).
* ``"bf16"``: a plain ``bfloat16`` array (not a `QuantizedArray`).

Parity (``tests/test_quant.py``): NF4 codes, double-quantised constants and
second-level codes equal bitsandbytes' ``quantize_4bit`` (its CPU build)
bit for bit, and dequantised values equal ``dequantize_4bit`` to 1e-6. Two
float32 details follow bitsandbytes' definitions rather than its arithmetic:
the dynamic map is ``create_dynamic_map()``'s formula evaluated in float64 and
rounded once (bitsandbytes builds it from float32 ``torch.linspace``, which
may differ by an ulp), and ``μ`` is ``jnp.mean`` (torch's float32 summation
order may differ by an ulp); the second-level codes stay identical.

Paper: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs",
arXiv 2305.14314 (NF4 §3, double quantisation §3). Official code:
bitsandbytes ``bitsandbytes/functional.py`` (``quantize_4bit``,
``dequantize_4bit``, ``quantize_blockwise``, ``create_dynamic_map``,
``get_4bit_type``), ``bitsandbytes/backends/default/ops.py`` (the 4-bit
kernel's rounding), ``csrc/cpu_ops.cpp`` (the CPU 8-bit kernel's lookup
table); PEFT ``tuners/lora/bnb.py`` (LoRA over a 4-bit base: ``x W_deq + s (x A) B``).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, lorajax
  >>> from lorajax import quant
  >>> model = nn.Dense(64)
  >>> x = jnp.ones((2, 128))
  >>> params = model.init(jax.random.key(0), x)
  >>> q = quant.quantize(params, None, "nf4")
  >>> leaf = q["params"]["kernel"]
  >>> leaf.kind, leaf.shape, leaf.codes.shape, leaf.scales.dtype
  ('nf4', (128, 64), (4096,), dtype('uint8'))
  >>> bool(jnp.allclose(model.apply(q, x), model.apply(quant.dequantize(q), x)))
  True
  >>> quant.base_bytes(q) - 4 * 64 == quant.expected_bytes((128, 64), "nf4")  # the bias stays f32
  True
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.core import meta

from lorajax import paths
from lorajax.selection import Selection

__all__ = [
    "QuantizedArray",
    "KINDS",
    "NF4_BLOCKSIZES",
    "NF4_LEVELS",
    "quantize",
    "quantize_array",
    "dequantize",
    "is_quantized",
    "base_bytes",
    "expected_bytes",
    "dynamic_map",
]

#: what `quantize` accepts as ``kind``
KINDS = ("nf4", "int8", "int4", "bf16")
#: block sizes bitsandbytes' ``quantize_4bit`` accepts
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: block size of the second quantisation of the NF4 constants (bitsandbytes' ``compress_statistics``)
DQ_BLOCKSIZE = 256

#: the 16 NormalFloat levels (bitsandbytes ``get_4bit_type("nf4")``: quantiles of N(0, 1) scaled to [-1, 1],
#: ``create_normal_map(offset=0.9677083, use_extra_value=True)``), as float32
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

_LUT_SIZE = 65536


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``: 7 exponent bits), ``[256]`` float32.

    Exponent ``e = 0..6`` contributes the midpoints of ``2^e + 1`` equally spaced points on
    ``[0.1, 1]`` times ``10^(e-6)``, with both signs; then ``0`` and ``1``; sorted.
    """
    return _dynamic_map().copy()


@functools.lru_cache(maxsize=None)
def _dynamic_map() -> np.ndarray:
    data: list[float] = []
    for e in range(7):
        b = np.linspace(0.1, 1.0, 2**e + 1)
        mids = (b[:-1] + b[1:]) / 2.0
        data += list(10.0 ** (e - 6) * mids) + list(-(10.0 ** (e - 6)) * mids)
    data += [0.0, 1.0]
    return np.sort(np.array(data, dtype=np.float32))


@functools.lru_cache(maxsize=None)
def _dynamic_lut() -> np.ndarray:
    """bitsandbytes' CPU 8-bit quantiser: ``[-1, 1]`` cut into 65536 points, each mapped to its nearest level
    (the first level whose upper midpoint is not below it), float32 arithmetic as in ``csrc/cpu_ops.cpp``."""
    code = _dynamic_map()
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    i = np.arange(_LUT_SIZE, dtype=np.float32)
    val = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(_LUT_SIZE - 1)).astype(np.float32)
    return np.searchsorted(mids, val, side="left").astype(np.uint8)


is_quantized = paths.is_quantized


class QuantizedArray(struct.PyTreeNode, meta.AxisMetadata):
    """A quantised kernel: integer codes and float scales; its logical ``shape`` and float ``dtype`` are static.

    Fields (``n`` = number of weights, ``nb = ⌈n / blocksize⌉``):

    * ``nf4``: ``codes`` uint8 ``[⌈n/2⌉]`` (the PyTorch layout ``[out, in]`` flattened, two per byte, first
      in the high nibble); ``scales`` the block absmax, f32 ``[nb]``, or with double quantisation uint8
      ``[nb]`` codes of the dynamic map, ``scales2`` f32 ``[⌈nb/256⌉]`` and ``offset`` f32 ``[]``.
    * ``int8``: ``codes`` int8 in the kernel's shape; ``scales`` f32, the kernel's output axes.
    * ``int4``: ``codes`` uint8 ``[G·blocksize/2, out]`` (matrix view, ``G = ⌈in/blocksize⌉``, zero-padded
      rows); ``scales`` f32 ``[G, out]``.

    ``jnp.asarray(q)``, `dequantize` and ``unbox()`` (what linen's ``self.param`` calls) give the float kernel.
    """

    lorajax_quantized: ClassVar[bool] = True  # `lorajax.paths.is_quantized`

    codes: jax.Array
    scales: jax.Array
    scales2: Any = None
    offset: Any = None
    kind: str = struct.field(pytree_node=False, default="nf4")
    shape: tuple = struct.field(pytree_node=False, default=())
    dtype: Any = struct.field(pytree_node=False, default=np.dtype(np.float32))
    in_axes: int = struct.field(pytree_node=False, default=1)
    blocksize: int = struct.field(pytree_node=False, default=64)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(in, out)`` of the kernel viewed as a matrix."""
        return (math.prod(self.shape[: self.in_axes]), math.prod(self.shape[self.in_axes :]))

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self))

    def dequantize(self) -> jax.Array:
        """The float kernel, ``shape`` / ``dtype``."""
        return _DEQUANTIZE[self.kind](self)

    def __jax_array__(self) -> jax.Array:
        return self.dequantize()

    # flax.core.meta.AxisMetadata: linen's self.param unboxes to the dequantised kernel
    def unbox(self) -> jax.Array:
        return self.dequantize()

    def replace_boxed(self, val: Any) -> Any:
        raise NotImplementedError(
            "a quantised kernel cannot be replaced through flax's boxed-metadata API "
            "(lifted transforms such as nn.scan / nn.vmap over quantised params are not supported)"
        )

    def add_axis(self, index: int, params: dict) -> Any:
        raise NotImplementedError(
            "quantised kernels inside nn.scan / nn.vmap are not supported: quantise the unscanned model's params"
        )

    def remove_axis(self, index: int, params: dict) -> Any:
        return self.add_axis(index, params)


# ----------------------------------------------------------------------------
# NF4 (bitsandbytes quantize_4bit / dequantize_4bit, quant_type="nf4")
# ----------------------------------------------------------------------------


def _blocks(flat: jax.Array, blocksize: int) -> tuple[jax.Array, int]:
    """``flat: [n]`` zero-padded to ``[nb, blocksize]``; and ``n``."""
    n = flat.shape[0]
    nb = -(-n // blocksize)
    return jnp.pad(flat, (0, nb * blocksize - n)).reshape(nb, blocksize), n


def _nf4_codes(flat: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """``(packed codes [⌈n/2⌉] uint8, absmax [nb] f32)`` of ``flat: [n]`` f32, as bitsandbytes' 4-bit kernel:
    full blocks scaled by ``x * (1 / absmax)``, a last partial block by ``x / absmax``; levels by midpoints
    (a value on a midpoint takes the lower level); an odd count padded with the level of 0."""
    blocks, n = _blocks(flat, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    am = jnp.maximum(absmax, np.float32(1e-38))[:, None]
    scaled = blocks * (np.float32(1.0) / am)
    if n % blocksize:
        scaled = scaled.at[-1].set(blocks[-1] / am[-1])
    scaled = jnp.clip(scaled, -1.0, 1.0).reshape(-1)[:n]
    bounds = jnp.asarray((NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2.0))
    q = jnp.searchsorted(bounds, scaled, side="left").astype(jnp.uint8)
    if n % 2:
        q = jnp.pad(q, (0, 1), constant_values=7)  # bitsandbytes pads the scaled values with 0.0 (level 7)
    return (q[0::2] << 4) | q[1::2], absmax


def _dq_codes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' CPU ``quantize_blockwise(x, blocksize=256)`` with the dynamic map: ``(codes uint8, absmax)``."""
    blocks, n = _blocks(x, DQ_BLOCKSIZE)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    inv = np.float32(1.0) / jnp.where(absmax == 0, np.float32(1.0), absmax)
    v = jnp.clip(blocks * inv[:, None], -1.0, 1.0)
    idx = (((v + np.float32(1.0)) * np.float32(0.5)) * np.float32(_LUT_SIZE - 1) + np.float32(0.5)).astype(jnp.int32)
    q = jnp.where(absmax[:, None] == 0, jnp.uint8(0), jnp.asarray(_dynamic_lut())[idx])
    return q.reshape(-1)[:n], absmax


def _nf4(m: jax.Array, blocksize: int, double_quant: bool) -> dict:
    flat = m.T.reshape(-1).astype(jnp.float32)  # PyTorch's [out, in], row major
    codes, absmax = _nf4_codes(flat, blocksize)
    if not double_quant:
        return dict(codes=codes, scales=absmax)
    offset = jnp.mean(absmax)
    qabsmax, absmax2 = _dq_codes(absmax - offset)
    return dict(codes=codes, scales=qabsmax, scales2=absmax2, offset=offset)


def _nf4_absmax(q: QuantizedArray) -> jax.Array:
    if q.scales2 is None:
        return q.scales
    nb = q.scales.shape[0]
    code = jnp.asarray(_dynamic_map())[q.scales.astype(jnp.int32)]
    scale2 = jnp.repeat(q.scales2, DQ_BLOCKSIZE)[:nb]
    return code * scale2 + q.offset


def _dequantize_nf4(q: QuantizedArray) -> jax.Array:
    n_in, n_out = q.matrix_shape
    n = n_in * n_out
    nib = jnp.stack([q.codes >> 4, q.codes & 0xF], axis=1).reshape(-1)[:n].astype(jnp.int32)
    vals = jnp.asarray(NF4_LEVELS)[nib]
    absmax = _nf4_absmax(q)
    blocks, _ = _blocks(vals, q.blocksize)
    flat = (blocks * absmax[:, None]).reshape(-1)[:n]
    return flat.reshape(n_out, n_in).T.reshape(q.shape).astype(q.dtype)


# ----------------------------------------------------------------------------
# int8 (per output channel) and int4 (per input group), symmetric absmax
# ----------------------------------------------------------------------------


def _int8(m: jax.Array) -> dict:
    m = m.astype(jnp.float32)
    scale = jnp.max(jnp.abs(m), axis=0) / np.float32(127.0)
    safe = jnp.where(scale == 0, np.float32(1.0), scale)[None, :]
    codes = jnp.clip(jnp.round(m / safe), -127, 127).astype(jnp.int8)
    return dict(codes=codes, scales=scale)


def _dequantize_int8(q: QuantizedArray) -> jax.Array:
    m = q.codes.reshape(q.matrix_shape).astype(jnp.float32) * q.scales.reshape(1, -1)
    return m.reshape(q.shape).astype(q.dtype)


def _int4(m: jax.Array, group: int) -> dict:
    n_in, n_out = m.shape
    pad = -n_in % group  # a last group shorter than ``group``: zero rows (code 0), dropped when dequantised
    m = jnp.pad(m.astype(jnp.float32), ((0, pad), (0, 0)))
    g = m.reshape((n_in + pad) // group, group, n_out)
    scale = jnp.max(jnp.abs(g), axis=1) / np.float32(7.0)  # [in/group, out]
    safe = jnp.where(scale == 0, np.float32(1.0), scale)[:, None, :]
    q = jnp.clip(jnp.round(g / safe), -7, 7).astype(jnp.int8).reshape(n_in + pad, n_out)
    nib = q.astype(jnp.uint8) & 0xF  # 4-bit two's complement
    return dict(codes=(nib[0::2] << 4) | nib[1::2], scales=scale)


def _unpack_int4(codes: jax.Array) -> jax.Array:
    """``[in/2, out]`` uint8 -> ``[in, out]`` int8 in [-8, 7] (high nibble = even row)."""
    nib = jnp.stack([codes >> 4, codes & 0xF], axis=1).reshape(-1, codes.shape[-1]).astype(jnp.int8)
    return jnp.where(nib > 7, nib - 16, nib)


def _dequantize_int4(q: QuantizedArray) -> jax.Array:
    n_in, n_out = q.matrix_shape
    vals = _unpack_int4(q.codes).astype(jnp.float32).reshape(q.scales.shape[0], q.blocksize, n_out)
    return (vals * q.scales[:, None, :]).reshape(-1, n_out)[:n_in].reshape(q.shape).astype(q.dtype)


_DEQUANTIZE: dict[str, Callable[[QuantizedArray], jax.Array]] = {
    "nf4": _dequantize_nf4,
    "int8": _dequantize_int8,
    "int4": _dequantize_int4,
}


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def _check_kind(kind: Any) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def quantize_array(
    w: Any,
    kind: str = "nf4",
    *,
    in_axes: int = 1,
    blocksize: int = 64,
    double_quant: bool = True,
    group_size: int = 64,
    name: str = "weight",
) -> Any:
    """One kernel ``w`` (``[*in, *out]``, float, >= 2 axes) as a `QuantizedArray` (``"bf16"``: a bf16 array).

    Args:
      w: the kernel; its first ``in_axes`` axes are inputs.
      kind: one of `KINDS`.
      blocksize: NF4 block size, one of `NF4_BLOCKSIZES` (bitsandbytes' set).
      double_quant: NF4 only: quantise the block constants again (QLoRA's double quantisation).
      group_size: int4 only: inputs per scale (even; a last group may be shorter, zero-padded).
      name: the leaf's name in error messages.

    Raises:
      ValueError: unknown kind, a leaf with fewer than 2 axes or a non-float dtype, an ``in_axes`` that leaves
        no output axis, an unsupported block size, an odd group size.
    """
    _check_kind(kind)
    if is_quantized(w):
        raise ValueError(f"{name} is already quantised ({w.kind}); quantise the float params once")
    shape = tuple(getattr(w, "shape", ()))
    if len(shape) < 2:
        raise ValueError(
            f"{name} has shape {shape}: only matrices (kernels with >= 2 axes) can be quantised; "
            "leave vectors (biases, norms) out of the selection"
        )
    dtype = np.dtype(w.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} has dtype {dtype}: only float kernels can be quantised")
    if isinstance(in_axes, bool) or not isinstance(in_axes, int) or not 1 <= in_axes < len(shape):
        raise ValueError(f"in_axes={in_axes!r} leaves no input or output axis for {name} with shape {shape}")
    w = jnp.asarray(w)
    if kind == "bf16":
        return w.astype(jnp.bfloat16)
    m = w.reshape(math.prod(shape[:in_axes]), -1)
    static = dict(kind=kind, shape=shape, dtype=dtype, in_axes=in_axes)
    if kind == "nf4":
        if blocksize not in NF4_BLOCKSIZES:
            raise ValueError(f"blocksize={blocksize!r} for {name}: NF4 supports {NF4_BLOCKSIZES} (bitsandbytes' set)")
        return QuantizedArray(**_nf4(m, blocksize, double_quant), blocksize=blocksize, **static)
    if kind == "int8":
        fields = _int8(m)
        codes, scales = fields["codes"].reshape(shape), fields["scales"].reshape(shape[in_axes:])
        return QuantizedArray(codes=codes, scales=scales, blocksize=m.shape[0], **static)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size={group_size!r} for {name}: int4 needs an even group size >= 2 (e.g. 64, 128)")
    return QuantizedArray(**_int4(m, group_size), blocksize=group_size, **static)


def _as_selection(selection: Any) -> Selection:
    if selection is None:
        return Selection("all-linear")
    if isinstance(selection, Selection):
        return selection
    if hasattr(selection, "selection") and isinstance(selection.selection, Selection):  # a lorajax.Spec
        return selection.selection
    if isinstance(selection, (str, list, tuple, set, frozenset)):
        return Selection(selection)  # type: ignore[arg-type]  # Selection checks the entries
    raise TypeError(
        f"selection must be None ('all-linear'), a lorajax.Spec, a lorajax.Selection or its targets grammar "
        f"(suffix list, regex, 'all-linear'), got {type(selection).__name__}"
    )


def quantize(
    params: Any,
    selection: Any = None,
    kind: str = "nf4",
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    group_size: int = 64,
) -> Any:
    """``params`` with the selected kernels quantised (a new tree of the same structure; nothing is mutated).

    Args:
      params: linen params / variables (bare or ``{"params": ...}``), dicts or FrozenDicts.
      selection: which kernels: ``None`` = ``"all-linear"`` (every 2-D kernel except the output head, as
        bitsandbytes' ``load_in_4bit`` leaves ``lm_head`` in float), a `lorajax.Spec` (its selection), a
        `lorajax.Selection`, or the targets grammar (suffix list, regex). N-D kernels use the
        selection's ``in_axes``.
      kind: ``"nf4"``, ``"int8"``, ``"int4"`` or ``"bf16"``.
      blocksize / double_quant / group_size: see `quantize_array`.

    Raises:
      ValueError / TypeError: see `quantize_array` and `lorajax.Selection.resolve`, naming the leaf.
    """
    _check_kind(kind)
    chosen = {w.keys: w for w in _as_selection(selection).resolve(params)}

    def one(path, leaf):
        w = chosen.get(paths.key_names(path))
        if w is None:
            return leaf
        return quantize_array(
            leaf,
            kind,
            in_axes=w.in_axes,
            blocksize=blocksize,
            double_quant=double_quant,
            group_size=group_size,
            name="/".join(w.keys),
        )

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)


def dequantize(params: Any) -> Any:
    """``params`` with every `QuantizedArray` replaced by its float kernel (other leaves unchanged)."""
    return jax.tree_util.tree_map(lambda x: x.dequantize() if is_quantized(x) else x, params, is_leaf=is_quantized)


def base_bytes(params: Any) -> int:
    """Measured bytes of a params tree: the sum of its arrays' ``nbytes`` (codes and scales of quantised leaves)."""
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params))


def expected_bytes(
    shape: tuple,
    kind: str = "nf4",
    *,
    in_axes: int = 1,
    blocksize: int = 64,
    double_quant: bool = True,
    group_size: int = 64,
) -> int:
    """The formula for the bytes one quantised kernel of ``shape`` takes (see the module docstring)."""
    _check_kind(kind)
    n = math.prod(shape)
    n_out = math.prod(shape[in_axes:])
    if kind == "bf16":
        return 2 * n
    if kind == "int8":
        return n + 4 * n_out
    if kind == "int4":
        groups = -(-(n // n_out) // group_size)
        return (groups * group_size // 2 + 4 * groups) * n_out
    nb = -(-n // blocksize)
    if not double_quant:
        return -(-n // 2) + 4 * nb
    return -(-n // 2) + nb + 4 * -(-nb // DQ_BLOCKSIZE) + 4
