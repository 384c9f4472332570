"""Bone: a registry alias of MiSS (lorajax/variants/miss.py; the full tests are test_miss.py).

PEFT's ``BoneConfig`` (removed in PEFT 2e49b6f6) had, in every release from
0.14.0 on, MiSS's default mode (``ΔW[i, o] = D[i mod r, o]``) and its ``"bat"``
mode (``W'_{q,p} = W_{q,p} + W_{q,p} D_q + D_q`` in torch layout) with the same
tensor ``bone_block`` (PEFT's converter renames it ``miss_block``). These
checks pin that ``"bone"`` gives exactly those two maths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import lorajax
from lorajax import registry


def test_alias_is_the_miss_variant():
    assert registry.get("bone") is registry.get("miss")
    spec = lorajax.Spec("bone", rank=4, targets=["dense"])
    assert spec.variant == "bone" and spec.options["init_weights"] is True


def _merged(mode, r, d_in, d_out):
    w = jax.random.normal(jax.random.key(0), (d_in, d_out))
    params = {"dense": {"kernel": w}}
    spec = lorajax.Spec("bone", rank=r, targets=["dense"], init_weights=mode)
    ad = lorajax.init(spec, params, 0)
    d = jax.random.normal(jax.random.key(1), ad["dense"]["kernel"]["miss_block"].shape)
    merged = lorajax.merge(spec, params, {"dense": {"kernel": {"miss_block": d}}})["dense"]["kernel"]
    return np.asarray(w, np.float64), np.asarray(d, np.float64), np.asarray(merged, np.float64)


def test_bone_default_mode():
    w, d, merged = _merged(True, 4, 10, 6)
    want = w + np.array([[d[i % 4, o] for o in range(6)] for i in range(10)])
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-5)


def test_bone_bat_mode():
    r = 2
    w, d, merged = _merged("bat", r, 4, 6)
    wt = w.T
    want = wt.copy()
    for q in range(6 // r):
        for p in range(4 // r):
            blk = wt[q * r:(q + 1) * r, p * r:(p + 1) * r]
            want[q * r:(q + 1) * r, p * r:(p + 1) * r] = blk + blk @ d[q] + d[q]
    np.testing.assert_allclose(merged, want.T, rtol=1e-5, atol=1e-5)
    assert jnp.asarray(d).shape == (3, 2, 2)
