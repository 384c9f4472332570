"""VeRA: vector-based random matrix adaptation.

One pair of frozen random matrices is shared by every adapted weight; each
weight trains only two scaling vectors. Maths (Flax orientation,
``W: [in, out]``)::

    A_sh: [in_max, r],  B_sh: [r, out_max]     frozen, shared (adapters["_shared"])
    A = A_sh[:in],      B = B_sh[:, :out]      per-weight slices
    y  = x W + (((x A) ⊙ d) B) ⊙ b
    W' = W + A diag(d) B diag(b)

``d = vera_lambda_d: [r]`` (init ``d_initial``, default 0.1) and
``b = vera_lambda_b: [out]`` (init 0, so the model is unchanged at init).
``(in_max, out_max)`` is the element-wise max over all targets. ``A_sh`` and
``B_sh`` are uniform with PyTorch's kaiming gain √2 on their own fan-in:
``A_sh ~ U(±√(6/in_max))``, ``B_sh ~ U(±√(6/r))`` (PEFT's ``vera_A: [r, in_max]``
and ``vera_B: [out_max, r]`` transposed). They are drawn from
``projection_prng_key`` (default 0), not from the init key, so they can be
re-created from the seed. JAX's RNG is not PyTorch's: to match a PEFT adapter,
import its saved ``vera_A`` / ``vera_B``. The rank may exceed ``min(in, out)``
(the rank is that of the random projections). No α scaling.

Trainable per target: ``r + out``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"q": {"kernel": jnp.ones((6, 4))}, "v": {"kernel": jnp.ones((6, 8))}}
  >>> spec = lorajax.Spec("vera", rank=3, targets=["q", "v"])
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> adapters["_shared"]["vera_A"].shape, adapters["_shared"]["vera_B"].shape
  ((6, 3), (3, 8))
  >>> adapters["q"]["kernel"]["vera_lambda_b"].shape
  (4,)

References:
  Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024,
  arXiv:2310.11454. PEFT: ``src/peft/tuners/vera/layer.py`` (``Linear.forward``,
  ``get_delta_weight``) and ``vera/model.py`` (``_init_vera_A_vera_B``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorajax.variants import options
from lorajax.variants.base import EVAL, Context, PeftFormat, Target, Variant, additive, dropout
from lorajax.variants.options import checks, option


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: initial value of every entry of ``d = vera_lambda_d``
    d_initial: float = option(0.1, checks.finite)
    #: seed of the shared projections ``A_sh``, ``B_sh`` (not the init key), as PEFT's
    projection_prng_key: int = option(0, checks.integer)
    #: adapter dtype; None: float32
    dtype: str | None = option(None, checks.dtype)
    #: PEFT's ``vera_dropout``: dropout on the adapter's input in training (`lorajax.variants.base.dropout`; factored
    #: mode, with ``adapter_rng`` and ``adapter_train=True``)
    dropout: float = option(0.0, checks.probability)


def init_shared(key: jax.Array, targets: list[Target]) -> dict:
    """``{"vera_A": [in_max, r], "vera_B": [r, out_max]}`` from ``projection_prng_key``."""
    del key  # the projections come from their own seed, as in PEFT
    ranks = {t.rank for t in targets}
    if len(ranks) != 1:
        raise ValueError(f"VeRA shares one projection pair, so all targets need one rank; got {sorted(ranks)}")
    (r,) = ranks
    opts = targets[0].options
    in_max = max(t.matrix_shape[0] for t in targets)
    out_max = max(t.matrix_shape[1] for t in targets)
    key_a, key_b = jax.random.split(jax.random.key(opts.projection_prng_key))
    dtype = jnp.dtype(opts.dtype or jnp.float32)
    bound_a, bound_b = math.sqrt(6.0 / in_max), math.sqrt(6.0 / r)
    return {
        "vera_A": jax.random.uniform(key_a, (in_max, r), dtype, -bound_a, bound_a),
        "vera_B": jax.random.uniform(key_b, (r, out_max), dtype, -bound_b, bound_b),
    }


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"vera_lambda_d": [r] = d_initial, "vera_lambda_b": [out] = 0}``."""
    del key
    dtype = jnp.dtype(t.options.dtype or jnp.float32)
    return {
        "vera_lambda_d": jnp.full((t.rank,), t.options.d_initial, dtype),
        "vera_lambda_b": jnp.zeros((w.shape[1],), dtype),
    }


def _slices(w: jax.Array, adapter: dict) -> tuple[jax.Array, jax.Array]:
    d_in, d_out = w.shape
    a_sh, b_sh = adapter["vera_A"], adapter["vera_B"]
    if a_sh.shape[0] < d_in or b_sh.shape[1] < d_out:
        raise ValueError(f"VeRA projections {a_sh.shape}, {b_sh.shape} are smaller than the weight {w.shape}")
    return a_sh[:d_in], b_sh[:, :d_out]


def delta(w: jax.Array, adapter: dict) -> jax.Array:
    """``A diag(d) B diag(b): [in, out]``."""
    a, b = _slices(w, adapter)
    return ((a * adapter["vera_lambda_d"][None, :]) @ b) * adapter["vera_lambda_b"][None, :]


#: ``W + A diag(d) B diag(b)`` and its inverse, in the weight's dtype.
adapted, unadapted = additive(lambda w, adapter, t: delta(w, adapter))


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + (((x A) ⊙ d) B) ⊙ b`` for ``x: [T, in]``."""
    a, b = _slices(w, adapter)
    y = x @ w
    h = (dropout(x, t, ctx).astype(a.dtype) @ a) * adapter["vera_lambda_d"][None, :]
    return y + ((h @ b) * adapter["vera_lambda_b"][None, :]).astype(y.dtype)


def trainable_count(targets: list[Target]) -> int:
    """``Σ r + out`` (the shared projections are buffers)."""
    return sum(t.rank + t.matrix_shape[1] for t in targets)


# ----------------------------------------------------------------------------- PEFT format (VeraConfig)


def peft_from_config(config: dict, common: dict, options: dict | None = None) -> Any:
    from lorajax.spec import Spec

    return Spec(
        "vera",
        **common,
        projection_prng_key=int(config.get("projection_prng_key", 0)),
        d_initial=float(config.get("d_initial", 0.1)),
    )


def peft_to_config(spec: Any, targets: list[Target]) -> dict:
    return {
        "peft_type": "VERA",
        "projection_prng_key": spec.options.projection_prng_key,
        "d_initial": spec.options.d_initial,
        "save_projection": True,
    }


def peft_shared_fits(entry: str, array: Any, like: Any) -> bool:
    """PEFT's projections may be larger than needed (sliced per weight); the rank axis must match."""
    rank_axis = 1 if entry == "vera_A" else 0
    return (
        array.ndim == 2
        and all(a >= b for a, b in zip(array.shape, like.shape))
        and array.shape[rank_axis] == like.shape[rank_axis]
    )


VARIANT = Variant(
    name="vera",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    init_shared=init_shared,
    options=Options,
    buffers=("vera_A", "vera_B"),
    rank_limited=False,
    peft=PeftFormat(
        ("VERA",),
        fields=frozenset({"projection_prng_key", "d_initial"}),
        dropout=("vera_dropout",),
        tensors=(("vera_lambda_b", "vera_lambda_b", None), ("vera_lambda_d", "vera_lambda_d", None)),
        shared=(("vera_A", "base_model.vera_A", "T"), ("vera_B", "base_model.vera_B", "T")),
        from_config=peft_from_config,
        to_config=peft_to_config,
        shared_fits=peft_shared_fits,
    ),
    trainable_count=trainable_count,
    doc=__doc__,
)
