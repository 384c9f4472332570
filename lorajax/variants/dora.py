"""DoRA: weight-decomposed low-rank adaptation (magnitude and direction).

Maths (Flax orientation, ``W: [in, out]``; norms are per output feature,
i.e. over axis 0 of the kernel = PyTorch's row norms of ``[out, in]``)::

    V  = W + s · A B                  (s as LoRA: α/r, or α/√r with use_rslora)
    n  = ‖V‖₂ over axis 0, detached   ([out]; stop-gradient, DoRA §4.3 / PEFT)
    W' = V · (m / n)                  (m: trainable magnitude, [out])
    y  = (x W + s · (x A) B) · (m / n)

At init ``B = 0`` and ``m = ‖W‖₂`` per output feature, so ``W' = W``.
Trainable per target: ``r · (in + out) + out``. The factored forward forms
``A B`` only inside the detached norm, so no full-size gradient is formed.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
  >>> spec = lorajax.Spec("dora", rank=2, targets=["dense"])
  >>> a = lorajax.init(spec, params, jax.random.key(0))["dense"]["kernel"]
  >>> a["magnitude"].shape, bool(jnp.allclose(a["magnitude"], jnp.sqrt(6.0)))
  ((4,), True)

References:
  Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024,
  arXiv:2402.09353; official code NVlabs/DoRA. PEFT: ``src/peft/tuners/lora/dora.py``
  (``DoraLinearLayer.get_weight_norm``, ``forward``) and ``lora/variants.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lorajax.variants import lora
from lorajax.variants.base import EVAL, Context, Factors, PeftFormat, Target, Variant, dropout


def _norm(w: jax.Array, delta: jax.Array) -> jax.Array:
    v = w.astype(delta.dtype) + jax.lax.stop_gradient(delta)
    return jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0))


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """LoRA's ``A, B`` plus ``magnitude: [out] = ‖W + s A B‖`` per output feature."""
    adapter = lora.init(key, w, t)
    adapter["magnitude"] = _norm(w, lora.delta(adapter, t))
    return adapter


def adapted(w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``(W + s A B) · m / ‖W + s A B‖`` (norm detached)."""
    d = lora.delta(adapter, t)
    scale = (adapter["magnitude"] / _norm(w, d))[None, :]
    return ((w.astype(d.dtype) + d) * scale).astype(w.dtype)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``(x W + s (x A) B) · m / n`` for ``x: [T, in]``.

    With dropout in training (PEFT's ``DoraLinearVariant.forward``): ``x W + (m/n − 1) · (x̃ W) + (m/n) · s (x̃ A) B``
    with ``x̃ = drop(x)``; the base term keeps the clean ``x``.
    """
    d = lora.delta(adapter, t)
    scale = (adapter["magnitude"] / _norm(w, d))[None, :]
    x_drop = dropout(x, t, ctx)
    if x_drop is x:
        y = lora.apply(x, w, adapter, t)
        return (y.astype(scale.dtype) * scale).astype(y.dtype)
    y = x @ w
    extra = (scale - 1.0) * (x_drop @ w).astype(scale.dtype) + scale * lora.low_rank(x_drop, adapter, t)
    return y + extra.astype(y.dtype)


def trainable_count(targets: list[Target]) -> int:
    """``Σ r · (in + out) + out``."""
    return sum(t.rank * sum(t.matrix_shape) + t.matrix_shape[1] for t in targets)


VARIANT = Variant(
    name="dora",
    init=init,
    adapted=adapted,
    apply=apply,
    options=lora.Options,
    factors=Factors("lora_A", "lora_B", scale=lora.scaling, exact=False),
    peft=PeftFormat(
        ("LORA",),
        fields=lora.PEFT_FIELDS,
        tensors=lora.PEFT_TENSORS + (("magnitude", "lora_magnitude_vector", None),),
        dropout=("lora_dropout",),
        accepts=lambda config: bool(config.get("use_dora")),
        from_config=functools.partial(lora.peft_from_config, variant="dora"),
        to_config=functools.partial(lora.peft_to_config, use_dora=True),
    ),
    trainable_count=trainable_count,
    doc=__doc__,
)
