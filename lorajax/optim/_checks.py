"""Argument checks that let a factory run under ``optax.inject_hyperparams``.

``inject_hyperparams`` calls a factory again inside ``update`` with every
numeric argument (defaults included) replaced by an array — a tracer under
``jax.jit``. A check on a Python value must then be skipped (it ran once, on
the concrete value, when the transform was built), and numbers must be
accepted as 0-d arrays.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

__all__ = ["is_traced", "is_number", "check"]


def is_traced(x: Any) -> bool:
    """True for a value being traced (an injected hyper-parameter under ``jit``)."""
    return isinstance(x, jax.core.Tracer)


def is_number(x: Any) -> bool:
    """A real Python/numpy number or a 0-d numeric array (not a bool)."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, float, np.integer, np.floating)):
        return True
    dtype = getattr(x, "dtype", None)
    return (
        getattr(x, "ndim", None) == 0
        and dtype is not None
        and np.issubdtype(dtype, np.number)
        and not np.issubdtype(dtype, np.complexfloating)
    )


def check(name: str, value: Any, ok: Callable[[Any], Any], expected: str) -> None:
    """Raise ``ValueError("<name> must be <expected>, got <value>")`` unless ``ok(value)``; traced values pass."""
    if is_traced(value):
        return
    if not is_number(value) or not bool(ok(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def require_static(who: str, **values: Any) -> None:
    """Raise a ``TypeError`` naming any of ``values`` that is a JAX array: it fixes shapes or Python control flow.

    ``optax.inject_hyperparams`` turns every numeric argument into an array
    unless it is listed in ``static_args``.
    """
    traced = [name for name, v in values.items() if isinstance(v, jax.Array)]
    if traced:
        raise TypeError(
            f"{who}: {traced} fix(es) the state's shapes or the update's structure and cannot be "
            f"traced; with optax.inject_hyperparams pass static_args={tuple(values)}"
        )
