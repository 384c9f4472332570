"""FlyLoRA: a frozen sparse random down-projection with rank-wise top-k routing.

Each rank of the update is an "expert". A frozen, sparse, random ``A`` scores
the ranks for every token; only the ``k`` ranks with the highest (signed)
score plus a routing bias pass through the trainable ``B``. The routing bias
is not trained: after a batch, ranks chosen more often than average are pushed
down and the others up (auxiliary-loss-free load balancing).

Maths (Flax orientation, kernel ``W: [in, out]``, ``y = x W``; ``x: [T, in]``)::

    a = stop_gradient(x A)                     [T, r]   A = lora_A frozen
    I_t = top_k(a_t + d, k)                    k rank indices per token t
    m_t,i = 1 if i ∈ I_t else 0                [T, r]   exactly k ones per row
    y = x W + s · (a ⊙ m) B                    B = lora_B: [r, out]
    s = α / r   (``use_rslora=True``: α / √r)

    load balancing (`update`, with c_i = #{t : i ∈ I_t} = aux["counts"]):
    d ← d + u · sign(mean(c) − c)              d = lora_topk_bias: [r], u = bias_u

No gradient flows into ``x`` (or ``A``) through the adapter branch (the fork
computes ``a`` under ``torch.no_grad``); ``B`` gets its gradient through the
kept activations. The mask depends on the input, so the update cannot be
merged into ``W`` (``adapted=None``: factored mode only).

Shapes and init (``init``):

* ``lora_A: [in, r]`` frozen; each rank (column) has exactly
  ``p = in // (r // k)`` nonzeros at positions drawn independently per rank,
  values ``N(0, 1/r²)`` (the fork's ``init_lora_weights="sparse"`` on
  ``lora_A.weight: [r, in]``, transposed). Density ≈ ``k / r``.
* ``lora_B: [r, out]`` zeros, trainable, so the model is unchanged at init.
* ``lora_topk_bias: [r]`` zeros, frozen (float32), refreshed by `update`.

``apply`` returns ``y`` and hands ``{"counts": float32[r]}`` to
``ctx.sow``; ``counts`` adds up over calls and batches. Get it with ``lorajax.adapt(..., aux=True)(params,
adapters, x) -> (out, aux)``; `lorajax.update_state` applies ``update``
(in training: ``lorajax.train.make_lora_step(..., state_update=
lorajax.train.refresh_state(spec))``).

Options:

* ``top_k`` (default ``None`` = ``max(1, r // 4)``, i.e. the paper's ratio
  ``k / r = 8 / 32`` at any rank; ``r = 32`` gives the paper's ``k = 8``): an
  explicit value must satisfy ``1 <= k <= r`` for every target (checked at
  ``init``, naming the target). ``r % k == 0`` is not required (the fork does
  not require it; ``p`` then uses ``r // k`` rounded down, as in the fork).
* ``bias_u`` (default 0.001, the paper's MMLU script; the fork's config
  default is 0.01): the bias step ``u``.
* ``use_rslora`` (default False), ``dtype`` (adapter dtype, default float32
  or the weight's dtype if wider).

Decisions (spec §5): the fork's PEFT code is ported, not the minimal
``flylora.py`` (which ranks ``|a + d|``, uses another density and another
bias rule). The fork updates the bias after every forward, evaluation
included; here the bias changes only when `lorajax.update_state` is called
(the train step), so evaluation never changes the adapter. Dropout on the
adapter input is not implemented (the paper's scripts use 0). The paper's
multi-task merge (element-wise mean of several adapters' tensors) is plain
tree arithmetic on adapters made with the same init key.

Trainable per target: ``r · out`` (``B``); frozen: ``in · r + r``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((16, 12))}}
  >>> spec = lorajax.Spec("flylora", rank=8, alpha=16, targets=["dense"], top_k=2)
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> ad = adapters["dense"]["kernel"]
  >>> ad["lora_A"].shape, ad["lora_B"].shape, ad["lora_topk_bias"].shape
  ((16, 8), (8, 12), (8,))
  >>> [int(n) for n in (ad["lora_A"] != 0).sum(axis=0)]  # p = 16 // (8 // 2)
  [4, 4, 4, 4, 4, 4, 4, 4]
  >>> from lorajax.variants import flylora
  >>> from lorajax.variants.base import Context
  >>> t = lorajax.select(spec, params)[0]
  >>> stats = []
  >>> y = flylora.apply(jnp.ones((3, 16)), params["dense"]["kernel"], ad, t, Context(sink=stats.append))
  >>> y.shape, float(stats[0]["counts"].sum())  # 3 tokens x k = 2 ranks
  ((3, 12), 6.0)

References:
  Zou et al., "FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via
  Implicit Rank-Wise Mixture-of-Experts", NeurIPS 2025,
  https://openreview.net/forum?id=nGQLYn13Xf.
  Official code gfyddha/FlyLoRA (commit 91d9e367): the PEFT fork
  ``peft/src/peft/tuners/lora/layer.py`` (``reset_lora_parameters`` "sparse",
  ``Linear.forward``, lines marked "modified"), ``finetune.py``,
  ``scripts/run_mmlu.sh``; the minimal ``flylora.py`` differs (see above).
  Load balancing: Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy
  for Mixture-of-Experts", arXiv:2408.15664. Not in PEFT.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lorajax.variants import options
from lorajax.variants.base import EVAL, Context, Target, Variant, balance_bias
from lorajax.variants.base import scaling as base_scaling
from lorajax.variants.options import checks, option

#: Default ``k / r`` when ``top_k`` is None (the paper's 8 of 32).
DEFAULT_RATIO = 4


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: ``k``, the active ranks per token; None: ``max(1, r // 4)`` (the paper's 8 of 32);
    #: an explicit value must be ``<= r`` for every target (checked at init)
    top_k: int | None = option(None, checks.optional(checks.positive_int))
    #: ``u``, the routing bias step of the load balancing (the paper's MMLU script; the fork's config: 0.01)
    bias_u: float = option(0.001, checks.nonneg)
    #: scale ``α/√r`` (rsLoRA) instead of ``α/r``
    use_rslora: bool = option(False, checks.boolean)
    #: adapter dtype; None: float32, or the weight's dtype if wider
    dtype: str | None = option(None, checks.dtype)


def top_k(t: Target) -> int:
    """The number of active ranks ``k`` for target ``t`` (validated against its rank)."""
    k = t.options.top_k
    if k is None:
        return max(1, t.rank // DEFAULT_RATIO)
    if k > t.rank:
        raise ValueError(f"flylora at {t.name}: top_k={k} must be <= rank {t.rank}")
    return k


def nonzeros_per_rank(d_in: int, t: Target) -> int:
    """``p = in // (r // k)``: nonzeros in each column of ``lora_A`` (the fork's rule)."""
    return d_in // (t.rank // top_k(t))


def scaling(t: Target) -> float:
    """``α / r``, or ``α / √r`` with ``use_rslora``."""
    return base_scaling(t.alpha, t.rank, t.options.use_rslora)


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"lora_A": [in, r] sparse frozen, "lora_B": [r, out] = 0, "lora_topk_bias": [r] = 0}``."""
    d_in, d_out = w.shape
    r = t.rank
    p = nonzeros_per_rank(d_in, t)
    dtype = jnp.dtype(t.options.dtype or jnp.promote_types(w.dtype, jnp.float32))
    key_pos, key_val = jax.random.split(key)
    # p distinct input positions per rank: the first p of a random permutation of each column
    order = jnp.argsort(jax.random.uniform(key_pos, (d_in, r)), axis=0)
    position = jnp.argsort(order, axis=0)  # position of each input in its column's permutation
    mask = position < p
    a = jnp.where(mask, jax.random.normal(key_val, (d_in, r), dtype) / r, jnp.zeros((), dtype))
    return {
        "lora_A": a,
        "lora_B": jnp.zeros((r, d_out), dtype),
        "lora_topk_bias": jnp.zeros((r,), jnp.float32),
    }


def route(a: jax.Array, bias: jax.Array, k: int) -> jax.Array:
    """``m: [T, r]``, 1 at the ``k`` largest ``a + d`` of each row (signed scores), else 0."""
    score = a.astype(jnp.float32) + bias.astype(jnp.float32)[None, :]
    _, idx = jax.lax.top_k(score, k)  # [T, k]
    rows = jnp.arange(a.shape[0])[:, None]
    return jnp.zeros(a.shape, a.dtype).at[rows, idx].set(1)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + s · (a ⊙ m) B`` for ``x: [T, in]``, ``a = stop_gradient(x A)``; sows ``{"counts": [r]}``."""
    a_k, b_k = adapter["lora_A"], adapter["lora_B"]
    y = x @ w
    a = jax.lax.stop_gradient(x.astype(a_k.dtype) @ a_k)
    m = route(a, adapter["lora_topk_bias"], top_k(t))
    ctx.sow({"counts": jnp.sum(m, axis=0).astype(jnp.float32)})
    return y + (scaling(t) * ((a * m) @ b_k)).astype(y.dtype)


#: ``{"lora_topk_bias": d + u · sign(mean(c) − c)}`` with ``c = aux["counts"]``, ``u = bias_u``
update = balance_bias("lora_topk_bias", "bias_u")


def trainable_count(targets: list[Target]) -> int:
    """``Σ r · out`` (``B`` only)."""
    return sum(t.rank * t.matrix_shape[1] for t in targets)


VARIANT = Variant(
    name="flylora",
    init=init,
    adapted=None,
    apply=apply,
    update=update,
    options=Options,
    buffers=("lora_A", "lora_topk_bias"),
    # no `Factors`: the routing mask depends on A (and A is a buffer)
    trainable_count=trainable_count,
    doc=__doc__,
)
