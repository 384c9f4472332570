"""Kernel tests run in Pallas interpret mode on CPU; the compiled variant runs only on a GPU/TPU.

As jax's own ``tests/pallas`` (``FooTest`` / ``FooInterpretTest``): every kernel
test takes the ``interpret`` fixture, ``True`` everywhere and ``False`` (the
compiled kernel) only where ``jax.default_backend()`` is ``gpu`` or ``tpu``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

#: max |out - ref| / max |ref| allowed, by the output dtype
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2e-2}


@pytest.fixture(params=[True, False], ids=["interpret", "compiled"])
def interpret(request):
    if not request.param and jax.default_backend() not in ("gpu", "tpu"):
        pytest.skip("compiled Pallas kernels need a GPU or TPU")
    return request.param


def assert_close(out, ref, dtype=None, factor=1.0):
    """Relative-to-max error check with a dtype-dependent tolerance."""
    dtype = jnp.dtype(dtype or ref.dtype)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-6))
    assert err <= factor * TOLERANCE[dtype], f"relative error {err:.2e} > {factor * TOLERANCE[dtype]:.0e} ({dtype})"


@pytest.fixture
def close():
    return assert_close
