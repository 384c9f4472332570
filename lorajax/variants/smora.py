"""SMoRA: single-ranked mixture of experts LoRA (each rank is an expert).

A sigmoid router scores the ranks of a LoRA update for every token; the
``k`` best (after adding a non-trained load-balancing bias) are kept, their
gate values normalised to sum 1, and only those ranks contribute.

Maths (Flax orientation, kernel ``W: [in, out]``, ``y = x W``; ``x: [T, in]``;
``a_i`` = column ``i`` of ``A``, ``b_i`` = row ``i`` of ``B``)::

    g   = sigmoid(x G)                          [T, r/p]   G = lora_router: [in, r/p]
    g⁺  = repeat(g, p, axis=1) + β              [T, r]     each router entry covers p adjacent ranks
    (v, I) = top_k(g⁺, k)                       kept values INCLUDE β
    ĝ_i = v_i / Σ_j v_j  for i ∈ I, else 0      Σ_i ĝ_i = 1
    y   = x W + α · Σ_{i ∈ I} ĝ_i (x a_i) b_i
        = x W + α · ((x A) ⊙ ĝ) B               A = lora_A: [in, r], B = lora_B: [r, out]

    load balancing (`update`, c_i = #{t : i ∈ I_t} = aux["counts"]):
    β ← β + u · sign(mean(c) − c)              β = lora_biases: [r], u = bias_update_rate

The official code scales by ``α / k`` and multiplies the gates by ``k``; the
product is the ``α · ĝ`` above. Gradients reach ``G`` through the kept gate
values (the selection itself is not differentiated), ``A`` and ``B`` as in
LoRA. The gates depend on the input, so the update cannot be merged
(``adapted=None``: factored mode only).

Two equal computations (option ``dense_compute``): ``True`` (default) forms
``ĝ: [T, r]`` and uses two dense matmuls (the official ``dense_compute=True``
einsum path, without its ``[T, out, r]`` intermediate); ``False`` gathers the
``k`` selected columns of ``A`` and rows of ``B`` per token (``[T, k, in]``
and ``[T, k, out]``: cheaper only when ``k ≪ r``; the official default runs
custom TVM kernels for this).

Shapes and init (``init``), PEFT-style ``[out, in]`` weights transposed:

* ``lora_A: [in, r]`` ~ ``U(±1/√in)`` (kaiming-uniform, a=√5), trainable.
* ``lora_B: [r, out]`` zeros, trainable, so the model is unchanged at init.
* ``lora_router: [in, r/p]`` ~ ``U(±1/√in)`` (``nn.Linear``'s default), trainable.
* ``lora_biases: [r]`` zeros (float32), frozen, refreshed by `update`.

``apply`` returns ``y`` and hands ``{"counts": float32[r]}`` to
``ctx.sow``; ``counts`` adds up over calls and batches. Get it with ``lorajax.adapt(..., aux=True)(params,
adapters, x) -> (out, aux)``; `lorajax.update_state` applies ``update``
(in training: ``lorajax.train.make_lora_step(..., state_update=
lorajax.train.refresh_state(spec))``).

Options:

* ``activate_r`` (``k``; default ``None`` = ``min(8, r)``, the official
  default 8 where the rank allows it): an explicit value must satisfy
  ``1 <= k <= r`` for every target (checked at ``init``, naming the target).
  With ``k = 1`` the single gate is always 1, so the router gets no gradient
  (as in the official code).
* ``rank_partition`` (``p``, default 1: every rank its own expert): must
  divide the rank of every target (checked at ``init``).
* ``bias_update_rate`` (``u``, default 1e-5, official).
* ``dense_compute`` (default True), ``dtype`` (adapter dtype, default
  float32 or the weight's dtype if wider).

Decisions (spec §10a): the official ``layer.py`` imports a ``topk`` module
missing from the repository and returns inside its adapter loop; neither
matters for one adapter. The official bias update runs in training
forwards only; here it runs when `lorajax.update_state` is called (the train
step). Ties in ``g⁺`` (adjacent ranks with ``p > 1`` before the biases
differ) go to the lower rank index (``jax.lax.top_k``); torch's ``topk``
does not document its tie order. Dropout on the adapter input is not
implemented. ``epsilon_greedy`` is unused by the official forward and is
not an option here.

Trainable per target: ``r · (in + out) + (r / p) · in``; frozen: ``r``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from lorajax.variants import smora
  >>> params = {"dense": {"kernel": jnp.ones((16, 6))}}
  >>> spec = lorajax.Spec("smora", rank=4, alpha=16, targets=["dense"], activate_r=2)
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> ad = adapters["dense"]["kernel"]
  >>> {k: v.shape for k, v in sorted(ad.items())}
  {'lora_A': (16, 4), 'lora_B': (4, 6), 'lora_biases': (4,), 'lora_router': (16, 4)}
  >>> from lorajax.variants.base import Context
  >>> t = lorajax.select(spec, params)[0]
  >>> stats = []
  >>> y = smora.apply(jnp.ones((3, 16)), params["dense"]["kernel"], ad, t, Context(sink=stats.append))
  >>> y.shape, float(stats[0]["counts"].sum())  # 3 tokens x k = 2 ranks
  ((3, 6), 6.0)

References:
  Zhao et al., "Each Rank Could be an Expert: Single-Ranked Mixture of Experts
  LoRA for Multi-Task Learning" (SMoRA), arXiv:2501.15103. Official code
  StyxXuan/smora (commit 7e7ada17): ``packages/peft/src/peft/tuners/srmole/
  layer.py`` (``SRMoLELayer.update_layer``, ``SRMoLELinear.forward``),
  ``srmole/config.py``, ``scripts/traing_configs/config_flan/llama2_7b/
  llama2_7b_lora_srmole.yaml``. Load balancing: Wang et al.,
  "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
  arXiv:2408.15664. Not in PEFT.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lorajax.variants import options
from lorajax.variants.base import EVAL, Context, Target, Variant, balance_bias
from lorajax.variants.options import checks, option

#: Official default number of active ranks.
DEFAULT_ACTIVE = 8


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: ``k``, the active ranks per token; None: ``min(8, r)`` (the official 8 where the rank allows);
    #: an explicit value must be ``<= r`` for every target (checked at init)
    activate_r: int | None = option(None, checks.optional(checks.positive_int))
    #: ``p``, adjacent ranks per router entry (1: every rank its own expert); must divide every rank
    rank_partition: int = option(1, checks.positive_int)
    #: ``u``, the routing bias step of the load balancing (official)
    bias_update_rate: float = option(1e-5, checks.nonneg)
    #: True: two dense matmuls with the ``[T, r]`` gates; False: gather the ``k`` ranks per token
    dense_compute: bool = option(True, checks.boolean)
    #: adapter dtype; None: float32, or the weight's dtype if wider
    dtype: str | None = option(None, checks.dtype)


def activate_r(t: Target) -> int:
    """``k`` for target ``t`` (validated against its rank)."""
    k = t.options.activate_r
    if k is None:
        return min(DEFAULT_ACTIVE, t.rank)
    if k > t.rank:
        raise ValueError(f"smora at {t.name}: activate_r={k} must be <= rank {t.rank}")
    return k


def rank_partition(t: Target) -> int:
    """``p`` for target ``t``: it must divide the rank."""
    p = t.options.rank_partition
    if t.rank % p:
        raise ValueError(f"smora at {t.name}: rank_partition={p} must divide rank {t.rank}")
    return p


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``lora_A: [in, r]``, ``lora_B: [r, out] = 0``, ``lora_router: [in, r/p]``, ``lora_biases: [r] = 0``."""
    d_in, d_out = w.shape
    r, p = t.rank, rank_partition(t)
    activate_r(t)  # validate k against the rank now
    dtype = jnp.dtype(t.options.dtype or jnp.promote_types(w.dtype, jnp.float32))
    key_a, key_g = jax.random.split(key)
    bound = 1.0 / math.sqrt(d_in)
    return {
        "lora_A": jax.random.uniform(key_a, (d_in, r), dtype, -bound, bound),
        "lora_B": jnp.zeros((r, d_out), dtype),
        "lora_router": jax.random.uniform(key_g, (d_in, r // p), dtype, -bound, bound),
        "lora_biases": jnp.zeros((r,), jnp.float32),
    }


def select(x: jax.Array, adapter: dict, t: Target) -> tuple[jax.Array, jax.Array]:
    """``(ĝ_I: [T, k], I: [T, k])``: the kept ranks of each token and their normalised gates (sum 1)."""
    g_k = adapter["lora_router"]
    g = jax.nn.sigmoid(x.astype(g_k.dtype) @ g_k)
    g = jnp.repeat(g, rank_partition(t), axis=1)
    score = g + adapter["lora_biases"].astype(g.dtype)[None, :]
    v, idx = jax.lax.top_k(score, activate_r(t))
    return v / jnp.sum(v, axis=1, keepdims=True), idx


def gates(x: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``ĝ: [T, r]``: k nonzero entries per row, summing to 1."""
    g_sel, idx = select(x, adapter, t)
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.zeros((x.shape[0], t.rank), g_sel.dtype).at[rows, idx].set(g_sel)


def _counts(idx: jax.Array, r: int) -> jax.Array:
    return jnp.zeros((r,), jnp.float32).at[idx.reshape(-1)].add(1.0)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + α · ((x A) ⊙ ĝ) B`` for ``x: [T, in]``; sows ``{"counts": [r]}``."""
    a_k, b_k = adapter["lora_A"], adapter["lora_B"]
    y = x @ w
    xa = x.astype(a_k.dtype)
    g_sel, idx = select(x, adapter, t)
    if t.options.dense_compute:
        rows = jnp.arange(x.shape[0])[:, None]
        g = jnp.zeros((x.shape[0], t.rank), g_sel.dtype).at[rows, idx].set(g_sel)
        delta = ((xa @ a_k) * g) @ b_k
    else:
        a_sel = jnp.take(a_k.T, idx, axis=0)  # [T, k, in]
        b_sel = jnp.take(b_k, idx, axis=0)  # [T, k, out]
        h = jnp.einsum("ti,tki->tk", xa, a_sel)
        delta = jnp.einsum("tk,tko->to", h * g_sel, b_sel)
    ctx.sow({"counts": _counts(idx, t.rank)})
    return y + (t.alpha * delta).astype(y.dtype)


#: ``{"lora_biases": β + u · sign(mean(c) − c)}`` with ``c = aux["counts"]``, ``u = bias_update_rate``
update = balance_bias("lora_biases", "bias_update_rate")


def trainable_count(targets: list[Target]) -> int:
    """``Σ r · (in + out) + (r / p) · in`` (``A``, ``B`` and the router)."""
    return sum(t.rank * sum(t.matrix_shape) + (t.rank // t.options.rank_partition) * t.matrix_shape[0] for t in targets)


VARIANT = Variant(
    name="smora",
    init=init,
    adapted=None,
    apply=apply,
    update=update,
    options=Options,
    buffers=("lora_biases",),
    # no `Factors`: the per-token gates sit between A and B
    trainable_count=trainable_count,
    doc=__doc__,
)
