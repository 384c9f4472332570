"""Hydra: a parallel low-rank branch on the layer input plus a sequential one on its output.

The parallel branch is LoRA (it sees the layer's input); the sequential branch
is a low-rank adapter applied to the layer's pretrained output. Both are
linear, so the layer merges into one weight. Maths (Flax orientation,
``W: [in, out]``, ``y = x W``)::

    y  = x W + s · (x A_p) B_p + s · ((x W) A_s) B_s
    W' = W + s · (A_p B_p + W A_s B_s) = W (I + s A_s B_s) + s A_p B_p

    A_p = hydra_par_A: [in, r_p],   B_p = hydra_par_B: [r_p, out]     (r_p = the rank)
    A_s = hydra_seq_A: [out, r_s],  B_s = hydra_seq_B: [r_s, out]     (r_s = seq_rank, default r_p)

(paper: ``y = W0 x + B_p A_p x + B_s A_s W0 x`` in ``[out, in]`` layout;
the official VTAB ``reparameterize`` merges ``W0 + s (W_p + W0 W_s)`` on the
``[in, out]`` kernel, our formula). ``s = scale`` (default 1.0: the NLU code
has no scale; the VTAB code sets it per data set, e.g. 0.1); the Spec's
``alpha`` is not used.

Init (``init_weights``): the up-projections ``B_p``, ``B_s`` are zero in both
official codes, so the model is unchanged at init. The down-projections are
``"xavier"`` (default; VTAB ``Hydra_layer``: ``U(±√(6/(fan_in + r)))``) or
``"kaiming"`` (NLU ``Hydra``: PyTorch's kaiming-uniform a=√5, ``U(±1/√fan_in)``),
with ``fan_in = in`` for ``A_p`` and ``out`` for ``A_s``.

Decisions where the official code does more than the variant contract can
express (it maps a weight to a weight, with no bias):

* Both official codes feed the sequential branch the layer's *biased*
  output ``x W + b``, and the VTAB code also gives each branch two biases of
  its own. Here the branches have no biases (as the NLU code and the paper's
  equation) and the sequential branch sees ``x W`` without the layer's bias
  (the paper's equation), so with a biased base layer the output differs from
  the official codes by the constant ``s · (b A_s) B_s``: a bias shift that a
  merged weight cannot carry (the VTAB merge folds it into the bias).
* Dropout between down- and up-projection (VTAB, per data set) is not
  implemented, as for LoRA in lorajax.

``unadapted`` inverts the merge with the Woodbury identity,
``W = M − s (M A_s)(I_{r_s} + s B_s A_s)⁻¹ B_s`` with ``M = W' − s A_p B_p``.

Trainable per target: ``r_p · (in + out) + 2 · r_s · out``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"fc2": {"kernel": jnp.ones((6, 4))}}
  >>> spec = lorajax.Spec("hydra", rank=2, targets=["fc2"], seq_rank=3, scale=0.1)
  >>> a = lorajax.init(spec, params, jax.random.key(0))["fc2"]["kernel"]
  >>> [a[k].shape for k in ("hydra_par_A", "hydra_par_B", "hydra_seq_A", "hydra_seq_B")]
  [(6, 2), (2, 4), (4, 3), (3, 4)]

References:
  Kim, Yang, Kim, Hong, Park, "Hydra: Multi-head Low-rank Adaptation for
  Parameter Efficient Fine-tuning", arXiv:2309.06922. Official code
  extremebird/Hydra: ``vtab1k/hydra.py`` (``Hydra_layer``,
  ``forward_vit_hydra_ffn``, ``reparameterize``) and
  ``nlu/src/transformers/models/adapter.py`` (``Hydra``). Not in PEFT.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lorajax.variants import lora, options
from lorajax.variants.base import EVAL, Context, Target, Variant
from lorajax.variants.options import checks, option

INIT_CHOICES = ("xavier", "kaiming")
NAMES = ("hydra_par_A", "hydra_par_B", "hydra_seq_A", "hydra_seq_B")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: ``r_s``, the rank of the sequential branch; None: the target's rank ``r_p``
    seq_rank: int | None = option(None, checks.optional(checks.positive_int))
    #: ``s``, the scale of both branches (the Spec's ``alpha`` is not used; NLU code: 1, VTAB: per data set)
    scale: float = option(1.0, checks.finite)
    #: init of the down-projections: ``"xavier"`` (VTAB) or ``"kaiming"`` (NLU); up-projections are zero
    init_weights: str = option("xavier", checks.one_of(*INIT_CHOICES))
    #: adapter dtype; None: float32, or the weight's dtype if wider
    dtype: str | None = option(None, checks.dtype)


def seq_rank(t: Target) -> int:
    """``r_s``: the ``seq_rank`` option, or the target's rank."""
    return t.options.seq_rank or t.rank


def scale(t: Target) -> float:
    """``s``: the ``scale`` option."""
    return t.options.scale


def _down(key: jax.Array, fan_in: int, r: int, mode: str, dtype) -> jax.Array:
    """A down-projection ``[fan_in, r]`` (PyTorch ``[r, fan_in]`` transposed)."""
    bound = math.sqrt(6.0 / (fan_in + r)) if mode == "xavier" else 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, (fan_in, r), dtype, -bound, bound)


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``A_p: [in, r_p]``, ``A_s: [out, r_s]`` random; ``B_p: [r_p, out]``, ``B_s: [r_s, out]`` zero."""
    d_in, d_out = w.shape
    r_p, r_s = t.rank, seq_rank(t)
    if r_s > d_out:
        raise ValueError(
            f"hydra: seq_rank {r_s} is larger than out = {d_out} for {t.name!r} "
            f"(kernel viewed as {tuple(w.shape)}); lower seq_rank"
        )
    dtype = lora.adapter_dtype(t, w)
    mode = t.options.init_weights
    key_p, key_s = jax.random.split(key)
    return {
        "hydra_par_A": _down(key_p, d_in, r_p, mode, dtype),
        "hydra_par_B": jnp.zeros((r_p, d_out), dtype),
        "hydra_seq_A": _down(key_s, d_out, r_s, mode, dtype),
        "hydra_seq_B": jnp.zeros((r_s, d_out), dtype),
    }


def _factors(w: jax.Array, adapter: dict) -> tuple[jax.Array, ...]:
    a_p, b_p, a_s, b_s = (adapter[k] for k in NAMES)
    d_in, d_out = w.shape
    ok = (
        a_p.shape[0] == d_in
        and b_p.shape == (a_p.shape[1], d_out)
        and a_s.shape[0] == d_out
        and b_s.shape == (a_s.shape[1], d_out)
    )
    if not ok:
        raise ValueError(
            f"hydra needs hydra_par_A: [in, r_p], hydra_par_B: [r_p, out], hydra_seq_A: [out, r_s], "
            f"hydra_seq_B: [r_s, out] for a weight [in, out] = {w.shape}; got "
            f"{a_p.shape}, {b_p.shape}, {a_s.shape}, {b_s.shape}"
        )
    return a_p, b_p, a_s, b_s


def adapted(w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``W + s · (A_p B_p + W A_s B_s)`` in the weight's dtype."""
    a_p, b_p, a_s, b_s = _factors(w, adapter)
    s = scale(t)
    w32 = w.astype(a_p.dtype)
    return (w32 + s * (a_p @ b_p + (w32 @ a_s) @ b_s)).astype(w.dtype)


def unadapted(w_merged: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``W = M − s (M A_s)(I + s B_s A_s)⁻¹ B_s`` with ``M = W' − s A_p B_p`` (Woodbury)."""
    a_p, b_p, a_s, b_s = _factors(w_merged, adapter)
    s = scale(t)
    m = w_merged.astype(a_p.dtype) - s * (a_p @ b_p)
    core = jnp.eye(a_s.shape[1], dtype=a_s.dtype) + s * (b_s @ a_s)  # [r_s, r_s]
    z = m @ a_s  # [in, r_s]
    zc = jnp.linalg.solve(core.T, z.T).T  # z core⁻¹
    return (m - s * (zc @ b_s)).astype(w_merged.dtype)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + s (x A_p) B_p + s ((x W) A_s) B_s`` for ``x: [T, in]``; never forms a full-size product."""
    a_p, b_p, a_s, b_s = _factors(w, adapter)
    s = scale(t)
    y = x @ w
    par = (x.astype(a_p.dtype) @ a_p) @ b_p
    seq = (y.astype(a_s.dtype) @ a_s) @ b_s
    return y + (s * (par + seq)).astype(y.dtype)


def trainable_count(targets: list[Target]) -> int:
    """``Σ r_p · (in + out) + 2 · r_s · out``."""
    return sum(t.rank * sum(t.matrix_shape) + 2 * seq_rank(t) * t.matrix_shape[1] for t in targets)


VARIANT = Variant(
    name="hydra",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    options=Options,
    # No `Factors` although A_p, B_p enter only through s·A_p·B_p: a squeeze replaces the Spec's rank,
    # which is also the default seq_rank, so the squeezed Spec would no longer describe the adapters.
    trainable_count=trainable_count,
    doc=__doc__,
)
