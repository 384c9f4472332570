"""`lorajax.groups`: ordered rules -> one Spec with per-module rank, labels, counts, grouped optimisers.

The spec's tests (../shared/specs/applications.md §3, CDDM): a toy model with a 2-layer "vision" MLP, a
linear "projector" and a 2-layer "LM" MLP; rules vision r=4, projector r=2, LM r=8.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.groups import Rule, Rules, grouped_tx

SIZES = {"vision": [(6, 8), (8, 8)], "projector": [(8, 10)], "lm": [(10, 12), (12, 9)]}
RANKS = {"vision": 4, "projector": 2, "lm": 8}


class MLP(nn.Module):
    widths: tuple

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.Dense(w, name=f"fc{i}")(x)
            x = nn.gelu(x) if i < len(self.widths) - 1 else x
        return x


class Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = MLP((8, 8), name="vision")(x)
        x = nn.Dense(10, name="projector")(x)
        x = nn.LayerNorm(name="norm")(x)
        return MLP((12, 9), name="lm")(x)


def rules(**mults):
    return Rules(
        [
            Rule(r"vision\..*", "vision", rank=4, alpha=8, lr_mult=mults.get("vision", 1.0)),
            Rule(["projector"], "projector", rank=2, alpha=4, lr_mult=mults.get("projector", 1.0)),
            Rule(["lm.fc0", "lm.fc1"], "lm", rank=8, alpha=16, lr_mult=mults.get("lm", 1.0)),
        ]
    )


@pytest.fixture(scope="module")
def setup():
    model = Toy()
    x = jax.random.normal(jax.random.key(0), (4, 6))
    params = model.init(jax.random.key(1), x)
    return model, params, x, rules().apply(params, jax.random.key(2))


def normal_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda t: rng.standard_normal(t.shape).astype(np.float32), tree)


def test_labels_counts_and_ranks(setup):
    _, params, _, g = setup
    want = {grp: RANKS[grp] * sum(i + o for i, o in SIZES[grp]) for grp in SIZES}
    assert g.report.counts == want
    assert g.report.matched == {
        r"vision:lora:vision\..*": ["vision.fc0", "vision.fc1"],
        "projector:lora:['projector']": ["projector"],
        "lm:lora:['lm.fc0', 'lm.fc1']": ["lm.fc0", "lm.fc1"],
    }
    assert g.report.frozen == ["norm"]
    lora = g.labels["lora"]["params"]
    assert lora["vision"]["fc1"]["kernel"] == {"lora_A": "vision/A", "lora_B": "vision/B"}
    assert lora["projector"]["kernel"] == {"lora_A": "projector/A", "lora_B": "projector/B"}
    assert lora["lm"]["fc0"]["kernel"] == {"lora_A": "lm/A", "lora_B": "lm/B"}
    assert g.labels["full"] == {}
    a = g.adapters["params"]
    for grp, mods in (("vision", ["fc0", "fc1"]), ("lm", ["fc0", "fc1"])):
        for m, (i, o) in zip(mods, SIZES[grp]):
            assert a[grp][m]["kernel"]["lora_A"].shape == (i, RANKS[grp])
            assert a[grp][m]["kernel"]["lora_B"].shape == (RANKS[grp], o)
    assert a["projector"]["kernel"]["lora_A"].shape == (8, 2)
    # the first matching rule wins: a later catch-all rule claims only what is left
    g2 = Rules([*rules().rules, Rule(".*", "rest", kind="full")]).apply(params, 0)
    assert g2.report.matched["rest:full:.*"] == ["norm"]
    assert g2.report.counts["rest"] == 20  # LayerNorm scale + bias, 10 each
    assert g2.labels["full"]["params"]["norm"] == {"bias": "rest/full", "scale": "rest/full"}
    assert g2.param_labels["params"]["vision"]["fc0"]["kernel"] == "frozen"


def test_sgd_step_scales_by_group(setup):
    _, params, _, g = setup
    grads = normal_like(g.trainable, 0)
    lr = 0.5
    tx = grouped_tx(g.labels, optax.sgd, lr, rules(vision=0.1).mults())
    upd, _ = tx.update(grads, tx.init(g.trainable))
    # the LM-equivalent update of the same gradient: mult 1 (the projector / LM groups here)
    for grp, mult in (("vision", 0.1), ("projector", 1.0), ("lm", 1.0)):
        du = jax.tree_util.tree_leaves(upd["lora"]["params"][grp])
        dg = jax.tree_util.tree_leaves(grads["lora"]["params"][grp])
        ratio = np.sqrt(sum(float(jnp.sum(u**2)) for u in du)) / np.sqrt(sum(float(jnp.sum((lr * d) ** 2)) for d in dg))
        np.testing.assert_allclose(ratio, mult, rtol=1e-6)
        for u, d in zip(du, dg):
            np.testing.assert_allclose(u, -lr * mult * d, rtol=1e-6, atol=1e-7)


def test_adam_first_step_is_lr_times_mult(setup):
    _, params, _, g = setup
    mults = {"vision": 0.1, "projector": 1.0, "lm": 2.0, "lm/B": 3.0}
    grads = normal_like(g.trainable, 1)
    tx = grouped_tx(g.labels, lambda lr: optax.adam(lr, eps=1e-12), 1e-3, mults)
    upd, _ = jax.jit(tx.update)(grads, tx.init(g.trainable))  # one compile instead of ~100 eager ops
    for path, u in jax.tree_util.tree_flatten_with_path(upd)[0]:
        keys = [p.key for p in path]
        grp, role = keys[2], "B" if keys[-1] == "lora_B" else "A"
        mult = mults.get(f"{grp}/{role}", mults[grp])
        gr = grads
        for k in keys:
            gr = gr[k]
        nz = np.asarray(gr) != 0
        # float32: |g| / sqrt(g^2) is 1 to ~1e-5 relative (|error| ~1e-8 << 1e-6 absolute)
        np.testing.assert_allclose(np.abs(np.asarray(u))[nz], 1e-3 * mult, rtol=1e-5, atol=0)


def test_strict_and_bad_mults(setup):
    _, params, _, g = setup
    bad = Rules([*rules().rules, Rule(["text_tower"], "text")])
    with pytest.raises(ValueError, match=r"text:lora:\['text_tower'\]"):
        bad.apply(params, 0)
    assert bad.apply(params, 0, strict=False).report.unmatched_rules == ["text:lora:['text_tower']"]
    with pytest.raises(ValueError, match="'audio' is not a group"):
        grouped_tx(g.labels, optax.sgd, 0.1, {"audio": 2.0})
    with pytest.raises(ValueError, match="lr_mult"):
        Rules([Rule(["a"], "g", lr_mult=1.0), Rule(["b"], "g", lr_mult=2.0)])
    with pytest.raises(ValueError, match="kind"):
        Rule(["a"], "g", kind="half")


def test_frozen_label_and_full_modules(setup):
    _, params, _, _ = setup
    r = Rules([Rule(["projector"], "proj", kind="full"), Rule(["lm.fc1"], "lm", rank=2)])
    g = r.apply(params, 0)
    assert g.report.counts == {"proj": 8 * 10 + 10, "lm": 2 * (12 + 9)}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    tx = grouped_tx(g.param_labels, optax.sgd, 0.1)
    upd, _ = tx.update(grads, tx.init(params))
    assert float(jnp.abs(upd["params"]["vision"]["fc0"]["kernel"]).max()) == 0.0
    np.testing.assert_allclose(upd["params"]["projector"]["kernel"], -0.1)


def test_factored_equals_merged_for_grouped_spec(setup):
    model, params, x, _ = setup
    g = Rules([*rules().rules, Rule(["norm"], "norm", kind="full")]).apply(params, 5)
    # B != 0 so the adapters change the output
    trainable = jax.tree_util.tree_map(lambda t: t + 0.1, g.trainable)
    p, a = g.unpack(params, trainable)
    fac = lorajax.adapt(model.apply, g.spec, mode="factored")(p, a, x)
    mer = lorajax.adapt(model.apply, g.spec, mode="merged")(p, a, x)
    np.testing.assert_allclose(fac, mer, rtol=1e-5, atol=1e-5)
    assert not np.allclose(fac, model.apply(params, x), atol=1e-3)
    # merged weight = W + (alpha / r) A B with each rule's own rank and alpha
    merged = lorajax.merge(g.spec, p, a)
    k = a["params"]["lm"]["fc0"]["kernel"]
    np.testing.assert_allclose(
        merged["params"]["lm"]["fc0"]["kernel"],
        p["params"]["lm"]["fc0"]["kernel"] + (16 / 8) * k["lora_A"] @ k["lora_B"],
        rtol=1e-5,
        atol=1e-6,
    )
