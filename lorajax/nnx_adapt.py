"""Factored mode for NNX models: ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum``.

`lorajax.adapt(apply_fn, spec, mode="factored")` sends an NNX ``State`` here;
``apply_fn(state, *args)`` is the usual ``nnx.merge(graphdef, state)(*args)``.
Each adapted layer computes the variant's factored forward on ``x: [T, in]``
(LoRA's ``x W + s (x A) B``), so neither ``ΔW`` nor a full-size weight gradient
is formed, exactly as linen's factored mode does.

Mechanism (two parts):

1. **The value carries the adapter.** Before ``apply_fn`` runs, every targeted
   kernel in the State is replaced by an `AdaptedKernel`: a pytree node whose
   only child is the frozen ``w`` and whose static part is a `_Slot` (the
   target, its adapter, its `Context`, and where to record use and sown
   statistics). ``nnx.merge`` puts it into the layer's ``Param`` unchanged, and
   because it is a pytree, what ``apply_fn`` does to the State (a dtype cast,
   ``nnx.merge`` with further states, ``jax.tree.map``) keeps it attached to
   its weight. No path or graphdef is needed to find a layer's adapter.
2. **The layers dispatch on it.** While ``apply_fn`` runs, the ``__call__`` of
   the three layer classes is wrapped: a layer whose kernel is an
   `AdaptedKernel` computes the factored forward (same contraction, dtype
   promotion and bias as Flax); any other layer calls Flax's own ``__call__``.
   The wrapping is installed when the first adapted call starts and removed
   when the last one ends (a counter under a lock), and is a no-op for layers
   of other models, so concurrent threads are unaffected.

Why not a pure "array-like" value (quax style): NNX layers read
``self.kernel[...]``, promote it with ``jnp.asarray`` and contract it with
``lax.dot_general`` / ``jnp.einsum``; none of these dispatch on a user type, so
the value alone would have to turn into a plain array (the merged weight)
before the matmul. Why not per-module ``dot_general``: it is static graphdef
data fixed when the model was built, and ``adapt`` only sees ``apply_fn``.
Wrapping the three ``__call__`` methods is NNX's counterpart of linen's
``nn.intercept_methods``, and the marker value makes it exact: only the
modules that hold a targeted kernel of this call are changed.

Anything else that reads an adapted kernel as an array (a custom layer, weight
tying through ``layer.kernel[...]``) raises a `TypeError` naming the target:
use ``mode="merged"`` there. Not supported (raise): ``LinearGeneral`` with
``batch_axis``, ``out_sharding``, a custom ``dot_general`` / ``einsum_op``;
layers inside ``nnx.scan`` / ``nnx.vmap`` over stacked weights.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from flax import nnx
  >>> graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  >>> spec = lorajax.Spec("lora", rank=2, targets=".*")
  >>> adapters = lorajax.init(spec, state, jax.random.key(1))
  >>> fwd = lorajax.adapt(lambda st, x: nnx.merge(graphdef, st)(x), spec, mode="factored")
  >>> x = jnp.ones((2, 4))
  >>> bool(jnp.allclose(fwd(state, adapters, x), nnx.merge(graphdef, state)(x)))
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from lorajax import targets
from lorajax.adapt import forward, parse_einsum, sowing
from lorajax.adapters import as_matrix
from lorajax.variants.base import Context, Target, Variant

__all__ = ["AdaptedKernel", "wrap_kernels", "intercept", "LAYERS"]

#: The layers whose calls are computed in factored form (for error messages).
LAYERS = "nnx.Linear / nnx.LinearGeneral / nnx.Einsum"


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity: pytree static data of one call
class _Slot:
    """One target of one adapted call: what the layer needs to compute its factored forward."""

    variant: Variant
    t: Target
    adapter: dict
    ctx: Context
    used: set
    sink: dict

    def forward(self, x2d: jax.Array, w2d: jax.Array) -> jax.Array:
        self.used.add(self.t.name)
        return forward(self.variant, self.t, self.adapter, sowing(self.ctx, self.sink, self.t.name), x2d, w2d)


@jax.tree_util.register_pytree_node_class
class AdaptedKernel:
    """A targeted kernel ``w`` tagged with its adapter slot; only an intercepted layer can use it.

    A pytree (child ``w``, static slot), so State transformations keep the tag.
    ``shape``, ``dtype`` and ``ndim`` are ``w``'s; reading it as an array raises.
    """

    __slots__ = ("w", "slot")

    def __init__(self, w: Any, slot: _Slot):
        self.w, self.slot = w, slot

    def tree_flatten(self):
        return (self.w,), self.slot

    @classmethod
    def tree_unflatten(cls, slot, children):
        return cls(children[0], slot)

    shape = property(lambda self: self.w.shape)
    dtype = property(lambda self: self.w.dtype)
    ndim = property(lambda self: self.w.ndim)

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise TypeError(
            f"{self.slot.t.name}: the adapted kernel was read as an array outside {LAYERS}.__call__ "
            "(a custom layer, or weight tying through layer.kernel[...]); factored mode cannot adapt that "
            "use: use mode='merged'"
        )

    __getitem__ = __jax_array__ = __array__ = _refuse

    def __repr__(self) -> str:
        return f"AdaptedKernel({self.slot.t.name}, shape={tuple(self.shape)}, dtype={self.dtype})"


def wrap_kernels(state: Any, variant: Variant, table: dict, used: set, sink: dict) -> Any:
    """``state`` with each targeted kernel replaced by an `AdaptedKernel` (a new State; nothing mutated).

    ``table``: ``{target name: (Target, adapter, Context)}`` as `lorajax.adapt` builds it.
    """
    slots = {t.keys: _Slot(variant, t, adapter, ctx, used, sink) for t, adapter, ctx in table.values()}

    def one(path, w):
        slot = slots.get(targets.key_names(path))
        return w if slot is None else AdaptedKernel(w, slot)

    return jax.tree_util.tree_map_with_path(one, state)


# ----------------------------------------------------------------------------
# The factored layers (Flax's contraction, dtype promotion and bias; the variant's forward)
# ----------------------------------------------------------------------------


def _unsupported(module: Any, slot: _Slot, what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{slot.t.name}: {type(module).__name__} with {what} is not supported in factored mode; use mode='merged'"
    )


def _check_call(module: Any, slot: _Slot, out_sharding: Any) -> None:
    if out_sharding is not None:
        raise _unsupported(module, slot, "out_sharding")


def _contract(module: Any, slot: _Slot, w: jax.Array, x: jax.Array, axis: tuple[int, ...]) -> jax.Array:
    """``x`` contracted over ``axis`` (in order) with ``w``'s leading axes, plus the bias."""
    t = slot.t
    if len(axis) != t.in_axes:
        raise ValueError(
            f"{t.name}: the layer contracts {len(axis)} input axes but the adapter was made with "
            f"in_axes={t.in_axes}; set Spec(in_axes={{{t.name.split('.')[-1]!r}: {len(axis)}}})"
        )
    bias = module.bias[...] if module.bias is not None else None
    x, w, bias = module.promote_dtype((x, w, bias), dtype=module.dtype)
    n = len(axis)
    x = jnp.moveaxis(x, axis, tuple(range(x.ndim - n, x.ndim)))
    batch_shape = x.shape[: x.ndim - n]
    y = slot.forward(x.reshape(math.prod(batch_shape), -1), as_matrix(w, t)).reshape(*batch_shape, *w.shape[n:])
    y = _preferred(module, y)
    return y if bias is None else y + bias.reshape((1,) * len(batch_shape) + bias.shape)


def _preferred(module: Any, y: jax.Array) -> jax.Array:
    dtype = getattr(module, "preferred_element_type", None)
    return y if dtype is None else y.astype(dtype)


def _linear(module: nnx.Linear, slot: _Slot, w: jax.Array, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    _check_call(module, slot, out_sharding)
    if module.dot_general is not jax.lax.dot_general:
        raise _unsupported(module, slot, "a custom dot_general")
    return _contract(module, slot, w, inputs, (inputs.ndim - 1,))


def _linear_general(
    module: nnx.LinearGeneral, slot: _Slot, w: jax.Array, inputs: jax.Array, out_sharding: Any = None
) -> jax.Array:
    _check_call(module, slot, out_sharding)
    if module.batch_axis:
        raise _unsupported(module, slot, "batch_axis")
    if module.dot_general is not None or module.dot_general_cls is not None:
        raise _unsupported(module, slot, "a custom dot_general")
    axis = tuple(sorted(a % inputs.ndim for a in module.axis))  # as Flax: input axes in increasing order
    return _contract(module, slot, w, inputs, axis)


def _einsum(
    module: nnx.Einsum,
    slot: _Slot,
    w: jax.Array,
    inputs: jax.Array,
    einsum_str: str | None = None,
    out_sharding: Any = None,
) -> jax.Array:
    _check_call(module, slot, out_sharding)
    if module.einsum_op is not jnp.einsum:
        raise _unsupported(module, slot, "a custom einsum_op")
    t = slot.t
    einsum_str = einsum_str if einsum_str is not None else module.einsum_str
    if einsum_str is None:
        raise ValueError(f"{t.name}: nnx.Einsum needs einsum_str as a constructor or call argument")
    einsum_str = einsum_str.replace(" ", "")
    module._einsum_str_check(einsum_str)
    bias = module.bias[...] if module.bias is not None else None
    x, w, bias = module.promote_dtype((inputs, w, bias), dtype=module.dtype)
    (lhs, rhs), out, _ = parse_einsum(einsum_str, x, w)
    n = t.in_axes
    in_letters, out_letters = rhs[:n], rhs[n:]
    batch = "".join(c for c in lhs if c not in in_letters)
    linear = (
        all(c in lhs and c not in out for c in in_letters)
        and all(c in out and c not in lhs for c in out_letters)
        and all(c in out for c in batch)
    )
    if not linear:
        raise NotImplementedError(
            f"{t.name}: einsum {einsum_str!r} is not a linear map with the kernel's first {n} axes as inputs "
            "and the rest as outputs; use mode='merged' or set in_axes"
        )
    xt = jnp.einsum(f"{lhs}->{batch}{in_letters}", x)
    batch_shape = xt.shape[: len(batch)]
    y = slot.forward(xt.reshape(math.prod(batch_shape), -1), as_matrix(w, t)).reshape(*batch_shape, *w.shape[n:])
    y = _preferred(module, jnp.einsum(f"{batch}{out_letters}->{out}", y))
    return y if bias is None else y + jnp.reshape(bias, module._infer_broadcasted_bias_shape(einsum_str, x, w))


_FACTORED: dict[type, Callable] = {nnx.Linear: _linear, nnx.LinearGeneral: _linear_general, nnx.Einsum: _einsum}


# ----------------------------------------------------------------------------
# Installing and removing the dispatch
# ----------------------------------------------------------------------------


def _dispatching(original: Callable, factored: Callable) -> Callable:
    @functools.wraps(original)
    def __call__(self, inputs, *args, **kwargs):
        kernel = self.kernel.get_value() if isinstance(self.kernel, nnx.Variable) else None
        if not isinstance(kernel, AdaptedKernel):
            return original(self, inputs, *args, **kwargs)
        return factored(self, kernel.slot, kernel.w, inputs, *args, **kwargs)

    __call__.__lorajax_original__ = original  # type: ignore[attr-defined]
    return __call__


_LOCK = threading.Lock()
_ACTIVE = [0]  # adapted calls in progress (all threads)


@contextlib.contextmanager
def intercept() -> Iterator[None]:
    """While active, the three layer classes compute kernels that are `AdaptedKernel`s in factored form.

    Re-entrant and thread-safe: the wrappers are installed by the first caller
    and removed by the last; layers with plain kernels run Flax's own code.
    """
    with _LOCK:
        if _ACTIVE[0] == 0:
            for cls, factored in _FACTORED.items():
                setattr(cls, "__call__", _dispatching(cls.__dict__["__call__"], factored))
        _ACTIVE[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE[0] -= 1
            if _ACTIVE[0] == 0:
                for cls in _FACTORED:
                    setattr(cls, "__call__", cls.__dict__["__call__"].__lorajax_original__)
