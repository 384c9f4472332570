"""SoRA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (official TsinghuaC3I/SoRA ``src/lora.py``, ``LowRankLinear``; PyTorch
layout ``lora_A: [r, in]``, ``lora_B: [out, r]``, ``gate: [1, r]``)::

    Δy = ((x lora_Aᵀ) ⊙ gate) lora_Bᵀ · α/r
    init: lora_A kaiming-uniform(a=√5), lora_B = 0, gate ~ N(0, 1)

Flax orientation here: ``A = lora_Aᵀ: [in, r]``, ``B = lora_Bᵀ: [r, out]``,
``W' = W + (α/r) A diag(g) B``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lorajax

D_IN, D_OUT, R, ALPHA = 7, 5, 3, 6.0


def _params(key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"dense": {"kernel": jax.random.normal(k1, (D_IN, D_OUT)), "bias": jax.random.normal(k2, (D_OUT,))}}


def _adapter(key=1):
    ka, kg, kb = jax.random.split(jax.random.key(key), 3)
    return {"lora_A": jax.random.normal(ka, (D_IN, R)), "gate": jax.random.normal(kg, (R,)),
            "lora_B": jax.random.normal(kb, (R, D_OUT))}


def _spec(**kw):
    return lorajax.Spec("sora", rank=R, alpha=ALPHA, targets=["dense"], **kw)


def test_init():
    params = {"a": {"kernel": jnp.zeros((400, 300))}, "b": {"kernel": jnp.zeros((200, 500))}}
    r = 64
    spec = lorajax.Spec("sora", rank=r, targets=["a", "b"])
    ad = lorajax.init(spec, params, jax.random.key(0))
    for name, (d_in, d_out) in (("a", (400, 300)), ("b", (200, 500))):
        leaf = ad[name]["kernel"]
        assert set(leaf) == {"lora_A", "lora_B", "gate"}
        a, g, b = (np.asarray(leaf[k]) for k in ("lora_A", "gate", "lora_B"))
        assert a.shape == (d_in, r) and g.shape == (r,) and b.shape == (r, d_out)
        assert not np.any(b)
        bound = 1 / math.sqrt(d_in)  # kaiming-uniform a=√5 on [r, in]
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
        assert abs(g.mean()) < 0.35 and 0.75 < g.std() < 1.25  # N(0, 1)
    assert not np.array_equal(ad["a"]["kernel"]["gate"], ad["b"]["kernel"]["gate"])
    other = lorajax.init(spec, params, jax.random.key(1))
    assert not np.array_equal(ad["a"]["kernel"]["gate"], other["a"]["kernel"]["gate"])


def test_merged_weight_equation():
    params, ad = _params(), _adapter()
    merged = lorajax.merge(_spec(), params, {"dense": {"kernel": ad}})
    w, a, g, b = (np.asarray(v, np.float64) for v in (params["dense"]["kernel"], ad["lora_A"], ad["gate"],
                                                       ad["lora_B"]))
    want = w + (ALPHA / R) * a @ np.diag(g) @ b
    np.testing.assert_allclose(np.asarray(merged["dense"]["kernel"]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["dense"]["bias"], params["dense"]["bias"])


def test_factored_forward_matches_the_official_torch_formula():
    """The official forward in PyTorch layout, on the transposed factors."""
    model = nn.Dense(D_OUT, name="dense")
    x = jax.random.normal(jax.random.key(3), (4, D_IN))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("sora", rank=R, alpha=ALPHA, targets=".*")
    ad = _adapter()
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, {"params": {"kernel": ad}}, x)

    t = lambda v: torch.from_numpy(np.asarray(v, np.float64).copy())
    lora_a, lora_b, gate = t(ad["lora_A"]).T, t(ad["lora_B"]).T, t(ad["gate"])[None, :]  # [r,in], [out,r], [1,r]
    xt = t(x)
    base = torch.nn.functional.linear(xt, t(variables["params"]["kernel"]).T, t(variables["params"]["bias"]))
    want = base + ((xt @ lora_a.T).mul(gate) @ lora_b.T) * (ALPHA / R)
    np.testing.assert_allclose(np.asarray(y), want.numpy(), rtol=1e-5, atol=1e-5)


def test_gate_gradient():
    """∂L/∂g = s · Σ_tokens (x A) ⊙ (G Bᵀ) for L = Σ y ⊙ G."""
    params, ad = _params(), _adapter()
    w = params["dense"]["kernel"]
    x = jax.random.normal(jax.random.key(4), (6, D_IN))
    g_out = jax.random.normal(jax.random.key(5), (6, D_OUT))
    spec = _spec()
    (t,) = lorajax.select(spec, params)
    v = lorajax.registry.get("sora")
    for fn in (lambda a: jnp.sum(v.apply(x, w, a, t) * g_out), lambda a: jnp.sum((x @ v.adapted(w, a, t)) * g_out)):
        grad = jax.grad(fn)(ad)["gate"]
        want = (ALPHA / R) * jnp.sum((x @ ad["lora_A"]) * (g_out @ ad["lora_B"].T), axis=0)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_zero_gates_prune_to_a_smaller_lora():
    """Zero gate entries remove their rank-one terms: the update is a LoRA on the support S of g."""
    params, ad = _params(), _adapter()
    ad["gate"] = ad["gate"].at[1].set(0.0)
    merged = lorajax.merge(_spec(), params, {"dense": {"kernel": ad}})
    keep = np.array([0, 2])
    a_s = ad["lora_A"][:, keep] * ad["gate"][keep][None, :]
    lora_spec = lorajax.Spec("lora", rank=2, alpha=ALPHA * 2 / R, targets=["dense"])  # same s = α/r
    pruned = lorajax.merge(lora_spec, params, {"dense": {"kernel": {"lora_A": a_s, "lora_B": ad["lora_B"][keep]}}})
    np.testing.assert_allclose(np.asarray(merged["dense"]["kernel"]), np.asarray(pruned["dense"]["kernel"]),
                               rtol=1e-5, atol=1e-5)


def test_count_and_gate_is_trainable():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    assert lorajax.count_params(spec, params, ad)["trainable"] == R * (D_IN + D_OUT) + R
    assert lorajax.trainable_mask(spec, ad)["dense"]["kernel"]["gate"] is True


def test_bad_dtype_option():
    with pytest.raises(TypeError):
        _spec(dtype="float77")
    with pytest.raises(TypeError, match="unknown option"):
        _spec(gate_init="zeros")


@pytest.mark.parametrize("kw", [{}, {"rank_pattern": {"b": 2}, "dtype": "bfloat16"}])
def test_trainable_count_formula(kw):
    """The declared ``trainable_count`` is ``Σ r · (in + out) + r``, as counted on the adapters."""
    params = {"a": {"kernel": jnp.zeros((7, 5))}, "b": {"kernel": jnp.zeros((4, 9))}}
    spec = lorajax.Spec("sora", rank=3, targets=["a", "b"], **kw)
    ad = lorajax.init(spec, params, jax.random.key(0))
    ts = lorajax.select(spec, params)
    want = lorajax.count_params(spec, params, ad)["trainable"]
    assert lorajax.registry.get("sora").trainable_count(ts) == want
    assert want == sum(t.rank * (sum(t.matrix_shape) + 1) for t in ts)
