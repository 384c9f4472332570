"""8-bit Adam (`lorajax.optim.scale_by_adam_8bit`) and GaLore with 8-bit state (specs/optim.md §3.1, §3.5 test 6).

Against the equations (always): the dynamic maps' structure, round-trip error
bounds, state layout and size, 32-bit fallback = Adam, the toy quadratic vs
32-bit Adam, non-finite gradients, bad arguments.

Against bitsandbytes (``pytest.importorskip``; the reference is the 0.50.2
wheel on CPU torch):

* maps: bit-equal to ``create_dynamic_map``;
* quantisation: codes and absmax bit-equal to bnb's ``default``-backend
  ``quantize_blockwise`` kernel (exact nearest code), dequantisation bit-equal
  to its CPU kernel; against bnb's CPU C quantiser (a 65536-bin lookup table,
  not the exact nearest code) within the table's resolution;
* ``bnb.optim.Adam8bit`` steps on CPU: with bnb's CPU optimiser re-quantising
  through its exact ``default`` kernel, parameters agree to float32 rounding
  and the final codes/absmax are identical; with its CPU quantiser as shipped,
  most elements agree to 1e-5, the mean difference is < 1 % of the learning
  rate and none differs by a whole learning rate.

The official ``GaLoreAdamW8bit`` parity is in tests/parity/test_galore_torch.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorajax.optim import galore, scale_by_adam_8bit, skip_nonfinite, state_bytes
from lorajax.optim.adam8bit import (QuantizedMoment, adam_8bit_state_bytes, dequantize_blockwise, dynamic_map,
                                    quantize_blockwise)
from lorajax.optim.galore import galore_state_formula


def _heavy(rng, n, signed=True):
    """Values over ~8 decades (what Adam's moments look like), so every decade of the map is used."""
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-9, 2, n))).astype(np.float32)
    return x if signed else x * x


def _inner(state):
    return state.inner_state if hasattr(state, "inner_state") else state


# --- the maps and quantisation, from the equations ------------------------------------------------------------------

def test_dynamic_map_structure():
    s, u = dynamic_map(True), dynamic_map(False)
    for m in (s, u):
        assert m.shape == (256,) and m.dtype == np.float32 and np.all(np.diff(m) > 0) and m[-1] == 1.0
        assert np.count_nonzero(m == 0) == 1
    assert u[0] == 0 and np.all(u >= 0)
    assert s[0] == pytest.approx(-0.99296874) and np.count_nonzero(s < 0) == 127 and np.count_nonzero(s > 0) == 128
    # decade i = 0..6 holds 2^i (signed, per sign) or 2^(i+1) (unsigned) values in [0.1, 1)·10^(i-6)
    for i in range(7):
        lo, hi = 0.1 * 10.0 ** (i - 6), 10.0 ** (i - 6)
        assert np.count_nonzero((s > lo) & (s < hi)) == 2 ** i
        assert np.count_nonzero((u > lo) & (u < hi)) == 2 ** (i + 1)
    # the first value of each decade: the mean of linspace(0.1, 1, n+1)'s first two points
    assert u[1] == pytest.approx(1e-6 * (0.1 + 0.9 / 2 / 2), rel=1e-6)  # n = 2: linspace(0.1, 1, 3)
    with pytest.raises(ValueError):
        dynamic_map(True)[0] = 0.0  # read-only


@pytest.mark.parametrize("n", [1, 77, 256, 1000, 4100])
@pytest.mark.parametrize("signed", [True, False])
def test_roundtrip_is_nearest_code(n, signed):
    """Each element is dequantised to the map value nearest to x/a (times a); absmax is the block's max |x|."""
    rng = np.random.default_rng(n)
    x = _heavy(rng, n, signed)
    code = dynamic_map(signed)
    codes, absmax = quantize_blockwise(jnp.asarray(x), code, 256)
    assert codes.dtype == jnp.uint8 and codes.shape == x.shape and absmax.shape == (-(-n // 256),)
    a = np.repeat(np.asarray(absmax), 256)[:n]
    np.testing.assert_array_equal(np.asarray(absmax), [np.abs(b).max() for b in np.array_split(x, range(256, n, 256))])
    scaled = x.astype(np.float64) / a
    best = np.abs(scaled[:, None] - code[None, :].astype(np.float64)).min(axis=1)
    got = np.abs(scaled - code[np.asarray(codes)])
    np.testing.assert_allclose(got, best, rtol=0, atol=1e-6)  # nearest up to float32 rounding of x·(1/a)
    back = np.asarray(dequantize_blockwise(codes, absmax, code, 256))
    np.testing.assert_array_equal(back, code[np.asarray(codes)] * a)
    # relative to the block's absmax the error is at most half the widest gap of the map (1/2 · 0.0141;
    # the signed map's −1 end: −1 → −0.99297, the same half gap)
    assert np.all(np.abs(back - x) <= (0.5 * np.max(np.diff(code)) + 1e-6) * a)


def test_zero_block_and_exact_values():
    code = dynamic_map(True)
    x = np.concatenate([np.zeros(256, np.float32), 3.0 * code]).astype(np.float32)  # block 2 = the map × 3
    codes, absmax = quantize_blockwise(jnp.asarray(x), code, 256)
    np.testing.assert_array_equal(np.asarray(absmax), [0.0, 3.0])
    assert np.all(code[np.asarray(codes[:256])] == 0)
    np.testing.assert_array_equal(np.asarray(codes[256:]), np.arange(256))
    np.testing.assert_array_equal(np.asarray(dequantize_blockwise(codes, absmax, code, 256)), x)


# --- the optimiser, from the equations ------------------------------------------------------------------------------

def test_state_layout_and_bytes():
    params = {"big": jnp.ones((41, 100)), "exact": jnp.ones((16, 256)), "small": jnp.ones((10, 30)),
              "half": jnp.ones((80, 64), jnp.bfloat16), "bias": jnp.ones(7)}
    tx = scale_by_adam_8bit()
    s = _inner(tx.init(params))
    assert isinstance(s.mu["big"], QuantizedMoment) and s.mu["big"].codes.dtype == jnp.uint8
    assert s.mu["big"].codes.shape == (41, 100) and s.mu["big"].absmax.shape == (17,)  # ⌈4100/256⌉
    assert s.nu["exact"].absmax.shape == (16,)
    assert s.mu["half"].codes.shape == (80, 64)  # 5120 ≥ 4096 elements: 8-bit, whatever the dtype
    assert s.mu["small"].dtype == jnp.float32 and s.nu["bias"].dtype == jnp.float32  # < 4096: 32-bit
    expect = 2 * ((4100 + 4 * 17) + (4096 + 4 * 16) + (5120 + 4 * 20) + 4 * 300 + 4 * 7) + 4 + 4
    assert state_bytes(tx, params) == adam_8bit_state_bytes(params) == expect
    for kw in (dict(block_size=2048), dict(min_8bit_size=0), dict(min_8bit_size=10**6), dict(nonfinite="reset")):
        assert state_bytes(scale_by_adam_8bit(**kw), params) == adam_8bit_state_bytes(params, **kw), kw
    # the updates keep the gradients' dtype
    u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    assert u["half"].dtype == jnp.bfloat16 and u["big"].dtype == jnp.float32


def test_32bit_fallback_is_adam():
    """Below ``min_8bit_size`` the state is float32 and the step is optax's Adam (same ε placement)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((10, 30))}
    tx8, tx32 = scale_by_adam_8bit(), optax.scale_by_adam()
    s8, s32 = tx8.init(params), tx32.init(params)
    for _ in range(5):
        g = {"w": jnp.asarray(rng.standard_normal((10, 30)), jnp.float32)}
        u8, s8 = tx8.update(g, s8)
        u32, s32 = tx32.update(g, s32)
        # optax's 1 − float32(0.999)ᵗ is 1.3e-5 off at t = 1 (ours: −expm1(t·ln β), ~1e-7)
        np.testing.assert_allclose(u8["w"], u32["w"], rtol=2e-5, atol=1e-7)


def _quadratic(seed=0, n=(64, 128)):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(np.exp(rng.uniform(-2, 2, n)), jnp.float32)  # curvatures over 4 decades of e
    target = jnp.asarray(rng.standard_normal(n), jnp.float32)
    loss = lambda x: 0.5 * jnp.sum(h * (x - target) ** 2)  # noqa: E731
    return loss, jnp.zeros(n, jnp.float32)


def _descend(tx, loss, x, steps=300):
    state = tx.init(x)

    def step(carry, _):
        x, state = carry
        u, state = tx.update(jax.grad(loss)(x), state, x)
        x = optax.apply_updates(x, u)
        return (x, state), loss(x)

    (x, _), losses = jax.lax.scan(step, (x, state), None, length=steps)
    return x, np.asarray(losses)


def test_toy_quadratic_close_to_32bit():
    """specs §3.5 (6): on a quadratic the 8-bit optimiser tracks 32-bit Adam within block-wise quantisation error."""
    loss, x0 = _quadratic()
    lr = 3e-2
    x8, l8 = _descend(optax.chain(scale_by_adam_8bit(), optax.scale_by_learning_rate(lr)), loss, x0)
    x32, l32 = _descend(optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr)), loss, x0)
    l0 = float(loss(x0))
    assert l32[-1] < 1e-2 * l0 and l8[-1] < 1e-2 * l0  # both converge
    # the loss curves agree within a few percent of the starting loss at every step, the iterates to ~2 %
    assert np.max(np.abs(l8 - l32)) < 0.02 * l0
    rel = float(jnp.linalg.norm(x8 - x32) / jnp.linalg.norm(x32 - x0))
    assert rel < 0.02, rel
    # and the 8-bit state really is 8-bit here (8192 elements)
    assert isinstance(_inner(scale_by_adam_8bit().init(x0)).mu, QuantizedMoment)


def test_nonfinite_skip_keeps_state():
    params = {"w": jnp.zeros((64, 80)), "b": jnp.zeros(5)}
    tx = scale_by_adam_8bit()
    g = jax.tree.map(lambda x: jnp.full(x.shape, 0.3), params)
    _, state = tx.update(g, tx.init(params))
    bad = {"w": g["w"].at[3, 7].set(jnp.nan), "b": g["b"].at[0].set(jnp.inf)}
    u, after = jax.jit(tx.update)(bad, state)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
    assert int(after.skipped) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after.inner_state, state.inner_state)
    # the next finite step is the step the skipped one would have been
    u_next, later = tx.update(g, after)
    u_ref, _ = tx.update(g, state)
    jax.tree.map(np.testing.assert_array_equal, u_next, u_ref)
    assert int(later.inner_state.count) == 2


def test_nonfinite_reset_is_per_element():
    """``"reset"`` (bnb's CUDA kernel): a non-finite element gets m = v = 0 and a zero update; the rest step on."""
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.standard_normal((64, 80)), jnp.float32)
    tx = scale_by_adam_8bit(nonfinite="reset")
    s0 = tx.init({"w": g})
    u, s1 = tx.update({"w": g.at[3, 7].set(jnp.nan)}, s0)
    u_ref, s_ref = tx.update({"w": g.at[3, 7].set(0.0)}, s0)  # first step: g = 0 gives m = v = 0 as well
    assert bool(jnp.all(jnp.isfinite(u["w"]))) and float(u["w"][3, 7]) == 0.0
    np.testing.assert_array_equal(u["w"], u_ref["w"])
    jax.tree.map(np.testing.assert_array_equal, s1, s_ref)
    # second step: the element's moments restart from 0 while its neighbours keep theirs
    u2, s2 = tx.update({"w": g.at[0, 0].set(jnp.inf)}, s1)
    code = dynamic_map(True)
    m = dequantize_blockwise(s2.mu["w"].codes, s2.mu["w"].absmax, code)
    assert float(m[0, 0]) == 0.0 and float(u2["w"][0, 0]) == 0.0 and float(m[0, 1]) != 0.0
    assert bool(jnp.all(jnp.isfinite(s2.mu["w"].absmax))) and bool(jnp.all(jnp.isfinite(s2.nu["w"].absmax)))


@pytest.mark.parametrize("block_size", [0, 100, 8192, True, 256.0, "256"])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size must be one of"):
        scale_by_adam_8bit(block_size=block_size)
    with pytest.raises(ValueError, match="block_size must be one of"):
        quantize_blockwise(jnp.ones(10), dynamic_map(True), block_size)


@pytest.mark.parametrize("kw, match", [
    (dict(b1=1.0), "b1 must be"), (dict(b2=-0.1), "b2 must be"), (dict(eps=-1e-8), "eps must be"),
    (dict(eps=float("nan")), "eps must be"), (dict(min_8bit_size=-1), "min_8bit_size"),
    (dict(min_8bit_size=1.5), "min_8bit_size"), (dict(nonfinite="ignore"), "nonfinite must be"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        scale_by_adam_8bit(**kw)


def test_bad_map_and_absmax():
    with pytest.raises(ValueError, match="256-entry map"):
        quantize_blockwise(jnp.ones(10), jnp.zeros(255), 256)
    codes, absmax = quantize_blockwise(jnp.ones(600), dynamic_map(True), 256)
    with pytest.raises(ValueError, match=r"need \(3,\)"):
        dequantize_blockwise(codes, absmax[:2], dynamic_map(True), 256)


# --- GaLore with the 8-bit state ------------------------------------------------------------------------------------

def _galore_params():
    k = iter(jax.random.split(jax.random.key(0), 8))
    n = lambda *s: jax.random.normal(next(k), s)  # noqa: E731
    return {"q": {"kernel": n(300, 270)},       # moments 16×270 = 4320 ≥ 4096: 8-bit
            "o": {"kernel": n(40, 20)},         # moments 16×20: 32-bit
            "mlp": {"kernel": n(96, 512).astype(jnp.bfloat16)},  # 16×96 = 1536: 32-bit (float32, not bf16)
            "emb": {"embedding": n(100, 50)},   # untargeted, 5000: 8-bit
            "norm": {"scale": n(20)}}


@pytest.mark.parametrize("kw", [{}, dict(block_size=2048), dict(min_8bit_size=1000), dict(block_size=64)])
def test_galore_8bit_state_bytes_equal_formula(kw):
    params = _galore_params()
    tx = galore(1e-3, targets=["q", "o", "mlp"], rank=16, optim_bits=8, **kw)
    f = galore_state_formula(params, ["q", "o", "mlp"], rank=16, optim_bits=8, **kw)
    assert state_bytes(tx, params) == f.total
    bs, mb = kw.get("block_size", 256), kw.get("min_8bit_size", 4096)
    mom = lambda n: n + 4 * -(-n // bs) if n >= mb else 4 * n  # noqa: E731
    assert f.low_rank_moments == 2 * (mom(16 * 270) + mom(16 * 20) + mom(16 * 96))
    assert f.full_moments == 2 * (mom(5000) + mom(20))
    assert f.scalars == 4 * 3
    f32 = galore_state_formula(params, ["q", "o", "mlp"], rank=16)
    assert f.projector == f32.projector and f.total < f32.total
    base = tx.init(params)[0].base_optimizer_state.inner_state
    assert isinstance(base.mu["q"]["kernel"], QuantizedMoment) == (4320 >= mb)
    assert isinstance(base.mu["emb"]["embedding"], QuantizedMoment)


def test_galore_flag_is_the_8bit_base():
    params = _galore_params()
    grads = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)).astype(x.dtype),
                         params)
    a = galore(1e-2, targets=["q", "o"], rank=16, update_proj_gap=2, optim_bits=8)
    b = galore(1e-2, targets=["q", "o"], rank=16, update_proj_gap=2, base_optimizer=scale_by_adam_8bit())
    sa, sb = a.init(params), b.init(params)
    for _ in range(3):
        ua, sa = a.update(grads, sa, params)
        ub, sb = b.update(grads, sb, params)
        jax.tree.map(np.testing.assert_array_equal, ua, ub)


def test_galore_optim_bits_errors():
    with pytest.raises(ValueError, match="optim_bits must be 32 or 8"):
        galore(1e-3, rank=4, optim_bits=16)
    with pytest.raises(ValueError, match="cannot be combined"):
        galore(1e-3, rank=4, optim_bits=8, base_optimizer=optax.scale_by_adam())
    with pytest.raises(ValueError, match="cannot be combined"):
        galore(1e-3, rank=4, optim_bits=8, mu_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="only apply to optim_bits=8"):
        galore(1e-3, rank=4, block_size=2048)
    with pytest.raises(ValueError, match="block_size must be one of"):
        galore(1e-3, rank=4, optim_bits=8, block_size=300)
    with pytest.raises(ValueError, match="optim_bits must be 32 or 8"):
        galore_state_formula(_galore_params(), ["q"], rank=4, optim_bits=4)


def test_galore_8bit_nonfinite():
    """Between refreshes the 8-bit base skips a NaN step (zero update, moments kept); at a refresh optax's SVD
    makes the projector NaN, so only `skip_nonfinite` around the whole `galore` keeps the parameters finite."""
    params = {"q": {"kernel": jax.random.normal(jax.random.key(0), (300, 270))}}
    g = {"q": {"kernel": jax.random.normal(jax.random.key(1), (300, 270))}}
    bad = {"q": {"kernel": g["q"]["kernel"].at[5, 5].set(jnp.nan)}}
    tx = galore(1e-2, targets=["q"], rank=16, update_proj_gap=2, optim_bits=8)
    _, s1 = tx.update(g, tx.init(params), params)                  # step 0 (refresh)
    u, s2 = tx.update(bad, s1, params)                              # step 1: no refresh
    assert bool(jnp.all(u["q"]["kernel"] == 0))
    jax.tree.map(np.testing.assert_array_equal, s2[0].base_optimizer_state.inner_state,
                 s1[0].base_optimizer_state.inner_state)
    u, _ = tx.update(bad, s2, params)                               # step 2: refresh from a NaN gradient
    assert not bool(jnp.all(jnp.isfinite(u["q"]["kernel"])))
    safe = skip_nonfinite(tx)
    s = safe.init(params)
    _, s = safe.update(g, s, params)
    u, s_bad = safe.update(bad, s, params)
    u, s_bad = safe.update(bad, s_bad, params)
    assert bool(jnp.all(u["q"]["kernel"] == 0)) and int(s_bad.skipped) == 2
    jax.tree.map(np.testing.assert_array_equal, s_bad.inner_state, s.inner_state)


# --- parity with bitsandbytes (CPU) ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bnb():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    return bnb, torch


def _default_quantize(torch):
    """bnb's ``default``-backend (device-independent, exact nearest code) ``quantize_blockwise`` kernel."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return lambda a, code, block_size: op.redispatch(keys, a, code, block_size)


def _exact_requantise(monkeypatch, torch):
    """Make bnb's CPU 8-bit optimiser re-quantise with the exact ``default`` kernel instead of its lookup table."""
    cpu_ops = pytest.importorskip("bitsandbytes.backends.cpu.ops")
    if not hasattr(cpu_ops, "_quant_blockwise_fp32_direct"):
        pytest.skip("bitsandbytes' CPU optimiser has no _quant_blockwise_fp32_direct hook in this version")
    quantize = _default_quantize(torch)

    def exact(a, code, absmax_out, out_uint8, block_size):
        q, absmax = quantize(a, code, block_size)
        out_uint8.copy_(q)
        absmax_out.copy_(absmax)

    monkeypatch.setattr(cpu_ops, "_quant_blockwise_fp32_direct", exact)


def test_maps_equal_bitsandbytes(bnb):
    functional = bnb[0].functional
    np.testing.assert_array_equal(dynamic_map(True), functional.create_dynamic_map(signed=True).numpy())
    np.testing.assert_array_equal(dynamic_map(False), functional.create_dynamic_map(signed=False).numpy())


@pytest.mark.parametrize("n", [1, 77, 256, 1000, 4096, 5000])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [256, 2048])
def test_quantize_equals_bitsandbytes(bnb, n, signed, block_size):
    bnb_mod, torch = bnb
    functional = bnb_mod.functional
    rng = np.random.default_rng(n + block_size)
    x = _heavy(rng, n, signed)
    code = dynamic_map(signed)
    codes, absmax = quantize_blockwise(jnp.asarray(x), code, block_size)
    codes, absmax = np.asarray(codes), np.asarray(absmax)
    ref_codes, ref_absmax = _default_quantize(torch)(torch.tensor(x), torch.tensor(code), block_size)
    np.testing.assert_array_equal(codes, ref_codes.numpy())
    np.testing.assert_array_equal(absmax, ref_absmax.numpy())
    ours = np.asarray(dequantize_blockwise(codes, absmax, code, block_size))
    theirs = functional.dequantize_blockwise(torch.tensor(codes), absmax=torch.tensor(absmax),
                                             code=torch.tensor(code), blocksize=block_size).numpy()
    np.testing.assert_array_equal(ours, theirs)
    # bnb's public CPU quantiser (65536-bin table): same absmax, error at most one table bin (2/65535 · a) more
    cpu_codes, state = functional.quantize_blockwise(torch.tensor(x), code=torch.tensor(code), blocksize=block_size)
    np.testing.assert_array_equal(state.absmax.numpy(), absmax)
    cpu_back = functional.dequantize_blockwise(cpu_codes, state).numpy()
    a = np.repeat(absmax, block_size)[:n]
    assert np.all(np.abs(cpu_back - x) <= np.abs(ours - x) + (2 / 65535) * a * (1 + 1e-5))


def _adam8bit_runs(torch, bnb_mod, shapes, grads, lr):
    p0 = {k: np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s) for k, s in shapes.items()}
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    opt = bnb_mod.optim.Adam8bit(list(tp.values()), lr=lr)
    theirs = []
    for g in grads:
        for k, p in tp.items():
            p.grad = torch.tensor(g[k])
        opt.step()
        theirs.append({k: p.detach().numpy().copy() for k, p in tp.items()})
    tx = optax.chain(scale_by_adam_8bit(), optax.scale_by_learning_rate(lr))
    p = {k: jnp.asarray(v) for k, v in p0.items()}
    state, update, ours = tx.init(p), jax.jit(tx.update), []
    for g in grads:
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state)
        p = optax.apply_updates(p, u)
        ours.append({k: np.asarray(v) for k, v in p.items()})
    return ours, theirs, _inner(state[0]), {k: opt.state[tp[k]] for k in tp}


SHAPES = {"big": (41, 100), "exact": (64, 64), "small": (10, 30)}  # 4100 (partial last block), 4096, 300 (32-bit)


@pytest.mark.xla_optimized  # exact-share boundary / bit equality with bitsandbytes
def test_adam8bit_steps_equal_bitsandbytes(bnb, monkeypatch):
    """8 steps of ``bnb.optim.Adam8bit`` (CPU, re-quantising with bnb's exact kernel): equal to float32 rounding."""
    bnb_mod, torch = bnb
    _exact_requantise(monkeypatch, torch)
    rng = np.random.default_rng(0)
    grads = [{k: _heavy(rng, int(np.prod(s))).reshape(s) for k, s in SHAPES.items()} for _ in range(8)]
    ours, theirs, state, bnb_state = _adam8bit_runs(torch, bnb_mod, SHAPES, grads, lr=1e-2)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=f"{k} after step {step}")
    for k in ("big", "exact"):
        np.testing.assert_array_equal(np.asarray(state.mu[k].codes), bnb_state[k]["state1"].numpy())
        np.testing.assert_array_equal(np.asarray(state.nu[k].codes), bnb_state[k]["state2"].numpy())
        np.testing.assert_array_equal(np.asarray(state.mu[k].absmax), bnb_state[k]["absmax1"].numpy())
        np.testing.assert_array_equal(np.asarray(state.nu[k].absmax), bnb_state[k]["absmax2"].numpy())
    assert bnb_state["small"]["state1"].dtype == torch.float32
    np.testing.assert_allclose(np.asarray(state.mu["small"]), bnb_state["small"]["state1"].numpy(), rtol=1e-6,
                               atol=1e-7)


def test_adam8bit_steps_near_bitsandbytes_cpu_as_shipped(bnb):
    """With bnb's CPU lookup-table quantiser: the few elements whose moments sit below the table's resolution
    differ; after 8 steps ≥ 80 % of elements agree to 1e-5 (measured: 87 %), the mean difference is < 1 % of
    the learning rate (0.15 %) and none differs by a whole learning rate (max 0.2·lr)."""
    bnb_mod, torch = bnb
    rng = np.random.default_rng(1)
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(8)]
    lr = 1e-2
    ours, theirs, _, _ = _adam8bit_runs(torch, bnb_mod, SHAPES, grads, lr=lr)
    for k in SHAPES:
        d = np.abs(ours[-1][k] - theirs[-1][k])
        assert np.mean(d < 1e-5) >= 0.8 and d.mean() < 0.01 * lr and d.max() < lr, (k, np.mean(d < 1e-5), d.max())
    np.testing.assert_allclose(ours[-1]["small"], theirs[-1]["small"], rtol=1e-6, atol=1e-6)
