"""PERK: test-time LoRA learning, meta-trained by differentiating through the inner loop.

PERK encodes a long context into a LoRA adapter by a few gradient steps on a
language-modelling loss over the context's chunks (the *inner loop*, run at
test time too), and meta-trains, by gradient through that inner loop, the
quantities the inner loop starts from (the *outer loop*): the LoRA's initial
value and the per-step inner learning rates. The outer loss is the adapted
model's loss on a question about the context (the context itself is not in
the prompt: it lives in the adapter). Base weights stay frozen throughout.

Pure functions over adapter pytrees (Flax layout ``lora_A: [in, r]``,
``lora_B: [r, out]``; any trainable adapter tree works)::

    meta = {"init": φ₀ (adapter tree), "log_lr": [T] or a tree like φ₀ of [T]}
    inner:  φ_{t+1} = φ_t − exp(log_lr_t) · u_t,   (u_t, s_{t+1}) = tx.update(∇ℓ(φ_t; c_t), s_t, φ_t)
    outer:  L(meta) = ℓ_Q(φ_T; question),   meta-gradient ∂L/∂meta = jax.grad through all T steps

``c_t`` is step ``t``'s batch of context chunks (`chunk_context`, `repeat_steps`), ``ℓ`` the
inner loss (`next_token_loss`: mean next-token cross-entropy), ``tx`` an optax transformation
giving the update *direction* (the learning rate is applied by PERK: ``exp(log_lr_t)``, one
scalar per step, or per step and per adapter leaf). The inner loop is one ``lax.scan`` over
the ``T`` steps (`inner_loop`); its state ``s`` is fresh for every context.

Meta-gradient options (`inner_loop`, `meta_loss`, `make_meta_step`):

* full (default): exact second-order gradient through every inner step.
* ``first_order=True``: each step's gradient ``∇ℓ(φ_t)`` (and so the optimiser's state)
  is treated as a constant (``stop_gradient``); the path ``φ_{t+1} = φ_t − lr·u`` stays
  differentiable. With a plain-SGD ``tx`` this gives the first-order MAML formula
  ``∂L/∂φ₀ = ∇ℓ_Q(φ_T)`` and ``∂L/∂log_lr_t = −lr_t ⟨u_t, ∇ℓ_Q(φ_T)⟩``.
* ``unroll_last=k``: the first ``T − k`` steps first-order, the last ``k`` exact (two
  scans); ``k = T`` is the full gradient, ``k = 0`` first-order. Memory of the second-order
  residuals scales with ``k``.
* ``remat=True``: each inner step is a ``jax.checkpoint`` — the backward pass keeps only the
  per-step carry ``(φ_t, s_t)`` and recomputes the step's activations; same gradient.

The model must be twice differentiable for the full/truncated gradient: with the lorajax
Llama use ``attention="dense"`` or ``"blockwise"`` (the fused CPU kernel has a first-order
custom VJP only).

Shapes: ``batches`` is any pytree whose leaves have a leading axis ``T`` (the inner steps),
e.g. ``{"input_ids": [T, N, S]}`` for ``N`` chunks of ``S`` tokens per step; ``log_lr`` is
``[T]`` (or a tree of ``[T]`` leaves); ``query`` is whatever the outer loss takes.

Example (a linear layer's LoRA, 3 inner SGD steps):
  >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, lorajax
  >>> from lorajax import perk
  >>> model = nn.Dense(4); x = jnp.ones((2, 8)); params = model.init(jax.random.key(0), x)
  >>> spec = lorajax.Spec("lora", rank=2, alpha=2, targets="all-linear")
  >>> fwd = lorajax.adapt(model.apply, spec)
  >>> loss = lambda a, b: jnp.mean((fwd(params, a, b["x"]) - b["y"]) ** 2)
  >>> meta = perk.init_meta(lorajax.init(spec, params, jax.random.key(1)), steps=3, lr=0.1)
  >>> batches = perk.repeat_steps({"x": x, "y": jnp.zeros((2, 4))}, 3)
  >>> adapted, losses = perk.inner_loop(loss, meta, batches, tx=optax.identity())
  >>> losses.shape, bool(losses[-1] < losses[0])
  ((3,), True)
  >>> g, _ = perk.meta_grad(loss, loss, meta, batches, {"x": x, "y": jnp.zeros((2, 4))}, tx=optax.identity())
  >>> g["log_lr"].shape
  (3,)

What was read and what is a lorajax choice (official code: github.com/eric11eca/perk at
commit 662a666, files ``perk/modules/meta_module.py``, ``perk/lslr_schedular.py``,
``perk/model.py``, ``perk/utils/data_utils.py``, ``configs/experiment/meta_train.yaml``;
the paper's text itself was not read):

* confirmed: the inner optimiser is AdamW with betas (0.9, 0.95) and weight decay
  (0.01 in ``meta_train.yaml``), freshly created for every context (`default_inner_tx`);
  LoRA (rsLoRA, r=256, α=16, all linear layers) is the only thing adapted in the inner
  loop; the outer optimiser (AdamW) trains the LoRA parameters (their initial value) and
  the inner learning rates (``LSLRSchedular``: one learning rate per adapter tensor and
  per inner iteration, initialised to ``inner_lr``; ``per_leaf=True`` in `init_meta`);
  the inner loss of one step is the LM loss over *all* context chunks as one batch
  (``get_features`` packs the chunks as independent segments; ``n_inner_iter=4`` steps),
  which `repeat_steps` builds; ``first_order`` detaches every inner gradient and the
  "truncated" inner function detaches the gradients of the first ``unroll_start`` of
  ``n_inner_iter`` steps and differentiates the rest (here ``unroll_last = T − unroll_start``);
  only gradients are detached, never the parameter path (higher's ``grad_callback``).
* differences (lorajax choices): learning rates are meta-learned as ``log_lr`` (positive by
  construction; the official learns the raw rates); Adam's second moment takes
  ``eps_root=1e-16`` inside the square root so that the second-order gradient is finite where
  a gradient entry is exactly zero (LoRA's ``B = 0`` init makes ``∂ℓ/∂A = 0`` at step 0);
  the official's token-weighting model (a small MLP on the last hidden states giving
  softplus per-token weights of the inner loss) is not built in — an inner loss with
  weights is the caller's (`next_token_loss` takes per-token ``weights``); LoRA dropout
  is off.
* UNVERIFIED: whether the official ever uses several inner steps per inner iteration
  (``inner_grad_accum > 1`` splits the chunks into groups at evaluation time); here every
  step has its own batch, so both are expressible.

References:
  Chen, Romanou, Weiss, Bosselut, "PERK: Long-Context Reasoning as Parameter-Efficient
  Test-Time Learning", arXiv:2507.06415 (2025); official code github.com/eric11eca/perk
  (``perk/modules/meta_module.py``: ``inner_loop_step``, ``truncated_inner_loop_step``,
  ``config_inner_optimizer``; ``perk/lslr_schedular.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorajax.train.losses import cross_entropy

__all__ = [
    "init_meta",
    "default_inner_tx",
    "chunk_context",
    "repeat_steps",
    "next_token_loss",
    "inner_loop",
    "meta_loss",
    "meta_grad",
    "make_meta_step",
]

LossFn = Callable[[Any, Any], jax.Array]


def init_meta(adapters: Any, steps: int, lr: float = 1e-3, *, per_leaf: bool = False) -> dict:
    """The meta-parameters ``{"init": adapters, "log_lr": ...}`` for ``steps`` inner steps.

    ``log_lr`` is ``full([steps], log(lr))``, or with ``per_leaf=True`` a tree like ``adapters``
    of such ``[steps]`` arrays (the official ``LSLRSchedular``: one rate per tensor and step).
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1 (the inner steps), got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0 (it is stored as log(lr)), got {lr!r}")
    if not jax.tree.leaves(adapters):
        raise ValueError("adapters is an empty tree: nothing to adapt (lorajax.init's output expected)")
    row = jnp.full((steps,), jnp.log(lr), jnp.float32)
    log_lr = jax.tree.map(lambda _: row, adapters) if per_leaf else row
    return {"init": adapters, "log_lr": log_lr}


def default_inner_tx(
    b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, eps_root: float = 1e-16, weight_decay: float = 0.01
) -> optax.GradientTransformation:
    """The official inner optimiser's direction: AdamW(β=(0.9, 0.95), wd=0.01) without its learning rate.

    ``u = m̂ / (sqrt(v̂ + eps_root) + eps) + weight_decay·φ``; PERK applies ``φ − lr·u`` (torch's
    AdamW: ``φ(1 − lr·wd) − lr·m̂/(sqrt(v̂) + eps)``, the same update). ``eps_root > 0`` keeps the
    meta-gradient finite at zero gradients.
    """
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root), optax.add_decayed_weights(weight_decay)
    )


def chunk_context(tokens_L: jax.Array, chunk_len: int) -> jax.Array:
    """``[L]`` context tokens -> ``[L // chunk_len, chunk_len]`` chunks (``L`` must be a multiple)."""
    tokens_L = jnp.asarray(tokens_L)
    if tokens_L.ndim != 1:
        raise ValueError(f"chunk_context takes one context [L]; got shape {tokens_L.shape}")
    if not isinstance(chunk_len, int) or chunk_len < 1 or tokens_L.shape[0] % chunk_len:
        raise ValueError(
            f"chunk_len={chunk_len!r} must be an int >= 1 dividing the context length {tokens_L.shape[0]}; "
            "pad the context"
        )
    return tokens_L.reshape(-1, chunk_len)


def repeat_steps(batch: Any, steps: int) -> Any:
    """The same batch for each of ``steps`` inner steps: every leaf ``[...]`` -> ``[steps, ...]``.

    The official setting: all context chunks as one batch, ``n_inner_iter`` steps on it.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (steps, *jnp.shape(x))), batch)


def next_token_loss(fwd: Callable, params: Any) -> LossFn:
    """``loss(adapters, batch)``: mean next-token cross-entropy of ``fwd(params, adapters, ids)``.

    ``fwd`` is ``lorajax.adapt(model.apply, spec)`` (logits ``[N, S, V]``), ``params`` the frozen
    base variables. ``batch = {"input_ids": [N, S] int, "weights": [N, S-1] (optional)}``: the loss
    is ``Σ w·CE / Σ w`` over the predicted tokens ``ids[:, 1:]`` (weights: e.g. 1 on an answer).
    """

    def loss(adapters: Any, batch: Any) -> jax.Array:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError(
                f"next_token_loss takes a batch {{'input_ids': [N, S], 'weights'?: [N, S-1]}}, got {batch!r:.80}"
            )
        ids = batch["input_ids"]
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise ValueError(f"input_ids must be [N, S] with S >= 2, got shape {ids.shape}")
        N, S = ids.shape
        w = batch.get("weights")
        w = jnp.ones((N, S - 1), jnp.float32) if w is None else w.astype(jnp.float32)
        if w.shape != (N, S - 1):
            raise ValueError(f"weights must be [N, S-1] = {(N, S - 1)}, got {w.shape}")
        logits = fwd(params, adapters, ids)[:, :-1]
        ce = cross_entropy(logits.reshape(N * (S - 1), -1), ids[:, 1:].reshape(-1)).reshape(N, S - 1)
        return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)

    return loss


# ------------------------------------------------------------------------------------------ checks
def _steps_of(batches: Any) -> int:
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError("batches is an empty tree: give each inner step's chunks with a leading [T] axis")
    shapes = [jnp.shape(x) for x in leaves]
    lead = {s[0] for s in shapes if s}
    if len(lead) != 1 or not all(shapes):
        raise ValueError(f"every leaf of batches needs the same leading inner-step axis T; got shapes {shapes}")
    (T,) = lead
    if T < 1:
        raise ValueError("batches has T = 0 inner steps")
    return int(T)


def _check_meta(meta: Any, T: int) -> None:
    if not isinstance(meta, dict) or set(meta) != {"init", "log_lr"}:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"meta must be {{'init': adapters, 'log_lr': ...}} (perk.init_meta); got {keys}")
    log_lr = meta["log_lr"]
    if hasattr(log_lr, "shape"):  # one rate per step, shared by the leaves
        if jnp.shape(log_lr) != (T,):
            raise ValueError(
                f"meta['log_lr'] has shape {jnp.shape(log_lr)}; batches has T = {T} inner steps: need ({T},)"
            )
        return
    if str(jax.tree.structure(log_lr)) != str(jax.tree.structure(meta["init"])):
        raise ValueError(
            "meta['log_lr'] must be a [T] array or a tree like meta['init'] of [T] arrays (init_meta per_leaf)"
        )
    for path, x in jax.tree_util.tree_leaves_with_path(log_lr):
        if jnp.shape(x) != (T,):
            name = jax.tree_util.keystr(path)
            raise ValueError(
                f"meta['log_lr']{name} has shape {jnp.shape(x)}; batches has T = {T} inner steps: need ({T},)"
            )


def _slice(tree: Any, lo: int, hi: int) -> Any:
    return jax.tree.map(lambda x: x[lo:hi], tree)


def _scalar(loss: jax.Array, what: str) -> jax.Array:
    if jnp.shape(loss) != ():
        raise ValueError(f"the {what} loss must return a scalar, got shape {jnp.shape(loss)}")
    return loss


# ------------------------------------------------------------------------------------------ loops
def inner_loop(
    loss_fn: LossFn,
    meta: dict,
    batches: Any,
    *,
    tx: optax.GradientTransformation | None = None,
    first_order: bool = False,
    unroll_last: int | None = None,
    remat: bool = False,
) -> tuple[Any, jax.Array]:
    """Run the ``T`` inner steps from ``meta["init"]``: returns ``(φ_T, losses [T])``.

    ``loss_fn(adapters, batch_t) -> scalar``; ``batches``: leaves ``[T, ...]``; ``tx``: the update
    direction (`default_inner_tx` when None; ``optax.identity()`` is SGD); step ``t`` applies
    ``φ − exp(log_lr_t)·u``. ``losses[t] = ℓ(φ_t; c_t)`` (before step ``t``). ``first_order``,
    ``unroll_last`` and ``remat`` only change the gradient taken through this function (module
    docstring).
    """
    tx = default_inner_tx() if tx is None else tx
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"tx must be an optax GradientTransformation, got {type(tx).__name__}")
    T = _steps_of(batches)
    _check_meta(meta, T)
    if first_order and unroll_last is not None:
        raise ValueError("give first_order=True or unroll_last=k, not both (first_order is unroll_last=0)")
    if unroll_last is None:
        unroll_last = 0 if first_order else T
    if not isinstance(unroll_last, int) or isinstance(unroll_last, bool) or not 0 <= unroll_last <= T:
        raise ValueError(f"unroll_last must be an int in [0, T={T}] (exact steps at the end), got {unroll_last!r}")

    init = meta["init"]
    log_lr = meta["log_lr"]
    per_leaf = not hasattr(log_lr, "shape")

    def make_step(detach: bool) -> Callable:
        def step(carry, xs):
            phi, state = carry
            batch, lr_t = xs
            loss, g = jax.value_and_grad(lambda p: _scalar(loss_fn(p, batch), "inner"))(phi)
            if detach:
                g = jax.lax.stop_gradient(g)
            u, state = tx.update(g, state, phi)
            rates = lr_t if per_leaf else jax.tree.map(lambda _: lr_t, phi)
            phi = jax.tree.map(lambda p, d, r: p - jnp.exp(r).astype(p.dtype) * d, phi, u, rates)
            return (phi, state), loss

        return jax.checkpoint(step) if remat else step

    carry = (init, tx.init(init))
    cut = T - unroll_last
    losses = []
    for lo, hi, detach in ((0, cut, True), (cut, T, False)):
        if hi > lo:
            carry, part = jax.lax.scan(make_step(detach), carry, (_slice(batches, lo, hi), _slice(log_lr, lo, hi)))
            losses.append(part)
    return carry[0], jnp.concatenate(losses)


def meta_loss(
    inner_loss: LossFn,
    outer_loss: LossFn,
    meta: dict,
    batches: Any,
    query: Any,
    **inner_kw: Any,
) -> tuple[jax.Array, dict]:
    """``(ℓ_Q(φ_T; query), {"inner_losses": [T], "outer_loss": ...})`` with ``φ_T = inner_loop(...)``.

    ``inner_kw``: `inner_loop`'s ``tx``, ``first_order``, ``unroll_last``, ``remat``.
    """
    adapted, losses = inner_loop(inner_loss, meta, batches, **inner_kw)
    loss = _scalar(outer_loss(adapted, query), "outer")
    return loss, {"inner_losses": losses, "outer_loss": loss}


def meta_grad(
    inner_loss: LossFn, outer_loss: LossFn, meta: dict, batches: Any, query: Any, **inner_kw: Any
) -> tuple[dict, dict]:
    """``(∂ℓ_Q/∂meta (a tree like meta), aux)``: `jax.grad` of `meta_loss` through the inner loop."""
    return jax.grad(lambda m: meta_loss(inner_loss, outer_loss, m, batches, query, **inner_kw), has_aux=True)(meta)


def make_meta_step(
    inner_loss: LossFn,
    outer_loss: LossFn,
    outer_tx: optax.GradientTransformation,
    *,
    batched: bool = False,
    **inner_kw: Any,
) -> Callable:
    """A jitted outer step ``(meta, opt_state, batches, query) -> (meta, opt_state, metrics)``.

    With ``batched=True``, ``batches``/``query`` carry a leading task axis ``[B, ...]`` (``B`` contexts
    per outer step) and the meta-gradient is the mean over it (``vmap``). ``opt_state =
    outer_tx.init(meta)``; ``inner_kw``: `inner_loop`'s options. Metrics: ``outer_loss``, ``inner_losses
    [T]`` (means over the tasks).
    """
    if not (hasattr(outer_tx, "init") and hasattr(outer_tx, "update")):
        raise TypeError(f"outer_tx must be an optax GradientTransformation, got {type(outer_tx).__name__}")

    def one(meta, batches, query):
        return meta_grad(inner_loss, outer_loss, meta, batches, query, **inner_kw)

    @jax.jit
    def step(meta, opt_state, batches, query):
        if batched:
            g, aux = jax.vmap(one, in_axes=(None, 0, 0))(meta, batches, query)
            g, aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), (g, aux))
        else:
            g, aux = one(meta, batches, query)
        updates, opt_state = outer_tx.update(g, opt_state, meta)
        return optax.apply_updates(meta, updates), opt_state, aux

    return step
