"""O3 continual unlearning: an orthogonal LoRA across requests, a per-example gate, an OOD detector.

O3 unlearns a stream of requests with ONE plain LoRA (r=8, α=16 on q, k, v,
o, gate, up, down), trained continually: each request resumes from the
adapter the previous one left. Three pieces, as pure functions over adapters
pytrees (Flax layout: kernel ``W: [in, out]``, ``lora_A: [in, r]``,
``lora_B: [r, out]``, ``ΔW = s·A B``, ``s = α/r``):

* `orthogonal_loss` (the official ``lora_layer_hacked_o.py`` regulariser):
  ``L_orth = Σ_targets Σ_{t<T} ‖A_t A_Tᵀ‖_F²`` in PyTorch layout
  (``A: [r, in]``), ``A_t`` the saved ``lora_A`` of the earlier requests and
  ``A_T`` the current one (only A, never B). Here ``a = Aᵀ: [in, r]``, so per
  target it is ``‖a_tᵀ a_T‖_F²`` (an ``[r, r]`` matrix). The training loss is
  ``L = L_unlearn + λ·L_orth`` with ``λ = ORTHOGONAL_WEIGHT = 0.1`` (the
  official script's ``SCALE``). As in the official script, the request that
  resumes the adapter of the previous one has that adapter among the ``a_t``
  (its first step sees ``‖a_{T−1}ᵀ a_{T−1}‖_F²``). The gradient pushes the
  columns of ``a_T`` out of the column spaces of the ``a_t``::

      ∂L_orth/∂a_T = 2 Σ_t a_t a_tᵀ a_T     ([in, r];  PyTorch layout: 2 Σ_t A_T A_tᵀ A_t)

* `gated_apply` (the official gated layer, ``result·w₀ + lora_out·w`` with
  ``w₀ = 1``): every adapted layer computes ``y = x W + w_b · s (x A) B`` with
  one gate ``w_b`` per example of the batch. The LoRA term is linear in ``B``,
  so this is exactly plain LoRA with ``lora_B`` scaled by ``w_b``: one
  ``jax.vmap`` over the examples of `lorajax.adapt` on ``x[b:b+1]`` with
  ``lora_B·w_b``. Gate 0 is the base model, 1 plain LoRA.

* `Detector` and `gate_from_cp` (``eval_o3.py``): a per-request OOD detector
  gives a calibrated in-distribution probability ``cp``; the gate is the
  official hand-tuned map ``w = sigmoid(10·cp − 2)``, then ``w > 0.9 → 1.2``,
  ``0.3 < w ≤ 0.4 → w`` (kept), else 0; the max over the requests' gates is
  the example's gate.

The detector here is a stand-in that runs in this repository; what is kept
and what is simplified against the official one:

* kept: one detector per request, a Mahalanobis distance to the request's
  mean, a calibrated probability ``cp``, the exact ``cp → gate`` map above, the
  max over requests.
* features: the official encodes the input with a separately trained RoBERTa
  (contrastive entropy loss) and aggregates Mahalanobis scores over its layers
  ("local-global"); here the caller's features, e.g. `pooled_features`: the
  mean-pooled final hidden states of the frozen base Llama
  (``return_hidden=True``), one distance, no training.
* covariance: shared by the requests (pooled within-request scatter, as in
  Lee et al.'s tied-covariance Mahalanobis detector), ridge-regularised
  ``Σ + ridge·(tr Σ / D)·I`` (scale-free).
* score: the official scores the per-layer Mahalanobis scores with a
  one-class SVM (``score_samples``); here the score is the distance itself.
* calibration: the official builds a 1-D two-Gaussian GMM from the SVM scores
  of the request's training data and of in-distribution test data (means
  ``m₁, m₂``, both with the test scores' std, weights ½) and takes ``cp = 1 −
  |F(x) − F(2x₀ − x)|``, ``x₀ = (m₁ + m₂)/2``, ``F`` the GMM's CDF (two-sided:
  a score far from the centre on either side is out of distribution). Here each
  request's examples are split deterministically: the even-indexed ones give
  the mean (and the shared covariance), the odd-indexed ones are held out and
  their distances calibrate: ``cp(d) = #{held-out distances ≥ d} / n`` (one
  minus their empirical CDF at ``d``, the empirical p-value of ``d``).
  One-sided, because a distance below the typical one means closer to the
  request's data. For a new in-distribution example ``cp`` is about uniform
  on [0, 1], so the official map gates the ~58% with ``cp > 0.42`` on at 1.2,
  a thin band ``cp ∈ (0.115, 0.160]`` at ~0.3-0.4, and the rest at 0.

Example:
  >>> import jax.numpy as jnp
  >>> from lorajax import o3
  >>> a = {"q": {"kernel": {"lora_A": jnp.eye(3, 2), "lora_B": jnp.zeros((2, 3))}}}
  >>> b = {"q": {"kernel": {"lora_A": jnp.ones((3, 2)), "lora_B": jnp.zeros((2, 3))}}}
  >>> float(o3.orthogonal_loss(b, [a]))     # ‖aᵀ b‖_F² = 4 entries of 1
  4.0
  >>> [float(w) for w in o3.gate_from_cp([1.0, 0.14, 0.0])]
  [1.2, 0.3..., 0.0]

References:
  Gao et al., "On Large Language Model Continual Unlearning" (O3), ICLR 2025,
  arXiv:2407.10223; official code GCYZSL/O3-LLM-UNLEARNING,
  ``ScienceQA_expriment/src/lora_layer_hacked_o.py`` (regulariser, gated
  layer), ``ScienceQA_expriment/eval_o3.py`` (score → gate),
  ``train_unlearn_lora.sh`` (λ = 0.1, r = 8, α = 16). Facts from
  ``shared/specs/adapters.md`` §12b. Lee et al., "A Simple Unified Framework
  for Detecting Out-of-Distribution Samples and Adversarial Attacks",
  NeurIPS 2018, arXiv:1807.03888 (tied-covariance Mahalanobis).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import registry
from lorajax.adapt import adapt
from lorajax.plan import adapter_paths
from lorajax.spec import Spec

__all__ = [
    "ORTHOGONAL_WEIGHT",
    "orthogonal_loss",
    "gated_apply",
    "scale_lora_B",
    "gate_from_cp",
    "pooled_features",
    "mean_pool",
    "Detector",
]

#: λ of ``L = L_unlearn + λ·L_orth`` (the official ``orthogonal_loss_weight``, script ``SCALE``)
ORTHOGONAL_WEIGHT = 0.1
#: ``w = sigmoid(GATE_SLOPE·cp − GATE_SHIFT)`` (official ``scaling_factor`` and ``range_th``)
GATE_SLOPE, GATE_SHIFT = 10.0, 2.0
#: ``w > GATE_ON`` gives the gate ``GATE_ON_VALUE``
GATE_ON, GATE_ON_VALUE = 0.9, 1.2
#: ``GATE_KEEP[0] < w <= GATE_KEEP[1]`` keeps ``w``; every other ``w`` gives 0
GATE_KEEP = (0.3, 0.4)
#: default ridge of `Detector.fit`, relative to the mean feature variance ``tr Σ / D``
RIDGE = 0.1


# ----------------------------------------------------------------------------- orthogonal regulariser


def orthogonal_loss(adapters: Any, previous: Sequence[Any]) -> jax.Array:
    """``Σ_targets Σ_t ‖a_tᵀ a_T‖_F²``: the current ``lora_A`` against those of earlier requests.

    Args:
      adapters: the current LoRA adapters tree; per target ``lora_A: [in, r]`` (``a_T``).
      previous: earlier adapters trees of the same targets and shapes (``a_t``); only their
        ``lora_A`` is read, under ``stop_gradient``. Empty: 0.

    Returns:
      A float32 scalar (add ``ORTHOGONAL_WEIGHT`` times it to the loss).

    Raises:
      ValueError: a tree of ``previous`` misses or adds a target, or its ``lora_A`` has another
        shape (rank) than the current one, naming the path; an adapter without ``lora_A``.
    """
    if isinstance(previous, dict):
        raise ValueError("previous must be a list of earlier adapters trees, got one tree (wrap it: [tree])")
    current = adapter_paths(adapters)
    for keys, ad in current.items():
        if "lora_A" not in ad:
            raise ValueError(f"adapter at {'/'.join(keys)} has no lora_A (entries {sorted(ad)}): O3 needs LoRA")
    total = jnp.zeros((), jnp.float32)
    for t, tree in enumerate(previous):
        flat = adapter_paths(tree)
        missing, extra = sorted(set(current) - set(flat)), sorted(set(flat) - set(current))
        if missing or extra:
            names = {"missing": missing, "extra": extra}
            where = "; ".join(f"{k} {['/'.join(p) for p in v[:3]]}" for k, v in names.items() if v)
            raise ValueError(f"previous[{t}] does not have the current adapters' targets: {where}")
        for keys, ad in current.items():
            a_T = ad["lora_A"]
            if "lora_A" not in flat[keys]:
                raise ValueError(f"previous[{t}] at {'/'.join(keys)} has no lora_A (entries {sorted(flat[keys])})")
            a_t = jax.lax.stop_gradient(flat[keys]["lora_A"])
            if a_t.shape != a_T.shape:
                raise ValueError(
                    f"previous[{t}] at {'/'.join(keys)}: lora_A has shape {tuple(a_t.shape)}, the current one "
                    f"{tuple(a_T.shape)} ([in, r]: the same targets and rank are needed)"
                )
            total = total + _cross_sq_norm(a_t, a_T)
    return total


def _cross_sq_norm(a_t_INxR: jax.Array, a_T_INxR: jax.Array) -> jax.Array:
    """``‖a_tᵀ a_T‖_F²`` in float32 (PyTorch layout: ``‖A_t A_Tᵀ‖_F²``)."""
    m_RxR = a_t_INxR.astype(jnp.float32).T @ a_T_INxR.astype(jnp.float32)
    return jnp.sum(m_RxR * m_RxR)


# ----------------------------------------------------------------------------- gated inference


def scale_lora_B(adapters: Any, w: jax.Array) -> Any:
    """``adapters`` with every ``lora_B`` multiplied by the scalar ``w`` (other entries unchanged)."""

    def one(path, leaf):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return leaf * jnp.asarray(w).astype(leaf.dtype) if name == "lora_B" else leaf

    return jax.tree_util.tree_map_with_path(one, adapters)


def gated_apply(
    apply_fn: Callable,
    spec: Spec,
    params: Any,
    adapters: Any,
    x: jax.Array,
    gate_B: jax.Array,
    *,
    mode: str = "factored",
    **kwargs: Any,
) -> Any:
    """``apply_fn`` with every adapted layer computing ``x W + w_b · s (x A) B`` for example ``b``.

    Args:
      apply_fn: e.g. ``model.apply`` (as for `lorajax.adapt`).
      spec: the plain-LoRA `Spec` of ``adapters`` (``lora`` / rsLoRA; others raise).
      params: the frozen params / variables.
      adapters: the LoRA adapters tree.
      x: ``[B, ...]`` inputs (e.g. token ids ``[B, S]``); example ``b`` is ``x[b:b+1]``.
      gate_B: ``[B]`` gates ``w_b`` (0: the base model, 1: plain LoRA).
      mode: `lorajax.adapt`'s mode.
      **kwargs: passed on to ``apply_fn`` (e.g. ``return_hidden=True``).

    Returns:
      ``apply_fn``'s output for the batch: every leaf ``[B, ...]`` (each example's ``[1, ...]``
      output stacked; ``apply_fn``'s outputs must carry the batch axis first).

    Raises:
      ValueError: a variant that is not plain LoRA, or ``gate_B`` not of shape ``[x.shape[0]]``.
    """
    registry.plain_lora(spec.variant, "o3.gated_apply (the gate scales lora_B)")
    gate_B = jnp.asarray(gate_B)
    if x.ndim < 1 or gate_B.shape != (x.shape[0],):
        raise ValueError(
            f"gate_B must have shape [B] = ({x.shape[0] if x.ndim else '?'},) for x of shape {tuple(x.shape)}, "
            f"got {tuple(gate_B.shape)}"
        )
    fwd = adapt(apply_fn, spec, mode)

    def one(w, x1):  # x1: [1, ...], one example
        return fwd(params, scale_lora_B(adapters, w), x1, **kwargs)

    out = jax.vmap(one)(gate_B, x[:, None])  # leaves [B, 1, ...]
    return jax.tree.map(lambda o: o.reshape((o.shape[0] * o.shape[1],) + o.shape[2:]), out)


# ----------------------------------------------------------------------------- OOD detector and gate


def gate_from_cp(cp: Any) -> np.ndarray:
    """The official map from a calibrated in-distribution probability to the gate.

    ``w = sigmoid(10·cp − 2)``; then ``w > 0.9 → 1.2``, ``0.3 < w ≤ 0.4 → w``, else ``0``.
    In ``cp``: ``cp > 0.4197 → 1.2``, ``0.1153 < cp ≤ 0.1595 → w ∈ (0.3, 0.4]``, else 0.

    Args:
      cp: probabilities in [0, 1], any shape.

    Returns:
      float64 gates, the shape of ``cp``.

    Raises:
      ValueError: a value outside [0, 1] or not finite.
    """
    cp = np.asarray(cp, np.float64)
    if not np.all((cp >= 0.0) & (cp <= 1.0)):  # NaN fails too
        bad = cp[~((cp >= 0.0) & (cp <= 1.0))]
        raise ValueError(f"cp must be probabilities in [0, 1], got {bad[:5].tolist()}")
    w = 1.0 / (1.0 + np.exp(-(GATE_SLOPE * cp - GATE_SHIFT)))
    keep = (w > GATE_KEEP[0]) & (w <= GATE_KEEP[1])
    return np.where(w > GATE_ON, GATE_ON_VALUE, np.where(keep, w, 0.0))


def mean_pool(h_BxSxD: jax.Array, mask_BxS: jax.Array | None = None) -> jax.Array:
    """``[B, D]``: the mean of ``h`` over the positions (those where ``mask`` is true, if given)."""
    if mask_BxS is None:
        return h_BxSxD.mean(axis=1)
    m_BxSx1 = mask_BxS.astype(h_BxSxD.dtype)[..., None]
    return (h_BxSxD * m_BxSx1).sum(axis=1) / jnp.maximum(m_BxSx1.sum(axis=1), 1.0)


def pooled_features(apply_fn: Callable, params: Any, ids_BxS: jax.Array) -> jax.Array:
    """``[B, D]``: mean-pooled final hidden states, ``apply_fn(params, ids, return_hidden=True)`` (a Llama)."""
    return mean_pool(apply_fn(params, ids_BxS, return_hidden=True))


@dataclasses.dataclass(frozen=True, eq=False)
class Detector:
    """Per-request Mahalanobis OOD detector with a shared covariance (see the module doc).

    Attributes:
      means_RxD: each request's mean feature (of its even-indexed examples).
      precision_DxD: the inverse of the shared ridge-regularised covariance.
      calibration: per request, the sorted Mahalanobis distances ``[n_r]`` of its held-out
        (odd-indexed) examples.
    """

    means_RxD: np.ndarray
    precision_DxD: np.ndarray
    calibration: tuple[np.ndarray, ...]

    @classmethod
    def fit(cls, features: Sequence[Any], ridge: float = RIDGE) -> "Detector":
        """Fit on ``features[r]: [N_r, D]``, the features of request ``r``'s examples (``N_r >= 2``).

        Even-indexed rows give the means and the pooled within-request covariance
        ``Σ = Σ_r Σ_i (x_i − μ_r)(x_i − μ_r)ᵀ / Σ_r n_r``, regularised to ``Σ + ridge·(tr Σ / D)·I``;
        odd-indexed rows are held out for calibration. Computed in float64; deterministic.

        Raises:
          ValueError: no request, a request with fewer than 2 examples, features not 2-D of one
            width, non-finite features, ``ridge <= 0``, or features without any spread.
        """
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        if len(features) == 0:
            raise ValueError("Detector.fit needs the features of at least one request, got none")
        feats = [np.asarray(f, np.float64) for f in features]
        widths = {f.shape[-1] if f.ndim == 2 else None for f in feats}
        if None in widths or len(widths) != 1:
            raise ValueError(f"features must be [N_r, D] arrays of one width D, got shapes {[f.shape for f in feats]}")
        for r, f in enumerate(feats):
            if f.shape[0] < 2:
                raise ValueError(f"request {r} has {f.shape[0]} examples; at least 2 are needed (fit + calibration)")
            if not np.all(np.isfinite(f)):
                raise ValueError(f"request {r}'s features are not all finite")
        fit = [f[0::2] for f in feats]
        means = np.stack([f.mean(0) for f in fit])
        centred = np.concatenate([f - m for f, m in zip(fit, means)])
        cov = centred.T @ centred / len(centred)
        d = cov.shape[0]
        scale = np.trace(cov) / d
        if not scale > 0:
            raise ValueError("the requests' features have no spread (zero within-request variance): cannot calibrate")
        precision = np.linalg.inv(cov + ridge * scale * np.eye(d))
        precision = (precision + precision.T) / 2
        partial = cls(means, precision, ())
        calib = tuple(np.sort(partial.distances(f[1::2])[:, r]) for r, f in enumerate(feats))
        return cls(means, precision, calib)

    @property
    def num_requests(self) -> int:
        return self.means_RxD.shape[0]

    def _check(self, features_BxD: Any) -> np.ndarray:
        x = np.asarray(features_BxD, np.float64)
        if x.ndim != 2 or x.shape[1] != self.means_RxD.shape[1]:
            raise ValueError(f"features must be [B, {self.means_RxD.shape[1]}], got shape {x.shape}")
        return x

    def distances(self, features_BxD: Any) -> np.ndarray:
        """``[B, R]``: the Mahalanobis distance of each example to each request's mean."""
        x = self._check(features_BxD)
        diff_BxRxD = x[:, None, :] - self.means_RxD[None, :, :]
        sq = np.einsum("brd,de,bre->br", diff_BxRxD, self.precision_DxD, diff_BxRxD)
        return np.sqrt(np.maximum(sq, 0.0))

    def probabilities(self, features_BxD: Any) -> np.ndarray:
        """``[B, R]``: ``cp`` = the fraction of request ``r``'s held-out distances ``>=`` the example's."""
        d_BxR = self.distances(features_BxD)
        cols = []
        for r, calib in enumerate(self.calibration):
            below = np.searchsorted(calib, d_BxR[:, r], side="left")  # held-out distances < d
            cols.append((len(calib) - below) / len(calib))
        return np.stack(cols, axis=1)

    def gates(self, features_BxD: Any) -> np.ndarray:
        """``[B]``: the max over requests of `gate_from_cp` (the official ``max_ood``)."""
        return gate_from_cp(self.probabilities(features_BxD)).max(axis=1)
