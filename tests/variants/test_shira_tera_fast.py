"""The fused SHiRA / TeRA paths equal the previous two-product formulas (`apply_reference`), values and gradients.

``shira.apply``: ``x (W + c·S)`` in one matmul (`shira.fused_matmul`) vs ``x W + c·(x S)``.
``tera.apply`` with ``compute="dense"``: ``x (K + ΔK)`` (`tera.fused_matmul`) vs ``x K + factored_update(x)``.
Random inputs, random adapter values, gradients wrt the input, the base weight and the adapter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.variants import shira, tera

D_IN, D_OUT, T = 12, 10, 5


def _close(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=2e-5)


def _shira_setup(**opts):
    spec = lorajax.Spec("shira", rank=2, targets=["d"], **opts)
    params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (D_IN, D_OUT))}}
    (t,) = lorajax.select(spec, params)
    leaf = dict(lorajax.init(spec, params, 0)["d"]["kernel"])
    values = jax.random.normal(jax.random.key(1), leaf["shira_weight"].shape)
    return t, params["d"]["kernel"], leaf["shira_indices"], values


@pytest.mark.parametrize("backward", shira.BACKWARDS)
def test_shira_fused_equals_reference(backward):
    t, w, idx, v = _shira_setup(backward=backward, scale=0.7)
    x = jax.random.normal(jax.random.key(2), (T, D_IN))
    g = jax.random.normal(jax.random.key(3), (T, D_OUT))

    def loss(fn):
        return lambda xx, ww, vv: jnp.sum(jnp.sin(fn(xx, ww, {"shira_weight": vv, "shira_indices": idx}, t)) * g)

    adapter = {"shira_weight": v, "shira_indices": idx}
    _close(shira.apply(x, w, adapter, t), shira.apply_reference(x, w, adapter, t))
    for argnums in ((0, 1, 2), (2,)):  # everything differentiated; only the values (the frozen-base step)
        got = jax.grad(loss(shira.apply), argnums=argnums)(x, w, v)
        want = jax.grad(loss(shira.apply_reference), argnums=argnums)(x, w, v)
        _close(got, want)


def test_shira_frozen_base_step_has_no_weight_sized_product():
    """``backward="sampled"``, base frozen: no ``[in, out]`` dot in the gradient (``"dense"`` has one)."""
    x = jax.random.normal(jax.random.key(2), (T, D_IN))
    for backward, want in (("sampled", 0), ("dense", 1)):
        t, w, idx, v = _shira_setup(backward=backward)
        grad = jax.grad(lambda vv: jnp.sum(shira.apply(x, w, {"shira_weight": vv, "shira_indices": idx}, t) ** 2))
        jaxpr = jax.make_jaxpr(grad)(v).jaxpr
        dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
        assert sum(tuple(e.outvars[0].aval.shape) == (D_IN, D_OUT) for e in dots) == want, backward


def test_shira_mixed_dtypes_use_the_reference():
    t, w, idx, v = _shira_setup()
    x = jax.random.normal(jax.random.key(2), (T, D_IN), jnp.bfloat16)
    adapter = {"shira_weight": v, "shira_indices": idx}
    w16 = w.astype(jnp.bfloat16)
    np.testing.assert_array_equal(shira.apply(x, w16, adapter, t), shira.apply_reference(x, w16, adapter, t))


def test_tera_dense_equals_reference():
    spec = lorajax.Spec("tera", rank=3, targets=["d"], compute="dense", factors=((3, 2, 2), (5, 1, 2)))
    params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (D_IN, D_OUT))}}
    (t,) = lorajax.select(spec, params)
    ad = lorajax.init(spec, params, 0)
    lams = {k: jax.random.normal(jax.random.key(i), a.shape) for i, (k, a) in enumerate(ad["d"]["kernel"].items())}
    shared = ad["_shared"]
    x = jax.random.normal(jax.random.key(9), (T, D_IN))
    g = jax.random.normal(jax.random.key(8), (T, D_OUT))
    w = params["d"]["kernel"]

    def loss(fn):
        return lambda xx, ww, lam: jnp.sum(jnp.sin(fn(xx, ww, {**lam, **shared}, t)) * g)

    _close(tera.apply(x, w, {**lams, **shared}, t), tera.apply_reference(x, w, {**lams, **shared}, t))
    for argnums in ((0, 1, 2), (2,)):
        _close(
            jax.grad(loss(tera.apply), argnums=argnums)(x, w, lams),
            jax.grad(loss(tera.apply_reference), argnums=argnums)(x, w, lams),
        )
    with pytest.raises(ValueError, match="compute"):
        lorajax.Spec("tera", rank=3, targets=["d"], compute="fast")
