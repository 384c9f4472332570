"""Run a model's repeated layers as one ``jax.lax.scan`` while `lorajax.adapt` adapts each layer with its own adapter.

Why scan: in an unrolled stack of rematerialised layers nothing orders a
layer's recomputation after the backward pass has reached it, and XLA may
schedule several layers' recomputations early and keep their activations
alive together (measured on the Llama-3-8B LoRA step at 2048 tokens per device,
``fsdp=64``, XLA:CPU: 3.3 GiB per device at 8 layers, 10.7 GiB at 16, 27.0 GiB
at 32, with the recomputed forwards of layers 9-15 all live before the first
backward matmul; `experiments/results/scale_levers.md`). In a scan the backward
loop recomputes one layer per iteration, and the layer is compiled once.

The model keeps its per-layer parameter tree (HF names, ``layers.0``,
``layers.1``, ...); `scan` stacks the layers' parameters along a new leading
axis inside the step (one copy of the layer weights: of the shards under FSDP)
and feeds layer ``i``'s slice to iteration ``i``.

Protocol between a model and the adapter runtime (both in this library):

* model side: ``scan(apply_layer, per_layer_params, x, prefix=...)`` where
  ``prefix`` is the dotted module path of the layers' container (e.g.
  ``"model.layers"``: layer ``i`` is ``model.layers.{i}``) and
  ``apply_layer(params_i, x)`` applies one layer *as a top-level module*, so that
  its layers' module paths are relative (``self_attn.q_proj``).
* adapter side: while a factored `lorajax.adapt` call runs it registers a
  provider (`providing`); `scan` asks it for the per-layer inputs of the layers
  under ``prefix`` (the adapters stacked ``[n, ...]``, per-layer PRNG keys) and
  runs each iteration inside `iteration`, where the interceptor resolves a
  relative module path (`current`) to that iteration's adapter slice.

Every layer must be adapted alike (same targets, shapes, ranks, options);
otherwise the provider raises and the model can run unscanned.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from lorajax.models import llama
  >>> cfg = llama.Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
  ...                    num_attention_heads=2, num_key_value_heads=1)
  >>> ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 32
  >>> params = llama.LlamaForCausalLM(cfg).init(jax.random.key(0), ids)["params"]
  >>> spec = lorajax.Spec("lora", rank=2, targets="all-linear")
  >>> adapters = lorajax.init(spec, params, jax.random.key(1))
  >>> adapters = jax.tree.map(lambda a: a + 0.1, adapters)  # a non-zero update
  >>> loop = lorajax.adapt(llama.LlamaForCausalLM(cfg).apply, spec)({"params": params}, adapters, ids)
  >>> scan = lorajax.adapt(llama.LlamaForCausalLM(cfg, scan_layers=True).apply, spec)({"params": params}, adapters, ids)
  >>> bool(jnp.allclose(loop, scan, atol=1e-5))
  True
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

__all__ = ["scan", "providing", "iteration", "current"]

#: the active providers (innermost last): ``provider(prefix, n) -> (xs, resolve) | None``
_PROVIDERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("lorajax_layer_scan_providers", default=())
#: inside a scanned layer: ``(resolvers, xs_i)``
_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("lorajax_layer_scan_current", default=None)


@contextlib.contextmanager
def providing(provider: Callable[[str, int], Any]) -> Iterator[None]:
    """Register ``provider(prefix, n)`` for the scans run inside this block (adapter side)."""
    token = _PROVIDERS.set(_PROVIDERS.get() + (provider,))
    try:
        yield
    finally:
        _PROVIDERS.reset(token)


@contextlib.contextmanager
def iteration(resolvers: tuple, xs_i: tuple) -> Iterator[None]:
    """Inside one scanned layer: what `current` returns (model side, through `scan`)."""
    token = _CURRENT.set((resolvers, xs_i))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Any:
    """``(resolvers, xs_i)`` inside a scanned layer, else None (adapter side: the interceptor's lookup)."""
    return _CURRENT.get()


def stack(trees: list) -> Any:
    """``[tree_0, ..., tree_{n-1}]`` (same structure and shapes) -> one tree of ``[n, ...]`` leaves."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def scan(
    apply_layer: Callable[[Any, jax.Array], jax.Array],
    per_layer_params: list,
    x: jax.Array,
    *,
    prefix: str,
    policy: Any = False,
    between: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """``x`` through ``n = len(per_layer_params)`` layers: ``x = between(apply_layer(params_i, between(x)))``.

    Args:
      apply_layer: ``(params_i, x) -> x`` for one layer applied as a top-level module.
      per_layer_params: the layers' parameter trees, in order (same structure and shapes).
      x: the carried hidden states (e.g. ``[B·S, D]``).
      prefix: dotted module path of the layers' container; layer ``i`` is ``f"{prefix}.{i}"``.
      policy: ``False`` (no remat) or a ``jax.checkpoint_policies`` function: each iteration's
        forward is recomputed in its own backward iteration.
      between: applied to the carry at each layer boundary (e.g. a sharding constraint).
    """
    n = len(per_layer_params)
    if n == 0:
        return x
    between = between or (lambda h: h)
    provided = [p(prefix, n) for p in _PROVIDERS.get()]
    provided = [p for p in provided if p is not None]
    resolvers = tuple(resolve for _, resolve in provided)
    xs = (stack(per_layer_params), tuple(inputs for inputs, _ in provided))

    def body(h, xs_i):
        params_i, inputs_i = xs_i
        with iteration(resolvers, inputs_i):
            return between(apply_layer(params_i, between(h))), None

    if policy is not False:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)  # a scan body is not CSE'd across iterations
    h, _ = jax.lax.scan(body, x, xs)
    return h
