"""DyLoRA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (official huawei-noah/Efficient-NLP ``DyLoRA/loralib/DyLoRA.py``,
``run_glue.py``; Flax orientation ``W: [in, out]``, ``A: [in, r]``, ``B: [r, out]``)::

    W'_b = W + (α/r) · (√(r/b) A[:, :b]) (√(r/b) B[:b]) = W + (α/b) · A[:, :b] B[:b]
    training: b = randint(0, r) + 1; frozen mode: only A[:, b-1] and B[b-1] get a gradient
    evaluation: b = eval_rank (default r)
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import registry
from lorajax.variants import dylora
from lorajax.variants.base import Context

D_IN, D_OUT, R, ALPHA = 7, 5, 4, 6.0
V = registry.get("dylora")


def _params(key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"dense": {"kernel": jax.random.normal(k1, (D_IN, D_OUT)), "bias": jax.random.normal(k2, (D_OUT,))}}


def _adapter(key=1, r=R):
    ka, kb = jax.random.split(jax.random.key(key))
    return {"lora_A": jax.random.normal(ka, (D_IN, r)), "lora_B": jax.random.normal(kb, (r, D_OUT))}


def _spec(**kw):
    kw.setdefault("rank", R)
    kw.setdefault("alpha", ALPHA)
    return lorajax.Spec("dylora", targets=["dense"], **kw)


def _target(spec, params):
    (t,) = lorajax.select(spec, params)
    return t


def _ref_official(w, a, b_mat, r, b, alpha):
    """The official product: LoRA scale α/r times √(r/b) on each truncated factor (float64)."""
    a, b_mat, w = (np.asarray(v, np.float64) for v in (a, b_mat, w))
    f = math.sqrt(r / b)
    return w + (alpha / r) * (f * a[:, :b]) @ (f * b_mat[:b])


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_eval_rank_merged_equation(b):
    params, ad = _params(), _adapter()
    spec = _spec(eval_rank=b)
    merged = lorajax.merge(spec, params, {"dense": {"kernel": ad}})
    want = _ref_official(params["dense"]["kernel"], ad["lora_A"], ad["lora_B"], R, b, ALPHA)
    np.testing.assert_allclose(np.asarray(merged["dense"]["kernel"]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b", [1, 3])
def test_eval_rank_factored_equation(b):
    model = nn.Dense(D_OUT, name="dense")
    x = jax.random.normal(jax.random.key(3), (6, D_IN))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("dylora", rank=R, alpha=ALPHA, targets=".*", eval_rank=b)
    ad = _adapter()
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, {"params": {"kernel": ad}}, x)
    p = variables["params"]
    want = x @ p["kernel"] + p["bias"][None, :] + (ALPHA / b) * (x @ ad["lora_A"][:, :b]) @ ad["lora_B"][:b]
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_full_rank_is_lora():
    params = _params()
    tree = {"dense": {"kernel": _adapter()}}
    got = lorajax.merge(_spec(), params, tree)["dense"]["kernel"]
    want = lorajax.merge(lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=["dense"]), params, tree)["dense"]["kernel"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    got4 = lorajax.merge(_spec(eval_rank=R), params, tree)["dense"]["kernel"]
    np.testing.assert_array_equal(np.asarray(got4), np.asarray(got))


def test_init_is_lora_and_identity_for_every_rank():
    params = _params()
    ad = lorajax.init(_spec(), params, jax.random.key(0))["dense"]["kernel"]
    lo = lorajax.init(lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=["dense"]), params, jax.random.key(0))
    for k in ("lora_A", "lora_B"):
        np.testing.assert_array_equal(np.asarray(ad[k]), np.asarray(lo["dense"]["kernel"][k]))
    assert not np.any(np.asarray(ad["lora_B"]))
    t = _target(_spec(), params)
    w = params["dense"]["kernel"]
    for key in range(6):
        ctx = Context(rng=jax.random.key(key), train=True)
        np.testing.assert_array_equal(np.asarray(V.adapted(w, ad, t, ctx)), np.asarray(w))


def test_sampled_rank_is_uniform_over_1_to_r():
    keys = jax.random.split(jax.random.key(0), 4000)
    bs = np.asarray(jax.vmap(lambda k: dylora.sample_rank(k, R))(keys))
    assert set(bs.tolist()) == set(range(1, R + 1))
    freq = np.bincount(bs, minlength=R + 1)[1:] / len(bs)
    np.testing.assert_allclose(freq, 1.0 / R, atol=0.03)


def test_training_forward_uses_the_sampled_rank_in_both_forms():
    params, ad = _params(), _adapter()
    spec = _spec()
    t = _target(spec, params)
    w = params["dense"]["kernel"]
    x = jax.random.normal(jax.random.key(5), (3, D_IN))
    seen = set()
    for key in range(12):
        ctx = Context(rng=jax.random.key(key), train=True)
        b = int(dylora.sample_rank(ctx.rng, R))
        seen.add(b)
        want = _ref_official(w, ad["lora_A"], ad["lora_B"], R, b, ALPHA)
        np.testing.assert_allclose(np.asarray(V.adapted(w, ad, t, ctx)), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(V.apply(x, w, ad, t, ctx)), np.asarray(x, np.float64) @ want,
                                   rtol=1e-5, atol=1e-5)
    assert len(seen) > 1


@pytest.mark.parametrize("freeze", [True, False])
def test_gradients_reach_the_right_rows(freeze):
    params, ad = _params(), _adapter()
    spec = _spec(freeze_lower_ranks=freeze)
    t = _target(spec, params)
    w = params["dense"]["kernel"]
    x = jax.random.normal(jax.random.key(5), (3, D_IN))
    g_out = jax.random.normal(jax.random.key(6), (3, D_OUT))
    for key in range(8):
        ctx = Context(rng=jax.random.key(key), train=True)
        b = int(dylora.sample_rank(ctx.rng, R))
        for fn in (lambda a: jnp.sum((x @ V.adapted(w, a, t, ctx)) * g_out),
                   lambda a: jnp.sum(V.apply(x, w, a, t, ctx) * g_out)):
            g = jax.grad(fn)(ad)
            # the gradient of the rank-b formula with every factor live
            full = jax.grad(lambda a: jnp.sum(
                (x @ (w + (ALPHA / b) * a["lora_A"][:, :b] @ a["lora_B"][:b])) * g_out))(ad)
            live = [b - 1] if freeze else list(range(b))
            dead = [j for j in range(R) if j not in live]
            ga, gb = np.asarray(g["lora_A"]), np.asarray(g["lora_B"])
            np.testing.assert_allclose(ga[:, live], np.asarray(full["lora_A"])[:, live], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(gb[live], np.asarray(full["lora_B"])[live], rtol=1e-5, atol=1e-5)
            assert not np.any(ga[:, dead]) and not np.any(gb[dead])
            assert np.any(ga[:, b - 1]) and np.any(gb[b - 1])


def test_training_needs_a_key():
    params, ad = _params(), _adapter()
    t = _target(_spec(), params)
    with pytest.raises(ValueError, match="adapter_rng"):
        V.adapted(params["dense"]["kernel"], ad, t, Context(rng=None, train=True))


def test_step_rng_is_shared_by_all_targets():
    """With the un-folded ``step_rng`` in the context, b depends on it alone (one b per step, as the paper)."""
    params, ad = _params(), _adapter()
    t = _target(_spec(), params)
    w = params["dense"]["kernel"]
    step = jax.random.key(11)
    b = int(dylora.sample_rank(step, R))
    want = _ref_official(w, ad["lora_A"], ad["lora_B"], R, b, ALPHA)
    for layer_key in range(4):
        ctx = Context(rng=jax.random.key(100 + layer_key), step_rng=step, train=True)
        np.testing.assert_allclose(np.asarray(V.adapted(w, ad, t, ctx)), want, rtol=1e-5, atol=1e-5)


def _model_and_adapters():
    model = nn.Dense(D_OUT, name="dense")
    x = jax.random.normal(jax.random.key(3), (6, D_IN))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("dylora", rank=R, alpha=ALPHA, targets=".*")
    return model, x, variables, spec, {"params": {"kernel": _adapter()}}


def test_adapt_training_factored_equals_merged_and_is_one_rank():
    model, x, variables, spec, ad = _model_and_adapters()
    p = variables["params"]
    candidates = [x @ p["kernel"] + p["bias"][None, :]
                  + (ALPHA / b) * (x @ ad["params"]["kernel"]["lora_A"][:, :b]) @ ad["params"]["kernel"]["lora_B"][:b]
                  for b in range(1, R + 1)]
    fwd = {m: jax.jit(lorajax.adapt(model.apply, spec, mode=m), static_argnames="adapter_train")
           for m in ("factored", "merged")}
    used = set()
    for key in range(10):
        kw = dict(adapter_rng=jax.random.key(key), adapter_train=True)
        y_f = np.asarray(fwd["factored"](variables, ad, x, **kw))
        y_m = np.asarray(fwd["merged"](variables, ad, x, **kw))
        np.testing.assert_allclose(y_f, y_m, rtol=1e-5, atol=1e-5)
        match = [b for b, c in enumerate(candidates, 1) if np.allclose(y_f, np.asarray(c), rtol=1e-5, atol=1e-5)]
        assert len(match) == 1
        used.add(match[0])
    assert len(used) > 1, "the sampled rank never changed across steps"
    # evaluation (the default) is deterministic and uses the full rank
    y0 = np.asarray(fwd["factored"](variables, ad, x))
    np.testing.assert_allclose(y0, np.asarray(candidates[-1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y0, np.asarray(fwd["factored"](variables, ad, x, adapter_rng=jax.random.key(1))))


def test_training_step_compiles_once_for_every_rank():
    model, x, variables, spec, ad = _model_and_adapters()
    fwd = lorajax.adapt(model.apply, spec, mode="factored")
    traces = [0]

    @jax.jit
    def loss(ad, key):
        traces[0] += 1
        return jnp.sum(fwd(variables, ad, x, adapter_rng=key, adapter_train=True) ** 2)

    for key in range(6):
        jax.grad(loss)(ad, jax.random.key(key))
    assert traces[0] == 1


def test_merge_uses_the_same_rank_as_training_forward():
    model, x, variables, spec, ad = _model_and_adapters()
    key = jax.random.key(4)
    merged = lorajax.merge(spec, variables, ad, rng=key, train=True)
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, ad, x, adapter_rng=key, adapter_train=True)
    np.testing.assert_allclose(np.asarray(model.apply(merged, x)), np.asarray(y), rtol=1e-5, atol=1e-5)
    back = lorajax.unmerge(spec, lorajax.merge(spec, variables, ad), ad)
    np.testing.assert_allclose(np.asarray(back["params"]["kernel"]), np.asarray(variables["params"]["kernel"]),
                               rtol=1e-5, atol=1e-5)


def test_eval_rank_larger_than_rank_raises_naming_the_module():
    params = _params()
    spec = _spec(eval_rank=R + 1)
    ad = lorajax.init(spec, params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"dense.*eval_rank"):
        lorajax.merge(spec, params, ad)


@pytest.mark.parametrize("kw, match", [
    (dict(eval_rank=0), "eval_rank"), (dict(eval_rank="2"), "eval_rank"), (dict(eval_rank=True), "eval_rank"),
    (dict(freeze_lower_ranks="yes"), "freeze_lower_ranks"),
])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        _spec(**kw)


def test_count_is_lora_count():
    params = _params()
    spec = _spec()
    counts = lorajax.count_params(spec, params, lorajax.init(spec, params, jax.random.key(0)))
    assert counts["trainable"] == R * (D_IN + D_OUT) and counts["frozen_adapter"] == 0
