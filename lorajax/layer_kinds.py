"""LoRA on embedding tables and convolutions: the factored forwards and PEFT's tensor layouts.

Both layer kinds are adapted as a matrix, like every other weight, so merged mode, `lorajax.merge` and every
mergeable variant work on them unchanged; this module adds what is specific to them.

**Embedding** (linen ``nn.Embed``; the params leaf ``embedding: [V, d]``, selected only when a targets list
names its module, e.g. ``targets=["embed_tokens"]``). The matrix view is the table itself, ``in = V`` rows::

    W' = W + s · A B,          A: [V, r],  B: [r, d]
    y  = W'[ids] = W[ids] + s · A[ids] B         (`embed`: ids of any shape -> [..., d])
    q W'ᵀ = q Wᵀ + s · (q Bᵀ) Aᵀ                 (`attend`: the tied output head, q: [..., d] -> [..., V])

The factored forward gathers rows of ``A``; the gradient reaches ``A`` as a ``[V, r]`` scatter-add and ``B`` as
``[r, d]``: no ``[V, d]`` array is formed (tested on the compiled HLO). ``attend`` uses the adapted table, as
merged mode does. PEFT's unmerged ``Embedding`` leaves a tied ``lm_head`` on the base table (its merged model
does not: merging writes into the shared weight); lorajax follows the merged model in both modes. PEFT stores
``lora_embedding_A: [r, V] = Aᵀ`` and ``lora_embedding_B: [d, r] = Bᵀ`` (no ``.weight`` suffix), initialises
``A = 0``, ``B ~ N(0, 1)`` (`lorajax.variants.lora.init` does the same for tables) and applies no dropout on
this path (lorajax neither).

**Convolution** (linen ``nn.Conv``, 1-D/2-D/3-D, ``kernel: [*k, in, out]``). The matrix view is
``[prod(k)·in, out]``, i.e. ``Spec(in_axes={"<conv name>": kernel.ndim - 1})`` (`conv_in_axes` finds them;
factored mode refuses any other view). With ``A_k = A.reshape(*k, in, r)``::

    W' = W + s · (A B).reshape(*k, in, out)
    y  = conv(x, W) + s · conv(drop(x), A_k) B    (`conv_forward`: A_k with the base's strides, padding,
                                                    dilations; then B as a 1×1 conv = a matmul on channels)

which is PEFT's ``lora_B(lora_A(dropout(x))) · s`` with ``lora_A`` a conv of ``r`` output channels and the
base's kernel size, and ``lora_B`` a 1×1 conv; its ``get_delta_weight`` is ``ΔW[o, i, *k] = s Σ_r B[o, r]
A[r, i, *k]``, the same matrix. PEFT stores ``lora_A.weight: [r, in, *k]`` and ``lora_B.weight: [out, r, 1…]``
(`to_peft` / `from_peft`). Not supported (raise): ``feature_group_count > 1`` (PEFT cannot merge those
either), a kernel ``mask``, ``nn.ConvLocal`` / ``nn.ConvTranspose`` in factored mode (use merged mode).
PEFT's ``lora_A`` conv is built without the base's ``dilation``: for a dilated base conv PEFT's own unmerged
forward differs from its merged one; lorajax computes ``conv(x, W')`` in both modes (PEFT's merged model).

Factored mode runs this path for variants whose update is exactly ``s·A·B`` (`Factors.exact`: plain LoRA,
rsLoRA); other variants raise there and work in merged mode. NNX factored mode does not adapt ``nnx.Embed`` /
``nnx.Conv`` (it raises, naming the target): use merged mode.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, lorajax
  >>> from lorajax import layer_kinds
  >>> class Net(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, ids):
  ...         return nn.Conv(6, (3,), name="conv")(nn.Embed(10, 4, name="embed")(ids))
  >>> model = Net()
  >>> ids = jnp.array([[1, 2, 3]])
  >>> params = model.init(jax.random.key(0), ids)
  >>> spec = lorajax.Spec("lora", rank=2, targets=["embed", "conv"],
  ...                     in_axes=layer_kinds.conv_in_axes(model.apply, params, ids))
  >>> spec.in_axes
  (('conv', 2),)
  >>> adapters = lorajax.init(spec, params, jax.random.key(1))
  >>> adapters["params"]["conv"]["kernel"]["lora_A"].shape   # [prod(k)·in, r]
  (12, 2)
  >>> fwd = lorajax.adapt(model.apply, spec, mode="factored")
  >>> bool(jnp.allclose(fwd(params, adapters, ids), model.apply(params, ids)))   # B = 0 for convs, A = 0 for tables
  True

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685; official code
  microsoft/LoRA ``loralib/layers.py`` (``Embedding``, ``ConvLoRA``). PEFT ``src/peft/tuners/lora/layer.py``
  (``Embedding``: ``forward``, ``get_delta_weight``, ``reset_lora_parameters``; ``_ConvNd``: ``update_layer``,
  ``get_delta_weight``, ``forward``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorajax.selection import is_embedding
from lorajax.variants.base import Context, Target, dropout

__all__ = [
    "kind",
    "layer_kind",
    "embed",
    "attend",
    "conv_forward",
    "forward",
    "conv_in_axes",
    "check_peft",
    "peft_tensors",
    "to_peft",
    "from_peft",
]

#: Linen layers whose calls factored mode adapts here, as named in errors.
LAYERS = "nn.Embed (__call__, attend) / nn.Conv"


class _Branch(nn.Conv):
    """The LoRA branch's ``conv(x, A_k)``: an ``nn.Conv`` with the base's settings that factored mode passes by."""


def kind(module: Any, method_name: str) -> str | None:
    """``"embed"`` / ``"attend"`` (``nn.Embed.__call__`` / ``.attend``), ``"conv"`` (``nn.Conv.__call__``) or None."""
    if isinstance(module, nn.Embed):
        return {"__call__": "embed", "attend": "attend"}.get(method_name)
    if method_name == "__call__" and isinstance(module, nn.Conv) and not isinstance(module, _Branch):
        return "conv"
    return None


def layer_kind(t: Target) -> str:
    """How a target is stored by PEFT: ``"embedding"`` (an ``embedding`` leaf), ``"conv"`` (a kernel with
    ``>= 3`` axes and one output axis, i.e. ``in_axes = ndim - 1``: PEFT has no N-D linear layer) or ``"linear"``."""
    if is_embedding(t.keys):
        return "embedding"
    if len(t.shape) >= 3 and t.in_axes == len(t.shape) - 1:
        return "conv"
    return "linear"


# ----------------------------------------------------------------------------- the forwards (pure)


def embed(ids: jax.Array, a: jax.Array, b: jax.Array, s: float) -> jax.Array:
    """The LoRA term of an embedding lookup: ``s · A[ids] B: [*ids.shape, d]`` for ``A: [V, r]``, ``B: [r, d]``.

    Rows are gathered (``jnp.take``, out-of-range ids give NaN as Flax's lookup does); no ``[V, d]`` array.
    """
    return s * (jnp.take(a, ids, axis=0) @ b)


def attend(q: jax.Array, a: jax.Array, b: jax.Array, s: float) -> jax.Array:
    """The LoRA term of ``q W'ᵀ``: ``s · (q Bᵀ) Aᵀ: [..., V]`` for ``q: [..., d]``; no ``[V, d]`` array."""
    return s * ((q @ b.T) @ a.T)


def conv_forward(module: nn.Conv, x: jax.Array, a: jax.Array, b: jax.Array, s: float) -> jax.Array:
    """The LoRA term of a convolution: ``s · conv(x, A_k) B: [..., out]``, ``A_k = A.reshape(*k, in, r)``.

    ``conv`` is ``module``'s own convolution (strides, padding incl. ``CIRCULAR`` / ``CAUSAL``, input and kernel
    dilation, dtype promotion, batch dims) with ``r`` filters and no bias; ``A: [prod(k)·in, r]``, ``B: [r, out]``.
    """
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(nn.Conv) if f.init}
    fields.update(parent=None, name=None, features=a.shape[-1], use_bias=False, mask=None)
    k = _kernel_size(module)
    a_k = a.reshape(*k, -1, a.shape[-1])
    h = cast(jax.Array, _Branch(**fields).apply({"params": {"kernel": a_k}}, x))
    return s * (h @ b.astype(h.dtype))


def _kernel_size(module: nn.Conv) -> tuple[int, ...]:
    return (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)


def _cast(x: jax.Array, dtype: Any) -> jax.Array:
    return x if dtype is None else x.astype(dtype)


def forward(
    kind_: str, module: Any, variant: Any, t: Target, adapter: dict, ctx: Context, next_fun: Callable, args, kwargs
) -> jax.Array:
    """Factored mode's call of an adapted ``nn.Embed`` / ``nn.Conv`` (``kind_`` from `kind`): the base layer's
    own output (``next_fun``) plus the LoRA term.

    Raises:
      ValueError: a variant whose update is not exactly ``s·A·B``; a conv target viewed other than as
        ``[prod(k)·in, out]``; ``feature_group_count > 1``; a kernel ``mask``.
    """
    factors = variant.factors
    if factors is None or not factors.exact or factors.scale is None:
        raise ValueError(
            f"{t.name}: variant {variant.name!r} has no factored form for {LAYERS} (only variants whose update is "
            "exactly s·A·B, such as plain LoRA): use lorajax.adapt(..., mode='merged')"
        )
    a, b, s = adapter[factors.a], adapter[factors.b], factors.scale(t)
    if a.shape != (t.matrix_shape[0], t.rank) or b.shape != (t.rank, t.matrix_shape[1]):
        raise ValueError(
            f"{t.name}: adapter factors {tuple(a.shape)} / {tuple(b.shape)} are not one [in, r] / [r, out] pair for "
            f"{LAYERS} (multi-adapter pools, adapt_multi, do not cover these layers)"
        )
    y = next_fun(*args, **kwargs)
    if kind_ == "conv":
        _check_conv(module, t)
        x = args[0] if args else kwargs["inputs"]
        return y + conv_forward(module, dropout(x, t, ctx), a, b, s).astype(y.dtype)
    a, b = _cast(a, module.dtype), _cast(b, module.dtype)
    if kind_ == "attend":
        q = args[0] if args else kwargs["query"]
        return y + attend(_cast(q, module.dtype), a, b, s).astype(y.dtype)
    ids = args[0] if args else kwargs["inputs"]
    if module.num_embeddings == 1:  # Flax broadcasts the one row whatever the ids
        ids = jnp.zeros(jnp.shape(ids), jnp.int32)
    return y + embed(ids, a, b, s).astype(y.dtype)


def _check_conv(module: nn.Conv, t: Target) -> None:
    n = len(t.shape)
    if t.in_axes != n - 1:
        raise ValueError(
            f"{t.name}: an nn.Conv kernel {t.shape} is adapted as [prod(kernel_size)·in, out], but the adapter was "
            f"made with in_axes={t.in_axes}; set Spec(in_axes={{{re.escape(t.name.split('.')[-1])!r}: {n - 1}}}) "
            "(or in_axes=lorajax.layer_kinds.conv_in_axes(apply_fn, params, *inputs)) and make the adapters again"
        )
    if module.feature_group_count != 1:
        raise ValueError(
            f"{t.name}: nn.Conv with feature_group_count={module.feature_group_count} is not supported (a grouped "
            "kernel has no single low-rank view; PEFT cannot merge it either); leave this conv out of the targets"
        )
    if module.mask is not None:
        raise ValueError(f"{t.name}: nn.Conv with a kernel mask is not supported in factored mode: use mode='merged'")


def conv_in_axes(apply_fn: Callable, params: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
    """``{escaped module name: kernel.ndim - 1}`` for every ``nn.Conv`` that ``apply_fn(params, *args)`` calls.

    Pass it as ``Spec(in_axes=...)`` so that each conv kernel is viewed as ``[prod(kernel_size)·in, out]`` (PEFT's
    conv LoRA). Only shapes are traced (``jax.eval_shape``); nothing is computed.
    """
    found: dict[str, int] = {}

    def record(next_fun, a, kw, context):
        module = context.module
        if kind(module, context.method_name) == "conv":
            kernel = module.variables.get("params", {}).get("kernel")
            if kernel is not None:
                found[re.escape(".".join(str(p) for p in module.path))] = kernel.ndim - 1
        return next_fun(*a, **kw)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: apply_fn(p, *args, **kwargs), params)
    return found


# ----------------------------------------------------------------------------- PEFT's layouts


def check_peft(variant: Any, targets: list[Target]) -> None:
    """Raise ValueError unless every embedding / conv target of ``targets`` has a known PEFT layout (plain LoRA)."""
    special = [t.name for t in targets if layer_kind(t) != "linear"]
    if special and (variant.factors is None or not variant.factors.exact):
        raise ValueError(
            f"variant {variant.name!r}: lorajax.peft knows PEFT's layout of embedding and conv layers only for plain "
            f"LoRA, and {special[:3]} are such layers; leave them out of the targets to save / load this variant"
        )


def peft_tensors(variant: Any, t: Target) -> list[tuple[str, str]]:
    """``[(adapter entry, PEFT suffix)]`` of an embedding or conv target (plain LoRA's factors)."""
    a, b = variant.factors.a, variant.factors.b
    if layer_kind(t) == "embedding":
        return [(a, "lora_embedding_A"), (b, "lora_embedding_B")]
    return [(a, "lora_A.weight"), (b, "lora_B.weight")]


def to_peft(arr: Any, side: str, t: Target) -> Any:
    """lorajax's ``A: [in, r]`` / ``B: [r, out]`` (``side`` ``"a"`` / ``"b"``) of target ``t`` in PEFT's layout
    (a jax or numpy array in, the same kind out).

    Embedding: ``Aᵀ: [r, V]``, ``Bᵀ: [d, r]``. Conv (kernel ``[*k, in, out]``): ``[r, in, *k]`` and
    ``[out, r, 1, …]``.
    """
    if layer_kind(t) == "embedding":
        return arr.T
    k, n = t.shape[:-2], len(t.shape) - 2
    if side == "a":
        return arr.reshape(*k, t.shape[-2], -1).transpose(n + 1, n, *range(n))
    return arr.T.reshape(arr.shape[1], arr.shape[0], *(1,) * n)


def from_peft(arr: Any, side: str, t: Target) -> Any:
    """Inverse of `to_peft`: PEFT's tensor as lorajax's ``[in, r]`` / ``[r, out]``. Shapes are checked by the
    caller; a tensor of the wrong rank raises ValueError."""
    if layer_kind(t) == "embedding":
        return arr.T
    n = len(t.shape) - 2
    if arr.ndim != n + 2:
        raise ValueError(f"expected a {n + 2}-D conv tensor, got shape {tuple(arr.shape)}")
    if side == "a":
        return arr.transpose(*range(2, n + 2), 1, 0).reshape(-1, arr.shape[0])
    return arr.reshape(arr.shape[0], arr.shape[1]).T


def peft_shape(like_shape: tuple, side: str, t: Target) -> tuple:
    """The PEFT shape of a lorajax factor of shape ``like_shape`` (shapes only, nothing computed)."""
    return tuple(jax.eval_shape(lambda: to_peft(jnp.zeros(like_shape), side, t)).shape)
