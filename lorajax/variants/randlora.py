"""RandLoRA: full-rank updates from many shared random bases, with learned diagonal scales.

One pair of frozen random bases is shared by every adapted weight. Each
weight trains two small matrices, ``Λ`` and ``Γ``, that scale ``nb`` random
rank-``r`` bases so that together they span the full rank ``d_min``.
Sizes: ``d_min = min(in, out)``, ``d_max = max(in, out)`` of the weight,
``nb = ⌈d_min / r⌉``; ``D_min``, ``D_max`` and ``N`` the same for the
element-wise largest ``(out, in)`` over all targets (as PEFT's ``_find_dim``).

Buffers and adapter entries (PEFT's layouts, which are tied to the min/max
side of a weight rather than to its input or output, so they need no
transpose)::

    randlora_A: [r, 1, D_min]      frozen, shared (adapters["_shared"]); ONE A basis
    randlora_B: [D_max, N, r]      frozen, shared; N B bases
    Λ = randlora_lambda: [r, nb]   trainable, per weight
    Γ = randlora_gamma:  [nb, d_min]  trainable, per weight

Maths (PyTorch layout as in PEFT's ``get_scaled_bases``, then mapped to Flax)::

    A = randlora_A[:, :, :d_min]                 [r, 1, d_min]
    B = randlora_B[:d_max, :nb, :]               [d_max, nb, r]
    Ã[k, b, :] = Λ[k, b] · A[k, 0, :] ⊙ Γ[b, :]  [r, nb, d_min]
    Ã_f = Ã.reshape(r·nb, d_min)                 row    k·nb + b
    B_f = B.reshape(d_max, nb·r)                 column b·r + k
    M   = B_f Ã_f                                [d_max, d_min]

    Flax kernel W: [in, out]
    in ≤ out:  W' = W + s · Mᵀ,  y = x W + s · (x Ã_fᵀ) B_fᵀ
    in > out:  W' = W + s · M,   y = x W + s · (x B_f) Ã_f

The two flattenings pair column ``j`` of ``B_f`` with row ``j`` of ``Ã_f``
under a fixed permutation of (rank, base); this is PEFT's and the authors'
pairing, kept exactly for parity. It is still a sum of ``nb·r`` random
rank-1 terms, i.e. the paper's ``ΔW = Σ_b B_b diag(Λ[:, b]) A diag(Γ[b])``
up to that relabelling of the bases; ``rank(ΔW) = d_min`` for random Λ, Γ.

Scaling (``scaling`` option; the sources disagree, spec §4):

* ``"peft"`` (default, for PEFT parity): ``s = α / r``.
* ``"official"``: ``s = α / r / √nb`` (the authors' NLG code and their PEFT
  fork, ``self.scaling = lora_alpha / r / sqrt(n)``), ``nb`` per weight.

PEFT's default is ``r=32``, ``randlora_alpha=640`` (≈ 20·r); pass them as
``Spec(rank=32, alpha=640)``. All targets share one rank (the bases have one).

Init: ``Λ = 0`` (so the model is unchanged at init) and
``Γ = 1 / max(nb, d_min) = 1 / d_min`` (PEFT's ``reset_randlora_parameters``;
the official code resets to the same value). Bases: drawn from
``projection_prng_key`` (default 0), not from the init key; dense bases are
uniform (PEFT: kaiming-uniform, a=√5) and ``sparse`` / ``very_sparse`` bases
are ternary ``{-1, 0, +1}`` with ``P(±1) = 1/(2s)`` each (``s = 3`` /
``s = √D_min``); each basis tensor is then divided by its own standard
deviation (Bessel-corrected, as ``torch.std``). PEFT draws the dense bases in
bfloat16 (float16 where bf16 is unavailable) with a torch generator; lorajax
draws them in float32 (option ``dtype``) with JAX's RNG,
so the values differ: to match a PEFT adapter, import its saved
``randlora_A`` / ``randlora_B`` (``save_projection=True``, the default).
Dropout (option ``dropout``, PEFT's ``randlora_dropout``) acts on the adapter's input in training. The rank
may exceed ``d_min`` (then ``nb = 1``), as in PEFT.

Trainable per target: ``nb · (r + d_min)``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"q": {"kernel": jnp.ones((6, 4))}, "v": {"kernel": jnp.ones((6, 8))}}
  >>> spec = lorajax.Spec("randlora", rank=2, alpha=4, targets=["q", "v"])
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> adapters["_shared"]["randlora_A"].shape, adapters["_shared"]["randlora_B"].shape
  ((2, 1, 6), (8, 3, 2))
  >>> q = adapters["q"]["kernel"]
  >>> q["randlora_lambda"].shape, q["randlora_gamma"].shape
  ((2, 2), (2, 4))
  >>> bool(jnp.all(lorajax.merge(spec, params, adapters)["q"]["kernel"] == 1.0))
  True

References:
  Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large
  models", ICLR 2025, arXiv:2502.00987. Official code PaulAlbert31/RandLoRA:
  ``NLG/loralib/randlora_layers.py`` and the authors' PEFT fork
  ``commonsense_reasoning/peft/src/peft/tuners/randlora/layer.py``.
  PEFT: ``src/peft/tuners/randlora/layer.py`` (``get_scaled_bases``,
  ``get_delta_weight``, ``forward``, ``reset_randlora_parameters``) and
  ``randlora/model.py`` (``_find_dim``, ``_init_randlora_A_randlora_B``,
  ``_init_randlora_A_randlora_B_sparse``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorajax.variants import options
from lorajax.variants.base import EVAL, Context, PeftFormat, Target, Variant, additive, dropout
from lorajax.variants.base import scaling as base_scaling
from lorajax.variants.options import checks, option

SCALINGS = ("peft", "official")


def _check_scaling(name: str, value: Any) -> None:
    if value not in SCALINGS:
        raise ValueError(
            f"{name} must be one of {SCALINGS} ('peft': alpha/r; 'official': alpha/r/sqrt(nb)), got {value!r}"
        )


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: seed of the shared bases ``randlora_A``, ``randlora_B`` (not the init key), as PEFT's
    projection_prng_key: int = option(0, checks.integer)
    #: ternary bases with ``P(±1) = 1/6`` each (PEFT's ``sparse``)
    sparse: bool = option(False, checks.boolean)
    #: ternary bases with ``P(±1) = 1/(2√D_min)`` each (PEFT's ``very_sparse``)
    very_sparse: bool = option(False, checks.boolean)
    #: ``"peft"``: ``s = α/r``; ``"official"``: ``s = α/r/√nb`` (the authors' code)
    scaling: str = option("peft", _check_scaling)
    #: adapter dtype; None: float32, or the weight's dtype if wider (bases: float32)
    dtype: str | None = option(None, checks.dtype)
    #: PEFT's ``randlora_dropout``: dropout on the adapter's input in training
    #: (`lorajax.variants.base.dropout`; factored mode, with ``adapter_rng`` and ``adapter_train=True``)
    dropout: float = option(0.0, checks.probability)

    def check(self) -> None:
        if self.sparse and self.very_sparse:
            raise ValueError("sparse and very_sparse are exclusive: set one of them")


def num_bases(d_min: int, r: int) -> int:
    """``⌈d_min / r⌉``: enough rank-``r`` bases to reach full rank."""
    return -(-d_min // r)


def _dims(shape: tuple[int, ...]) -> tuple[int, int]:
    return min(shape), max(shape)


def scaling(t: Target) -> float:
    """``α / r`` (``"peft"``) or ``α / r / √nb`` (``"official"``)."""
    s = base_scaling(t.alpha, t.rank)
    if t.options.scaling == "official":
        s /= math.sqrt(num_bases(min(t.matrix_shape), t.rank))
    return s


def _unit_std(x: jax.Array) -> jax.Array:
    std = jnp.std(x, ddof=1)
    return x / jnp.where(std > 0, std, 1.0)


def _basis(key: jax.Array, shape: tuple, sparsity: float | None, dtype) -> jax.Array:
    if sparsity is None:
        x = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
    else:
        u = jax.random.uniform(key, shape, jnp.float32)
        p = 1.0 / (2.0 * sparsity)
        x = jnp.where(u < p, -1.0, jnp.where(u > 1.0 - p, 1.0, 0.0))
    return _unit_std(x).astype(dtype)


def init_shared(key: jax.Array, targets: list[Target]) -> dict:
    """``{"randlora_A": [r, 1, D_min], "randlora_B": [D_max, N, r]}`` from ``projection_prng_key``."""
    del key  # the bases come from their own seed, as in PEFT
    ranks = {t.rank for t in targets}
    if len(ranks) != 1:
        raise ValueError(
            f"RandLoRA shares one pair of random bases, so all targets need one rank; got {sorted(ranks)} "
            f"(from rank_pattern)"
        )
    (r,) = ranks
    opts = targets[0].options
    out_max = max(t.matrix_shape[1] for t in targets)
    in_max = max(t.matrix_shape[0] for t in targets)
    d_min, d_max = _dims((in_max, out_max))
    n = num_bases(d_min, r)
    sparsity = None
    if opts.very_sparse:
        sparsity = math.sqrt(d_min)
    elif opts.sparse:
        sparsity = 3.0
    dtype = jnp.dtype(opts.dtype or jnp.float32)
    key_a, key_b = jax.random.split(jax.random.key(opts.projection_prng_key))
    return {
        "randlora_A": _basis(key_a, (r, 1, d_min), sparsity, dtype),
        "randlora_B": _basis(key_b, (d_max, n, r), sparsity, dtype),
    }


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"randlora_lambda": [r, nb] = 0, "randlora_gamma": [nb, d_min] = 1/max(nb, d_min)}``."""
    del key
    d_min, _ = _dims(w.shape)
    nb = num_bases(d_min, t.rank)
    dtype = jnp.dtype(t.options.dtype or jnp.promote_types(w.dtype, jnp.float32))
    return {
        "randlora_lambda": jnp.zeros((t.rank, nb), dtype),
        "randlora_gamma": jnp.full((nb, d_min), 1.0 / max(nb, d_min), dtype),
    }


def factors(w: jax.Array, adapter: dict, t: Target) -> tuple[jax.Array, jax.Array]:
    """``(Ã_f: [r·nb, d_min], B_f: [d_max, nb·r])`` for ``w: [in, out]`` (see the module docstring)."""
    d_min, d_max = _dims(w.shape)
    lam, gam = adapter["randlora_lambda"], adapter["randlora_gamma"]
    r, nb = lam.shape
    a_sh, b_sh = adapter["randlora_A"], adapter["randlora_B"]
    if (
        a_sh.ndim != 3
        or b_sh.ndim != 3
        or a_sh.shape[:2] != (r, 1)
        or a_sh.shape[2] < d_min
        or b_sh.shape[0] < d_max
        or b_sh.shape[1] < nb
        or b_sh.shape[2] != r
    ):
        raise ValueError(
            f"RandLoRA bases randlora_A {a_sh.shape}, randlora_B {b_sh.shape} do not fit a weight {w.shape} "
            f"with randlora_lambda {lam.shape}: need A [{r}, 1, >={d_min}] and B [>={d_max}, >={nb}, {r}]"
        )
    if gam.shape != (nb, d_min):
        raise ValueError(f"randlora_gamma has shape {gam.shape}, expected ({nb}, {d_min}) for a weight {w.shape}")
    a = a_sh[:, :, :d_min].astype(lam.dtype)  # [r, 1, d_min]: one basis for all nb
    b = b_sh[:d_max, :nb, :].astype(lam.dtype)  # [d_max, nb, r]
    a_scaled = lam[:, :, None] * a * gam[None, :, :]  # [r, nb, d_min]
    return a_scaled.reshape(r * nb, d_min), b.reshape(d_max, nb * r)


def delta(w: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``s · Mᵀ`` (in ≤ out) or ``s · M`` (in > out), ``M = B_f Ã_f``: ``[in, out]``."""
    a_f, b_f = factors(w, adapter, t)
    d_in, d_out = w.shape
    if d_in <= d_out:
        return scaling(t) * (a_f.T @ b_f.T)
    return scaling(t) * (b_f @ a_f)


#: ``W + ΔW`` and its inverse, in the weight's dtype.
adapted, unadapted = additive(delta)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + s (x Ã_fᵀ) B_fᵀ`` (in ≤ out) or ``x W + s (x B_f) Ã_f`` for ``x: [T, in]``."""
    a_f, b_f = factors(w, adapter, t)
    d_in, d_out = w.shape
    y = x @ w
    xa = dropout(x, t, ctx).astype(a_f.dtype)
    h = (xa @ a_f.T) @ b_f.T if d_in <= d_out else (xa @ b_f) @ a_f
    return y + (scaling(t) * h).astype(y.dtype)


def trainable_count(targets: list[Target]) -> int:
    """``Σ nb · (r + d_min)`` (the shared bases are buffers)."""
    total = 0
    for t in targets:
        d_min = min(t.matrix_shape)
        total += num_bases(d_min, t.rank) * (t.rank + d_min)
    return total


# ----------------------------------------------------------------------------- PEFT format (RandLoraConfig)


def peft_from_config(config: dict, common: dict, options: dict | None = None) -> Any:
    from lorajax.spec import Spec

    return Spec(
        "randlora",
        alpha=float(config.get("randlora_alpha", 640)),
        **common,
        projection_prng_key=int(config.get("projection_prng_key", 0)),
        sparse=bool(config.get("sparse", False)),
        very_sparse=bool(config.get("very_sparse", False)),
    )


def peft_to_config(spec: Any, targets: list[Target]) -> dict:
    opts = spec.options
    if opts.scaling != "peft":
        raise ValueError("PEFT's RandLoRA format uses scaling='peft' (alpha / r)")
    return {
        "peft_type": "RANDLORA",
        "randlora_alpha": spec.alpha,
        "save_projection": True,
        "projection_prng_key": opts.projection_prng_key,
        "sparse": opts.sparse,
        "very_sparse": opts.very_sparse,
    }


VARIANT = Variant(
    name="randlora",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    init_shared=init_shared,
    options=Options,
    buffers=("randlora_A", "randlora_B"),
    rank_limited=False,
    peft=PeftFormat(
        ("RANDLORA",),
        fields=frozenset({"randlora_alpha", "projection_prng_key", "sparse", "very_sparse"}),
        dropout=("randlora_dropout",),
        tensors=(("randlora_lambda", "randlora_lambda", None), ("randlora_gamma", "randlora_gamma", None)),
        shared=(("randlora_A", "base_model.randlora_A", None), ("randlora_B", "base_model.randlora_B", None)),
        duplicates=("randlora_A", "randlora_B"),  # PEFT also writes the bases per module
        from_config=peft_from_config,
        to_config=peft_to_config,
    ),
    trainable_count=trainable_count,
    doc=__doc__,
)
