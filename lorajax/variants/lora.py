"""LoRA and rsLoRA: a trainable low-rank update beside a frozen weight.

Maths (Flax orientation, kernel ``W: [in, out]``, ``y = x W``)::

    y = x W + s · (x A) B,        W' = W + s · A B
    s = α / r          (LoRA)
    s = α / √r         (rsLoRA, ``use_rslora=True``)

PEFT stores ``lora_A.weight: [r, in]`` and ``lora_B.weight: [out, r]``; here
``lora_A = lora_A.weightᵀ: [in, r]`` and ``lora_B = lora_B.weightᵀ: [r, out]``.

Init (``init_weights``): ``True`` (default): ``A ~ U(-1/√in, 1/√in)`` (PyTorch's
kaiming-uniform with a=√5 on ``[r, in]``), ``B = 0``, so the model is unchanged
at init. ``"gaussian"``: ``A ~ N(0, 1/r²)``, ``B = 0``. ``False``: A and B both
random (not an identity; for tests). ``"pissa"`` / ``"pissa_niter_K"`` /
``"olora"`` change the base weight: build them with `lorajax.inits.pissa` /
`lorajax.inits.olora`, which return the new base explicitly.

Trainable per target: ``r · (in + out)``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}
  >>> spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["dense"])
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> adapters["dense"]["kernel"]["lora_A"].shape, adapters["dense"]["kernel"]["lora_B"].shape
  ((6, 2), (2, 4))

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
  arXiv:2106.09685; official code microsoft/LoRA ``loralib/layers.py``.
  Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
  LoRA" (rsLoRA), arXiv:2312.03732.
  PEFT: ``src/peft/tuners/lora/layer.py`` (``Linear.forward``,
  ``get_delta_weight``, ``reset_lora_parameters``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lorajax.variants.base import Target, Variant, additive

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")


def scaling(t: Target) -> float:
    """``α / r``, or ``α / √r`` with ``use_rslora``."""
    if t.options.get("use_rslora", False):
        return t.alpha / math.sqrt(t.rank)
    return t.alpha / t.rank


def validate(options: dict) -> None:
    init = options.get("init_weights", True)
    ok = init in INIT_CHOICES or (isinstance(init, str) and init.startswith("pissa_niter_"))
    if not ok:
        raise ValueError(f"init_weights must be one of {INIT_CHOICES} or 'pissa_niter_K', got {init!r}")
    dtype = options.get("dtype")
    if dtype is not None:
        jnp.dtype(dtype)  # raises TypeError on an unknown dtype


def adapter_dtype(t: Target, w: jax.Array):
    return jnp.dtype(t.options.get("dtype") or jnp.promote_types(w.dtype, jnp.float32))


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"lora_A": [in, r], "lora_B": [r, out]}`` for ``w: [in, out]``."""
    d_in, d_out = w.shape
    dtype = adapter_dtype(t, w)
    mode = t.options.get("init_weights", True)
    if isinstance(mode, str) and mode != "gaussian":
        raise ValueError(
            f"init_weights={mode!r} changes the base weight: use lorajax.inits.{mode.split('_')[0]}"
            "(spec, params, key), which returns (adapters, new_params)"
        )
    key_a, key_b = jax.random.split(key)
    if mode == "gaussian":
        a = jax.random.normal(key_a, (d_in, t.rank), dtype) / t.rank
    else:
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key_a, (d_in, t.rank), dtype, -bound, bound)
    if mode is False:
        bound_b = 1.0 / math.sqrt(t.rank)
        b = jax.random.uniform(key_b, (t.rank, d_out), dtype, -bound_b, bound_b)
    else:
        b = jnp.zeros((t.rank, d_out), dtype)
    return {"lora_A": a, "lora_B": b}


def delta(adapter: dict, t: Target) -> jax.Array:
    """``s · A B: [in, out]``."""
    return scaling(t) * (adapter["lora_A"] @ adapter["lora_B"])


#: ``W + s · A B`` and its inverse, in the weight's dtype.
adapted, unadapted = additive(lambda w, adapter, t: delta(adapter, t))


def low_rank(x: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``s · (x A) B: [T, out]`` for ``x: [T, in]``, in the adapter's dtype; never forms ``A B``."""
    a, b = adapter["lora_A"], adapter["lora_B"]
    return scaling(t) * ((x.astype(a.dtype) @ a) @ b)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``x W + s · (x A) B`` for ``x: [T, in]``; never forms ``A B``."""
    y = x @ w
    return y + low_rank(x, adapter, t).astype(y.dtype)


VARIANT = Variant(
    name="lora",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    options={"use_rslora": False, "init_weights": True, "dtype": None},
    validate=validate,
    doc=__doc__,
)
