"""pallas_kernels.lora_linear: forward and custom_vjp gradients vs the jnp reference, bad input, fallback."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common
from pallas_kernels.lora_linear import BlockSizes, lora_linear, lora_linear_reference
from pallas_kernels.lora_linear import _forward, _grad_a, _grad_b, _project  # the backward's kernels, one by one

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


# (x shape, out, rank, x/W dtype, adapter dtype, blocks): M=1, rank 1/7/128, dims off the blocks, bf16
GRAD_CASES = {
    "f32_awkward": ((37, 50), 33, 3, jnp.float32, jnp.float32, SMALL),
    "bf16_all": ((1, 40), 24, 8, jnp.bfloat16, jnp.bfloat16, SMALL),
    "m1_rank1": ((1, 24), 40, 1, jnp.float32, jnp.float32, None),
    "bf16_f32_adapters_rank7_3d": ((3, 13, 50), 33, 7, jnp.bfloat16, jnp.float32, SMALL),
    "rank128": ((20, 136), 72, 128, jnp.float32, jnp.float32, BlockSizes(16, 32, 64)),
}


def _loss(fn, ct):
    return lambda *args: jnp.sum(fn(*args).astype(jnp.float32) * ct)


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_grads_match_reference(case, interpret, close):
    x_shape, n, r, dt, adt, bs = GRAD_CASES[case]
    x, w, a, b = make(x_shape, n, r, dt, adt, seed=1)
    ct = jnp.asarray(np.random.default_rng(9).standard_normal(x_shape[:-1] + (n,)), jnp.float32)
    # x, W, A, B all differentiated: W's gradient path runs too
    kernel = lambda x, w, a, b: lora_linear(x, w, a, b, 0.5, block_sizes=bs, interpret=interpret)  # noqa: E731
    got = jax.jit(jax.grad(_loss(kernel, ct), argnums=(0, 1, 2, 3)))(x, w, a, b)
    want = jax.jit(jax.grad(_loss(lambda *z: lora_linear_reference(*z, 0.5), ct), argnums=(0, 1, 2, 3)))(x, w, a, b)
    for g, ref, name in zip(got, want, "xWAB"):
        assert g.dtype == ref.dtype, name
        close(g, ref, dtype=dt)


@pytest.mark.parametrize("argnums", [(2, 3), (0, 2), (0, 3)], ids=["A_B", "x_A", "x_B"])
def test_grads_of_a_subset_match_reference(argnums, interpret, close):
    """Symbolic zeros: g = dy Bᵀ by its own kernel (no dx), or dx without g / without the h residual."""
    x, w, a, b = make((21, 40), 24, 5, jnp.bfloat16, jnp.float32, seed=2)
    ct = jnp.asarray(np.random.default_rng(3).standard_normal((21, 24)), jnp.float32)
    kernel = lambda x, w, a, b: lora_linear(x, w, a, b, 2.0, block_sizes=SMALL, interpret=interpret)  # noqa: E731
    got = jax.jit(jax.grad(_loss(kernel, ct), argnums=argnums))(x, w, a, b)
    want = jax.jit(jax.grad(_loss(lambda *z: lora_linear_reference(*z, 2.0), ct), argnums=argnums))(x, w, a, b)
    for g, ref in zip(got, want):
        assert g.dtype == ref.dtype
        close(g, ref, dtype=jnp.bfloat16)


# (M, K, N, rank, x/W dtype, adapter dtype, blocks)
KERNEL_CASES = {
    "m1_rank1": (1, 24, 40, 1, jnp.float32, jnp.float32, BlockSizes()),
    "bf16_f32_adapters_rank7": (37, 50, 33, 7, jnp.bfloat16, jnp.float32, SMALL),
    "rank128_bf16": (20, 136, 72, 128, jnp.bfloat16, jnp.bfloat16, BlockSizes(16, 32, 64)),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_backward_kernels_match_their_formulas(case, interpret, close):
    """Each backward kernel alone against its jnp formula (f32 accumulation, adapter-dtype output)."""
    m, k, n, r, dt, adt, bs = KERNEL_CASES[case]
    x, w, a, b = make((m, k), n, r, dt, adt, seed=4)
    dy = jnp.asarray(np.random.default_rng(5).standard_normal((m, n)), dt)
    f32, s = jnp.float32, 0.5
    kw = dict(block_sizes=bs, interpret=interpret)

    @jax.jit
    def kernels(x, w, a, b, dy):
        y, h = _forward(x, w, a, b, scale=s, emit_h=True, **kw)
        dx, g = _forward(dy, w, b.T, a.T, scale=s, w_transposed=True, emit_h=True, **kw)
        return (y, h, dx, g, _project(dy, b.T, **kw), _grad_a(x, g, scale=s, **kw),
                _grad_b(h, dy, scale=s, **kw))

    y, h, dx, g, g2, da, db = kernels(x, w, a, b, dy)
    h_ref = jnp.dot(x.astype(adt), a, preferred_element_type=f32)
    g_ref = jnp.dot(dy.astype(adt), b.T, preferred_element_type=f32)
    for out, ref, dtype in ((y, lora_linear_reference(x, w, a, b, s), dt), (h, h_ref, adt), (g, g_ref, adt),
                            (g2, g_ref, adt), (dx, lora_linear_reference(dy, w.T, b.T, a.T, s), dt)):
        assert out.dtype == dtype and out.shape == ref.shape
        close(out, ref, dtype=dtype)
    # dA = s xᵀ g and dB = s hᵀ dy on the kernels' own g and h: only the reduction is under test
    da_ref = s * jnp.dot(x.astype(adt).T, g, preferred_element_type=f32)
    db_ref = s * jnp.dot(h.T, dy.astype(adt), preferred_element_type=f32)
    for out, ref in ((da, da_ref), (db, db_ref)):
        assert out.dtype == adt and out.shape == ref.shape
        close(out, ref, dtype=adt)


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


def _pallas_names(jaxpr):
    """Names of every pallas_call, sub-jaxprs included."""
    out = []
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            out.append(e.params["name"])
            continue
        for p in e.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None:
                out += _pallas_names(getattr(inner, "jaxpr", inner))
    return out


def test_no_weight_gradient_matmul_when_only_adapters_are_differentiated():
    x, w, a, b = make((32, 48), 64, 4, jnp.float32)
    f = lambda w, a, b: lora_linear(x, w, a, b, interpret=True).sum()  # noqa: E731
    adapters_only = jax.make_jaxpr(jax.grad(f, argnums=(1, 2)))(w, a, b)
    # every product is a kernel: forward (+ h), g = dy Bᵀ (x not differentiated: no dx), dA, dB
    assert sorted(_pallas_names(adapters_only.jaxpr)) == [
        "lora_linear", "lora_linear_grad_a", "lora_linear_grad_b", "lora_linear_project"]
    assert _dot_shapes(adapters_only.jaxpr) == []  # no jnp matmul, so no dW = xᵀ dy
    with_w = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(w, a, b)
    assert (48, 64) in _dot_shapes(with_w.jaxpr)  # ... which is formed when W is differentiated
    with_x = jax.make_jaxpr(jax.grad(lambda x, a, b: lora_linear(x, w, a, b, interpret=True).sum(),
                                     argnums=(0, 1, 2)))(x, a, b)
    assert sorted(_pallas_names(with_x.jaxpr)) == [  # dx's kernel emits g: no separate projection
        "lora_linear", "lora_linear", "lora_linear_grad_a", "lora_linear_grad_b"]
    assert _dot_shapes(with_x.jaxpr) == []


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
