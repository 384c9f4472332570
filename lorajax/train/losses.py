"""Cross-entropy losses for language models, in float32 whatever the logits' dtype.

* `cross_entropy(logits [T, V], labels [T])` -> ``[T]``: ``logsumexp(z) − z[label]``.
* `chunked_cross_entropy(h [T, D], w [D, V], labels [T])` -> mean over tokens of
  ``cross_entropy(h @ w, labels)`` without holding the ``[T, V]`` logits: tokens are
  taken ``chunk`` rows at a time (``jax.lax.map``), each chunk's logits are formed
  in float32 and dropped, and recomputed in the backward pass (``jax.checkpoint``).
  Peak memory of the head: one ``[chunk, V]`` block instead of several ``[T, V]``
  arrays (logits, softmax, their gradient); FLOPs: one extra ``h @ w`` (the
  recomputation). Use it with the hidden states of
  ``LlamaForCausalLM(..., return_hidden=True)`` and `lorajax.models.llama.output_kernel`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorajax.train import losses
  >>> h = jax.random.normal(jax.random.key(0), (10, 4)); w = jax.random.normal(jax.random.key(1), (4, 7))
  >>> y = jnp.arange(10) % 7
  >>> full = losses.cross_entropy(h @ w, y).mean()
  >>> bool(jnp.allclose(losses.chunked_cross_entropy(h, w, y, chunk=3), full, atol=1e-6))
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cross_entropy", "chunked_cross_entropy"]


def cross_entropy(logits_TxV: jax.Array, labels_T: jax.Array) -> jax.Array:
    """``[T]``: ``logsumexp(z) − z[label]`` per row, in float32."""
    z = logits_TxV.astype(jnp.float32)
    picked = jnp.take_along_axis(z, labels_T[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(z, axis=-1) - picked


def chunked_cross_entropy(
    h_TxD: jax.Array, w_DxV: jax.Array, labels_T: jax.Array, *, chunk: int = 1024, weights_T: jax.Array | None = None
) -> jax.Array:
    """Mean (or ``weights``-weighted mean) of ``cross_entropy(h @ w, labels)``, ``chunk`` tokens at a time.

    ``h [T, D]``, ``w [D, V]`` (any float dtypes; the product accumulates in float32), ``labels [T]`` int,
    ``weights [T]`` (e.g. a 0/1 mask; None: all ones). Equal to the unchunked loss up to float rounding.
    """
    if h_TxD.ndim != 2 or w_DxV.ndim != 2 or h_TxD.shape[1] != w_DxV.shape[0]:
        raise ValueError(f"chunked_cross_entropy needs h [T, D] and w [D, V]; got {h_TxD.shape} and {w_DxV.shape}")
    if labels_T.shape != h_TxD.shape[:1]:
        raise ValueError(f"labels has shape {labels_T.shape}, expected {h_TxD.shape[:1]}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    T = h_TxD.shape[0]
    weights = jnp.ones((T,), jnp.float32) if weights_T is None else weights_T.astype(jnp.float32)
    chunk = min(chunk, T)
    n = -(-T // chunk)
    pad = n * chunk - T
    h = jnp.pad(h_TxD, ((0, pad), (0, 0))).reshape(n, chunk, -1)
    y = jnp.pad(labels_T.astype(jnp.int32), (0, pad)).reshape(n, chunk)
    wt = jnp.pad(weights, (0, pad)).reshape(n, chunk)  # padded rows weigh 0

    @jax.checkpoint
    def block(args):
        h_c, y_c, wt_c = args
        z = jnp.dot(h_c, w_DxV, preferred_element_type=jnp.float32)
        return jnp.sum(cross_entropy(z, y_c) * wt_c)

    total = jnp.sum(jax.lax.map(block, (h, y, wt)))
    return total / jnp.maximum(jnp.sum(weights), 1e-12)
