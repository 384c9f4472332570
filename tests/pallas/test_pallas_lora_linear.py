"""pallas_kernels.lora_linear: forward and custom_vjp gradients vs the jnp reference, bad input, fallback."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common
from pallas_kernels.lora_linear import BlockSizes, lora_linear, lora_linear_reference

SMALL = BlockSizes(16, 16, 16)


def make(x_shape, n, r, dtype, adapter_dtype=jnp.float32, seed=0):
    """Inputs from numpy's RNG (eager jax.random would compile once per shape: slow on 2 cores)."""
    k = x_shape[-1]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    a = jnp.asarray(rng.standard_normal((k, r)) / np.sqrt(k), adapter_dtype)
    b = jnp.asarray(rng.standard_normal((r, n)), adapter_dtype)
    return x, w, a, b


# (x shape, out, rank, x/W dtype, adapter dtype, blocks): dims off the block sizes, batch 1, rank 1..128
CASES = {
    "batch1_rank1": ((1, 24), 40, 1, jnp.float32, jnp.float32, None),
    "awkward_3d": ((3, 13, 50), 33, 3, jnp.float32, jnp.float32, SMALL),
    "rank128": ((20, 136), 72, 128, jnp.float32, jnp.float32, BlockSizes(16, 32, 64)),
    "bf16_f32_adapters": ((37, 50), 33, 5, jnp.bfloat16, jnp.float32, SMALL),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case, interpret, close):
    x_shape, n, r, dt, adt, bs = CASES[case]
    x, w, a, b = make(x_shape, n, r, dt, adt)
    y = lora_linear(x, w, a, b, 2.0, block_sizes=bs, interpret=interpret)
    assert y.dtype == dt and y.shape == x_shape[:-1] + (n,)
    close(y, jax.jit(lora_linear_reference, static_argnums=4)(x, w, a, b, 2.0))


GRAD_CASES = {
    "f32_awkward": ((37, 50), 33, 3, jnp.float32, jnp.float32),
    "bf16_all": ((1, 40), 24, 8, jnp.bfloat16, jnp.bfloat16),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_grads_match_reference(case, interpret, close):
    x_shape, n, r, dt, adt = GRAD_CASES[case]
    x, w, a, b = make(x_shape, n, r, dt, adt, seed=1)
    ct = jnp.asarray(np.random.default_rng(9).standard_normal(x_shape[:-1] + (n,)), jnp.float32)

    def loss(fn):  # x, W, A, B all differentiated: W's gradient path runs too
        return lambda *args: jnp.sum(fn(*args).astype(jnp.float32) * ct)

    kernel = lambda x, w, a, b: lora_linear(x, w, a, b, 0.5, block_sizes=SMALL, interpret=interpret)  # noqa: E731
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2, 3)))(x, w, a, b)
    want = jax.jit(jax.grad(loss(lambda *z: lora_linear_reference(*z, 0.5)), argnums=(0, 1, 2, 3)))(x, w, a, b)
    for g, ref, name in zip(got, want, "xWAB"):
        assert g.dtype == ref.dtype, name
        close(g, ref, dtype=dt)


def _dot_shapes(jaxpr):
    """Output shapes of every dot_general, sub-jaxprs included."""
    out = []
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            out += [tuple(v.aval.shape) for v in e.outvars]
        for p in e.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None:
                out += _dot_shapes(getattr(inner, "jaxpr", inner))
    return out


def test_no_weight_gradient_matmul_when_only_adapters_are_differentiated():
    x, w, a, b = make((32, 48), 64, 4, jnp.float32)
    f = lambda w, a, b: lora_linear(x, w, a, b, interpret=True).sum()  # noqa: E731
    adapters_only = jax.make_jaxpr(jax.grad(f, argnums=(1, 2)))(w, a, b)
    assert "pallas_call" in str(adapters_only)
    assert (48, 64) not in _dot_shapes(adapters_only.jaxpr)  # no dW = xᵀ dy
    with_w = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(w, a, b)
    assert (48, 64) in _dot_shapes(with_w.jaxpr)  # ... which is formed when W is differentiated


def test_bad_input_raises_before_launch():
    x, w, a, b = make((4, 8), 6, 2, jnp.float32)
    with pytest.raises(ValueError, match="input size 8"):
        lora_linear(x[:, :7], w, a, b)
    with pytest.raises(ValueError, match=r"B must be \[rank, out\] = \[2, 6\]"):
        lora_linear(x, w, a, b[:, :5])
    with pytest.raises(TypeError, match="dtype mismatch, w is bfloat16 but x is float32"):
        lora_linear(x, w.astype(jnp.bfloat16), a, b)
    with pytest.raises(TypeError, match="dtype mismatch, b is bfloat16"):
        lora_linear(x, w, a, b.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="floating-point"):
        lora_linear(x.astype(jnp.int32), w.astype(jnp.int32), a, b)
    with pytest.raises(ValueError, match="power of two"):
        lora_linear(x, w, a, b, block_sizes=BlockSizes(block_m=24))
    with pytest.raises(TypeError, match="scale must be a Python number"):
        jax.jit(lambda s: lora_linear(x, w, a, b, s))(1.0)


def test_unsupported_backend_falls_back_to_reference_with_one_warning(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("CPU is the backend without a compiled lowering")
    monkeypatch.setattr(_common, "_warned", set())
    x, w, a, b = make((5, 8), 6, 2, jnp.float32)
    with pytest.warns(RuntimeWarning, match="lora_linear.*backend 'cpu'.*reference"):
        y = lora_linear(x, w, a, b, 2.0, interpret=False)
    assert jnp.array_equal(y, lora_linear_reference(x, w, a, b, 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_linear(x, w, a, b, 2.0, interpret=False)  # second call: silent
