"""The fused CPU attention kernel (`lorajax.models.attention_cpu`) against the dense reference: values and
gradients on random inputs (causal with padding and a sliding window, bidirectional with padded keys; several
64-row blocks with a short last one, grouped heads, a head size that is no multiple of 16), vmap, two calls
that may run concurrently, the models' ``"auto"`` choice, clear errors, and the fallback when it cannot build."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorajax.models import attention, attention_cpu

pytestmark = pytest.mark.skipif(not attention_cpu.available(), reason="fused CPU attention kernel unavailable")


def _qkv(B=2, S=70, K=2, G=2, d=12, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, S, K, G, d)), jax.random.normal(ks[1], (B, S, K, d)),
            jax.random.normal(ks[2], (B, S, K, d)))  # fmt: skip


def _mask(S, causal, window, pad):
    s = np.arange(S)
    m = np.ones((S, S), bool) if not causal else s[None, :] <= s[:, None]
    if window is not None:
        m &= s[None, :] > s[:, None] - window
    valid = np.ones((2, S), bool)
    valid[1, :pad] = False  # sequence 1: the first `pad` keys are padding
    return jnp.asarray(m[None] & valid[:, None, :])


@pytest.mark.parametrize("causal, window, S", [(True, None, 70), (True, 9, 133), (False, None, 70)])
def test_fused_equals_dense_values_and_grads(causal, window, S):
    q, k, v = _qkv(S=S)
    mask = _mask(S, causal, window, pad=5)
    rows = mask.any(-1)[:, :, None, None, None]  # rows with a visible key (the others are not defined)
    ct = jax.random.normal(jax.random.key(3), q.shape) * rows

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask) * ct)

    fused = lambda q, k, v, m: attention_cpu.fused_attention(q, k, v, m, causal=causal, window=window)  # noqa: E731
    got = jax.jit(jax.value_and_grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.value_and_grad(lambda *a: loss(attention.dense_attention, *a), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, atol=1e-5)
    # one custom call forward, one backward; no [S, S] score matrix anywhere in the program
    hlo = jax.jit(jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2))).lower(q, k, v).as_text()
    assert hlo.count("lorajax_attention_fwd") == 1 and hlo.count("lorajax_attention_bwd") == 1
    assert f"{S}x{S}xf32" not in hlo


def test_vmap_and_concurrent_calls():
    """vmap over a leading axis (members) equals a loop, values and per-member gradients; two independent calls
    in one program both finish."""
    q, k, v = _qkv(S=20, d=8)
    mask = _mask(20, True, None, pad=0)
    qs, ks, vs = (jnp.stack([x, 2 * x]) for x in (q, k, v))
    got = jax.jit(jax.vmap(lambda q, k, v: attention_cpu.fused_attention(q, k, v, mask)))(qs, ks, vs)
    for i in range(2):
        np.testing.assert_allclose(got[i], attention.dense_attention(qs[i], ks[i], vs[i], mask), atol=1e-5)
    # per-member gradients (vmap of grad, as per-example clipping does): the backward call batched too
    def member_grads(fn):
        return jax.vmap(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask))), (0, 1, 2)))(qs, ks, vs)

    for g, w in zip(member_grads(attention_cpu.fused_attention), member_grads(attention.dense_attention)):
        np.testing.assert_allclose(g, w, atol=1e-5)
    np.testing.assert_allclose(attention_cpu.fused_attention(q, k, v, mask[:1]), got[0], atol=1e-6)  # mask [1, S, S]
    pair = jax.jit(lambda a, b: (attention_cpu.fused_attention(*a, mask), attention_cpu.fused_attention(*b, mask)))
    o1, o2 = pair((q, k, v), (2 * q, k, v))
    np.testing.assert_allclose(o2, attention.dense_attention(2 * q, k, v, mask), atol=1e-5)
    np.testing.assert_allclose(o1, got[0], atol=1e-6)


def test_auto_picks_fused_for_f32_and_blockwise_for_bf16():
    q, k, v = _qkv(S=20, d=8)
    mask = _mask(20, True, None, pad=0)

    def calls(*a):
        return str(jax.make_jaxpr(lambda *x: attention.self_attention(*x, implementation="auto"))(*a, mask))

    assert attention.uses_fused(q, k, v) and "lorajax_attention_fwd" in calls(q, k, v)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    assert not attention.uses_fused(*low) and "lorajax_attention_fwd" not in calls(*low)
    with pytest.raises(ValueError, match="choose one of"):
        attention.self_attention(q, k, v, mask, implementation="flash")


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(S=20, d=8)
    mask = _mask(20, True, None, pad=0)
    with pytest.raises(ValueError, match="self-attention without a cache"):
        attention_cpu.fused_attention(q, k[:, :5], v[:, :5], mask[:, :, :5])
    with pytest.raises(ValueError, match=r"wants q \[..., S, K, G, d\]"):
        attention_cpu.fused_attention(q[..., 0, :], k, v, mask)
    with pytest.raises(TypeError, match="float32; q is bfloat16"):
        attention_cpu.fused_attention(q.astype(jnp.bfloat16), k, v, mask)
    with pytest.raises(ValueError, match="needs causal=True"):
        attention_cpu.fused_attention(q, k, v, mask, causal=False, window=4)

    def loss(q):
        return jnp.sum(attention_cpu.fused_attention(q, k, v, mask) ** 2)

    with pytest.raises(NotImplementedError, match="first-order gradients only.*attention='blockwise'"):
        jax.grad(lambda q: jnp.sum(jax.grad(loss)(q) ** 2))(q)  # second order: a clear error, not an FFI one


def test_failed_build_falls_back_with_a_reason(monkeypatch, tmp_path):
    """No compiler (a fresh cache folder, $CXX pointing nowhere): the reason says so, "auto" warns once and
    takes the blockwise path, "fused" raises; the working kernel comes back afterwards."""
    monkeypatch.setenv("LORAJAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    attention_cpu._load.cache_clear()
    attention_cpu.warn_unavailable.cache_clear()
    try:
        assert not attention_cpu.available()
        assert "no-such-compiler" in attention_cpu.unavailable_reason()
        q, k, v = _qkv(S=20, d=8)
        mask = _mask(20, True, None, pad=0)
        with pytest.warns(RuntimeWarning, match="using blockwise attention"):
            o = attention.self_attention(q, k, v, mask)
        np.testing.assert_allclose(o, attention.dense_attention(q, k, v, mask), atol=1e-5)
        with pytest.raises(RuntimeError, match="unavailable"):
            attention_cpu.fused_attention(q, k, v, mask)
        assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind
    finally:
        monkeypatch.undo()
        attention_cpu._load.cache_clear()
        attention_cpu.warn_unavailable.cache_clear()
    assert attention_cpu.available()
