"""Full-weight gradients of the targeted weights, averaged over batches (for LoRA-GA / LoRA-SB).

`estimate_gradients(spec, loss_fn, params, batches)` returns, for every weight
``spec`` selects, the mean over batches of ``∂ loss_fn(params, batch) / ∂W``::

    Ḡ_W = (1 / N) Σ_{b=1..N} ∇_W L(params, batch_b)      (float32)

with ``L`` the per-batch loss as ``loss_fn`` returns it (usually the mean over
the batch's tokens). This is what PEFT's ``preprocess_loraga`` attaches to
each target (``weight.grad`` summed by ``backward`` over the calls of
``train_step``, divided by the number of backward passes through the layer),
in Flax orientation (``[in, out]``, the transpose of torch's ``[out, in]``).

Only the targeted weights are differentiated: the jitted step takes a dict
holding just those kernels as its differentiable argument and the rest of
``params`` as a plain argument that is put back around them, so no gradient
of any other weight is ever formed. Each batch's gradient is added to a
float32 accumulator inside the same jitted step (compiled once per batch
shape; the accumulator's buffers are donated on GPU/TPU).

Memory: one float32 copy of each targeted weight (the accumulator) plus what
one forward/backward pass of one batch needs (its activations, and the
batch's gradient of the targeted weights before it is added); no optimiser
state and no gradient of any untargeted weight. For a 7B model with all
linear layers targeted that is ~26 GiB of accumulators: target fewer layers,
or estimate layer groups one after the other, if that does not fit.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2, 1))}}
  >>> def loss_fn(p, x):
  ...     return jnp.mean((x @ p["dense"]["kernel"]) @ p["head"]["kernel"])
  >>> spec = lorajax.Spec("lora", rank=1, targets=["dense"])
  >>> batches = [jnp.ones((4, 3)), 2 * jnp.ones((4, 3))]
  >>> g = lorajax.inits.estimate_gradients(spec, loss_fn, params, batches)
  >>> list(g), g["dense"]["kernel"].tolist()       # mean of 1 and 2 = 1.5 everywhere
  (['dense'], [[1.5, 1.5], [1.5, 1.5], [1.5, 1.5]])

References:
  PEFT ``src/peft/tuners/lora/loraga.py`` (``preprocess_loraga``,
  ``estimate_gradients``); LoRA-GA official code Outsider565/LoRA-GA
  ``peft/src/peft/utils/lora_ga_utils/lora_ga_utils.py`` (``estimate_gradient``);
  LoRA-SB official code RaghavSinghal10/lora-sb ``utils/gradient_utils.py``
  (``estimate_and_process_grads_torch``).
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from lorajax import targets
from lorajax.plan import nest
from lorajax.spec import Spec

__all__ = ["estimate_gradients", "lookup"]


def _name(keys: tuple) -> str:
    return "/".join(keys)


def _with_targets(params: Any, weights: dict) -> Any:
    """``params`` with the leaves named in ``weights`` (``"a/b/kernel"``) replaced."""

    def swap(path, leaf):
        return weights.get(_name(targets.key_names(path)), leaf)

    return jax.tree_util.tree_map_with_path(swap, params)


def _grad_step(loss_fn: Callable) -> Callable:
    """``step(acc, weights, params, batch) -> acc + ∇_weights loss_fn(params ∘ weights, batch)`` (not jitted)."""

    def step(acc, weights, params, batch):
        grads = jax.grad(lambda w: loss_fn(_with_targets(params, w), batch))(weights)
        return jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), acc, grads)

    return step


def estimate_gradients(
    spec: Spec,
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    progress: bool = False,
) -> dict:
    """Averaged float32 gradients of the weights ``spec`` selects.

    Args:
      spec: selects the weights (any variant; only its targets matter).
      loss_fn: ``loss_fn(params, batch) -> scalar`` (the per-batch loss, as
        used for training; it must be traceable by ``jax.jit``).
      params: the base params (bare, a variables dict or an NNX State).
      batches: an iterable of batches (any pytrees of arrays).
      num_batches: stop after this many batches (default: all of them).
      progress: show a ``tqdm`` bar over the batches.

    Returns:
      A tree ``{path...: {"kernel": float32 array of the kernel's shape}}``
      holding only the targeted weights, at the same paths as the adapters.

    Raises:
      ValueError: ``batches`` is empty, or ``num_batches`` is not a positive int.
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    selected = targets.select(spec, params)
    leaves = dict(targets.weight_leaves(params))
    weights = {_name(t.keys): leaves[t.keys] for t in selected}
    acc = {k: jnp.zeros(w.shape, jnp.float32) for k, w in weights.items()}
    donate = (0,) if jax.default_backend() != "cpu" else ()
    step = jax.jit(_grad_step(loss_fn), donate_argnums=donate)

    it = iter(batches)
    if progress:
        from tqdm.auto import tqdm

        total = len(batches) if isinstance(batches, Sized) else None
        total = num_batches if total is None else min(total, num_batches or total)
        it = tqdm(it, total=total, desc="gradients", unit="batch")
    n = 0
    for batch in it:
        acc = step(acc, weights, params, batch)
        n += 1
        if num_batches is not None and n >= num_batches:
            break
    if n == 0:
        raise ValueError("estimate_gradients got no batches")
    flat = {t.keys: acc[_name(t.keys)] / n for t in selected}
    return nest(flat)


def lookup(grads: Any, keys: tuple, shape: tuple) -> jax.Array:
    """The gradient at weight path ``keys`` in ``grads`` (with or without the leading ``"params"``).

    Raises ValueError naming the path when it is missing or has the wrong shape.
    """
    for ks in (keys, keys[1:] if keys[:1] == ("params",) else ("params",) + keys):
        node = grads
        try:
            for k in ks:
                node = node[k]
        except (KeyError, TypeError, IndexError):
            continue
        if tuple(node.shape) != tuple(shape):
            raise ValueError(f"gradient at {_name(keys)} has shape {tuple(node.shape)}, the weight is {tuple(shape)}")
        return jnp.asarray(node)
    raise ValueError(
        f"grads has no gradient for the targeted weight {_name(keys)} "
        "(make it with lorajax.inits.estimate_gradients for the same spec)"
    )
