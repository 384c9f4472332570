"""Trans-LoRA: move a LoRA to another base model without the task data: generate → filter → distil.

Paper: R. Wang et al., "Trans-LoRA: towards data-free Transferable Parameter Efficient
Finetuning", NeurIPS 2024 (arXiv:2405.17258). Spec: ``../shared/specs/adapters.md`` §14. A
training recipe, not a parameterisation: the teacher is the source base with its trained adapter,
the student a fresh adapter (any lorajax variant) on the target base.

1. **Generate** (`sample`): synthetic sequences sampled autoregressively from a generator
   ``logits_fn(ids [B, L]) -> [B, L, V]`` (e.g. the teacher) continuing a few real prompts, at a
   softmax temperature; a causal model over a fixed-length buffer, one compile.
2. **Filter** (`fit_discriminator`, `p_real`, `keep`): a discriminator trained to tell the few
   real samples from synthetic ones; synthetic samples it scores as real (``p_real >= threshold``)
   are kept. Here logistic regression (L2, standardised inputs) on mean-pooled hidden states
   (`mean_pool`) of a feature model.
3. **Distil** (`kl_loss`, `distil`): the student adapter is trained on the kept samples to match the
   teacher's next-token distributions, ``L = τ² · mean_tokens KL(softmax(z_T/τ) ‖ softmax(z_S/τ))``,
   the teacher's logits under ``stop_gradient``; `lorajax.train.make_lora_step` does the steps.

With teacher base == student base and the same variant and rank, the student can represent the
teacher exactly, so distillation drives the KL towards 0 (tested).

UNVERIFIED (no official code found: a search of the stored code index for "Trans-LoRA" found only a
NeurIPS-2024 poster summary, deep-diver/neurips2024 ``content/posters/c3Pakdyi3t/index.md``, read
2026-12-05; the paper text was not read): the generator (the paper prompts an LLM with the few real
samples; here any ``logits_fn``, in the experiment the teacher continuing real prompts), the
discriminator (the paper trains one on the source model; here logistic regression on mean-pooled
hidden states), the filter threshold, and the distillation loss (here forward KL on every position
at τ = 1; the paper's loss form and positions are not confirmed).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorajax.adapters import combine, partition
from lorajax.spec import Spec
from lorajax.train import TrainState, make_lora_step

__all__ = ["sample", "mean_pool", "fit_discriminator", "p_real", "keep", "kl_loss", "distil"]


def sample(
    logits_fn: Callable[[jax.Array], jax.Array],
    prompts_BxP: Any,
    n_new: int,
    key: jax.Array,
    *,
    temperature: float = 1.0,
) -> jax.Array:
    """``[B, P + n_new]``: the prompts continued by ``n_new`` tokens drawn from ``softmax(logits / temperature)``.

    ``logits_fn`` must be causal (position ``j`` sees tokens ``<= j``): the buffer's not-yet-drawn tail is zeros.
    """
    prompts = jnp.asarray(prompts_BxP)
    if prompts.ndim != 2 or prompts.shape[1] < 1 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"sample: prompts must be [B, P>=1] integer ids, got {prompts.shape} {prompts.dtype}")
    if n_new < 1 or not temperature > 0:
        raise ValueError(f"sample: n_new must be >= 1 and temperature > 0, got {n_new} and {temperature}")
    B, P = prompts.shape
    buf = jnp.concatenate([prompts, jnp.zeros((B, n_new), prompts.dtype)], axis=1)

    def body(j, buf):
        logits = jax.lax.dynamic_index_in_dim(logits_fn(buf), j - 1, axis=1, keepdims=False)
        tok = jax.random.categorical(jax.random.fold_in(key, j), logits.astype(jnp.float32) / temperature)
        return jax.lax.dynamic_update_index_in_dim(buf, tok.astype(buf.dtype)[:, None], j, axis=1)

    return jax.lax.fori_loop(P, P + n_new, body, buf)


def mean_pool(hidden_BxSxD: jax.Array) -> jax.Array:
    """``[B, D]``: the mean over positions (every position is a real token here)."""
    return hidden_BxSxD.astype(jnp.float32).mean(axis=1)


def fit_discriminator(
    real_NxD: Any, synthetic_MxD: Any, *, l2: float = 1e-2, steps: int = 300, learning_rate: float = 0.05
) -> dict:
    """Logistic regression real (1) vs synthetic (0): ``{"w": [D], "b": [], "mu": [D], "sd": [D]}``, class-balanced
    cross-entropy + ``l2 |w|²``, Adam full-batch."""
    r, s = jnp.asarray(real_NxD, jnp.float32), jnp.asarray(synthetic_MxD, jnp.float32)
    if r.ndim != 2 or s.ndim != 2 or r.shape[1] != s.shape[1] or r.shape[0] < 1 or s.shape[0] < 1:
        raise ValueError(f"fit_discriminator: need [N>=1, D] real and [M>=1, D] synthetic features, got {r.shape}, "
                         f"{s.shape}")  # fmt: skip
    x = jnp.concatenate([r, s])
    mu, sd = x.mean(0), jnp.maximum(x.std(0), 1e-6)
    xr, xs = (r - mu[None, :]) / sd[None, :], (s - mu[None, :]) / sd[None, :]
    p = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
    tx = optax.adam(learning_rate)

    def loss(p):
        lr_, ls_ = xr @ p["w"] + p["b"], xs @ p["w"] + p["b"]
        return -0.5 * (jax.nn.log_sigmoid(lr_).mean() + jax.nn.log_sigmoid(-ls_).mean()) + l2 * jnp.sum(p["w"] ** 2)

    def step(carry, _):
        p, st = carry
        u, st = tx.update(jax.grad(loss)(p), st, p)
        return (optax.apply_updates(p, u), st), None

    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
    return {**p, "mu": mu, "sd": sd}


def p_real(disc: dict, feats_NxD: Any) -> jax.Array:
    """``[N]`` the discriminator's probability that each sample is real."""
    f = jnp.asarray(feats_NxD, jnp.float32)
    if f.ndim != 2 or f.shape[1] != disc["w"].shape[0]:
        raise ValueError(f"p_real: features must be [N, {disc['w'].shape[0]}], got {f.shape}")
    return jax.nn.sigmoid(((f - disc["mu"][None, :]) / disc["sd"][None, :]) @ disc["w"] + disc["b"])


def keep(disc: dict, samples_NxL: Any, feats_NxD: Any, threshold: float = 0.5) -> np.ndarray:
    """The synthetic samples the discriminator scores as real (``p_real >= threshold``), as a host array."""
    mask = np.asarray(p_real(disc, feats_NxD)) >= threshold
    if not mask.any():
        raise ValueError(
            f"Trans-LoRA filter kept none of {mask.size} synthetic samples at threshold {threshold}: lower the "
            "threshold or generate more samples"
        )
    return np.asarray(samples_NxL)[mask]


def kl_loss(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``τ² · mean over positions of KL(softmax(t/τ) ‖ softmax(s/τ))`` for logits ``[..., V]``."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"kl_loss: teacher logits {teacher_logits.shape} and student {student_logits.shape} differ")
    lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return temperature**2 * jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1))


def distil(
    student_fwd: Callable[[Any, Any, jax.Array], jax.Array],
    student_params: Any,
    spec: Spec,
    adapters: Any,
    teacher_logits_fn: Callable[[jax.Array], jax.Array],
    samples_NxL: Any,
    tx: optax.GradientTransformation,
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
    temperature: float = 1.0,
) -> tuple[Any, list[float]]:
    """Train the student ``adapters`` (made with ``spec`` on ``student_params``) on the kept samples.

    ``student_fwd(params, adapters, ids) -> logits [B, L, V]`` (e.g. `lorajax.adapt` of the student model);
    ``teacher_logits_fn(ids) -> [B, L, V]`` (same vocabulary). Batches are drawn uniformly without replacement
    per step from ``samples [N, L]`` with ``numpy.random.default_rng(seed)``. Returns ``(adapters, losses)``.
    """
    samples = np.asarray(samples_NxL)
    if samples.ndim != 2 or samples.shape[0] < 1:
        raise ValueError(f"distil: no samples to distil on (got shape {samples.shape})")
    if steps < 1 or not 1 <= batch_size:
        raise ValueError(f"distil: steps and batch_size must be >= 1, got {steps} and {batch_size}")

    def loss_fn(params, combined, ids):
        t = jax.lax.stop_gradient(teacher_logits_fn(ids))
        return kl_loss(t, student_fwd(params, combined, ids), temperature)

    trainable, frozen = jax.tree.map(jnp.array, partition(spec, adapters))  # copies: the step donates its state
    state = TrainState.create(tx, trainable, frozen)
    step = make_lora_step(loss_fn, tx)
    rng = np.random.default_rng(seed)
    b = min(batch_size, samples.shape[0])
    losses = []
    for _ in range(steps):
        ids = jnp.asarray(samples[rng.choice(samples.shape[0], b, replace=False)])
        state, m = step(student_params, state, ids)
        losses.append(m["loss"])

    return combine(state.trainable, state.frozen), [float(x) for x in losses]
