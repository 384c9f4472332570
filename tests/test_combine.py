"""`lorajax.combination`: combining LoRA adapters (PEFT's ``add_weighted_adapter``) and task arithmetic.

Parity: a tiny HF Llama with four PEFT LoRA adapters (ranks 2, 2, 2, 3, different alphas, random non-zero B);
every method's combined ΔW per target equals PEFT's (f32, ≤1e-5 relative), DARE fed PEFT's own Bernoulli masks.
Then the defining equations on random inputs, task arithmetic, and the errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorajax  # noqa: E402
from lorajax import combination  # noqa: E402

RANKS, ALPHAS = (2, 2, 2, 3), (4.0, 3.0, 8.0, 6.0)
TARGETS = ["q_proj", "v_proj"]
WEIGHTS = [0.5, -0.3, 0.8]
EQUAL = ("a0", "a1", "a2")  # equal ranks: every method
MIXED = ("a0", "a1", "a3")  # ranks 2, 2, 3: cat and the svd methods


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("combine")
    hc = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(hc).eval()
    base.save_pretrained(root / "base", safe_serialization=True)
    _, params = lorajax.models.from_pretrained(root / "base")
    pm = None
    for i, (r, a) in enumerate(zip(RANKS, ALPHAS)):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=r, lora_alpha=a, target_modules=TARGETS, init_lora_weights=False)
        if pm is None:
            pm = peft.get_peft_model(base, cfg, adapter_name=f"a{i}")
        else:
            pm.add_adapter(f"a{i}", cfg)
    modules = dict(pm.base_model.model.named_modules())
    specs, trees = {}, {}
    for i, (r, a) in enumerate(zip(RANKS, ALPHAS)):
        name = f"a{i}"
        spec = lorajax.Spec("lora", rank=r, alpha=a, targets=TARGETS)
        flat = {}
        for t in lorajax.select(spec, params):
            m = modules[t.name]
            flat[t.keys] = {
                "lora_A": jnp.asarray(m.lora_A[name].weight.detach().numpy().T),
                "lora_B": jnp.asarray(m.lora_B[name].weight.detach().numpy().T),
            }
        specs[name], trees[name] = spec, lorajax.plan.nest(flat)
    return pm, params, specs, trees


def _peft_deltas(pm, name):
    """PEFT's ``s·B A`` per module, as ``[in, out]``."""
    out = {}
    for mod_name, m in pm.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer) and name in m.lora_A:
            with torch.no_grad():
                out[mod_name] = m.get_delta_weight(name).numpy().T
    return out


def _lorajax_deltas(spec, params, tree):
    d = combination.delta(spec, params, tree)
    return {t.name: np.asarray(_at(d, t.keys)) for t in lorajax.select(spec, params)}


def _at(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _close(got, want, tol=1e-5):
    assert set(got) == set(want)
    for k in want:
        scale = np.abs(want[k]).max()
        assert scale > 1e-3, k  # non-trivial deltas
        err = np.abs(got[k] - want[k]).max()
        assert err <= tol * scale, (k, err, scale)


def _peft_combine(pm, names, method, density, monkeypatch):
    """PEFT's combined adapter and the Bernoulli masks it drew, per module name: ``[(entry, [in, ...] mask)]``."""
    drawn = []
    original = peft.utils.merge_utils.random_pruning

    def recording(tensor, density, rescale):
        mask = torch.bernoulli(torch.full_like(tensor, density))
        drawn.append(mask.numpy().T)
        return tensor * mask / density if rescale else tensor * mask

    monkeypatch.setattr(peft.utils.merge_utils, "random_pruning", recording)
    new = f"{method}_{len(names)}"
    torch.manual_seed(3)
    kw = {"density": density} if density is not None else {}
    pm.add_weighted_adapter(list(names), WEIGHTS, new, combination_type=method, **kw)
    monkeypatch.setattr(peft.utils.merge_utils, "random_pruning", original)
    return new, drawn


def _masks_tree(pm, new, drawn, params, spec, n, svd):
    """PEFT's masks in the order it drew them (per module: each adapter's A then each B, or each ΔW) as trees."""
    order = [k for k, m in pm.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    keys = {t.name: t.keys for t in lorajax.select(spec, params)}
    per = n if svd else 2 * n
    assert len(drawn) == per * len(order)
    flat = [dict() for _ in range(n)]
    for j, mod in enumerate(order):
        chunk = drawn[j * per : (j + 1) * per]
        for i in range(n):
            entry = {"delta": chunk[i]} if svd else {"lora_A": chunk[i], "lora_B": chunk[n + i]}
            flat[i][keys[mod]] = {k: jnp.asarray(v) for k, v in entry.items()}
    return [lorajax.plan.nest(f) for f in flat]


CASES = [
    ("linear", EQUAL, None),
    ("ties", EQUAL, 0.5),
    ("dare_linear", EQUAL, 0.6),
    ("dare_ties", EQUAL, 0.6),
    ("magnitude_prune", EQUAL, 0.4),
    ("cat", MIXED, None),
    ("svd", MIXED, None),
    ("ties_svd", MIXED, 0.5),
    ("dare_linear_svd", MIXED, 0.6),
    ("dare_ties_svd", MIXED, 0.6),
    ("magnitude_prune_svd", MIXED, 0.4),
]


@pytest.mark.parametrize("method,names,density", CASES, ids=[c[0] for c in CASES])
def test_combined_delta_matches_peft(setup, method, names, density, monkeypatch):
    pm, params, specs, trees = setup
    new, drawn = _peft_combine(pm, names, method, density, monkeypatch)
    sp = [specs[n] for n in names]
    masks = None
    if method.startswith("dare"):
        masks = _masks_tree(pm, new, drawn, params, sp[0], len(names), method.endswith("_svd"))
    spec, tree = combination.combine(
        sp, [trees[n] for n in names], WEIGHTS, params, method, density=density, masks=masks
    )
    cfg = pm.peft_config[new]
    assert (spec.rank, spec.alpha) == (cfg.r, cfg.lora_alpha)
    _close(_lorajax_deltas(spec, params, tree), _peft_deltas(pm, new), tol=1e-5)


# ----------------------------------------------------------------------------- defining equations


def _ties_by_hand(xs, w, density, method):
    xs = np.stack(xs)
    k = int(density * xs[0].size)
    trimmed = np.zeros_like(xs)
    for i, x in enumerate(xs):
        keep = np.argsort(-np.abs(x).ravel())[:k]
        trimmed[i].ravel()[keep] = x.ravel()[keep]
    vote = trimmed.sum(0) if method == "total" else np.sign(trimmed).sum(0)
    elected = np.where(vote >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == elected[None]
    weighted = trimmed * np.asarray(w)[:, None, None]
    return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_is_trim_elect_disjoint_mean(sign_method):
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(16, 2)).astype(np.float32) for _ in range(3)]
    got = combination.merge_tensors(xs, WEIGHTS, "ties", density=0.5, majority_sign_method=sign_method)
    np.testing.assert_allclose(got, _ties_by_hand(xs, WEIGHTS, 0.5, sign_method), rtol=1e-6, atol=1e-7)


def test_trim_keeps_the_int_density_n_largest():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 8)).astype(np.float32))
    for density in (0.29, 1.0):  # int(0.29 * 128) = 37: PEFT's int(), not round()
        kept = np.asarray(combination.trim(x, density))
        k = int(density * x.size)
        nz = kept != 0
        assert nz.sum() == k
        np.testing.assert_array_equal(kept[nz], np.asarray(x)[nz])  # kept entries unchanged
        if k < x.size:
            assert np.abs(kept[nz]).min() >= np.abs(np.asarray(x)[~nz]).max()


def test_dare_drops_and_rescales_with_given_masks_and_draws_from_key():
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(16, 2)).astype(np.float32) for _ in range(3)]
    masks = [rng.random((16, 2)) < 0.6 for _ in range(3)]
    got = combination.merge_tensors(xs, WEIGHTS, "dare_linear", density=0.6, masks=masks)
    want = sum(w * m * x / 0.6 for w, m, x in zip(WEIGHTS, masks, xs))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_cat_and_full_rank_svd_are_the_weighted_sum_of_deltas(setup):
    pm, params, specs, trees = setup
    sp, tr = [specs[n] for n in MIXED], [trees[n] for n in MIXED]
    want = combination.add([combination.delta(s, params, t) for s, t in zip(sp, tr)], WEIGHTS)
    for method, kw in (("cat", {}), ("svd", {"rank": sum(RANKS[i] for i in (0, 1, 3))})):
        spec, tree = combination.combine(sp, tr, WEIGHTS, params, method, **kw)
        assert spec.rank == spec.alpha == 7 and not spec.options["use_rslora"]
        got = combination.delta(spec, params, tree)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5 * np.abs(np.asarray(w)).max()


def test_dare_from_a_key_is_reproducible_and_one_adapter_is_linear(setup):
    pm, params, specs, trees = setup
    sp, tr = [specs[n] for n in EQUAL], [trees[n] for n in EQUAL]
    one = combination.combine(sp, tr, WEIGHTS, params, "dare_ties", density=0.6, key=jax.random.key(0))[1]
    again = combination.combine(sp, tr, WEIGHTS, params, "dare_ties", density=0.6, key=jax.random.key(0))[1]
    other = combination.combine(sp, tr, WEIGHTS, params, "dare_ties", density=0.6, key=jax.random.key(1))[1]
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(one)]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(leaves, jax.tree_util.tree_leaves(again)))
    assert not all(np.array_equal(a, np.asarray(b)) for a, b in zip(leaves, jax.tree_util.tree_leaves(other)))
    # one adapter: always linear, giving w·ΔW exactly (as PEFT)
    spec, tree = combination.combine(sp[:1], tr[:1], [-0.7], params, "ties", density=0.5)
    got, want = combination.delta(spec, params, tree), combination.scale(combination.delta(sp[0], params, tr[0]), -0.7)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_svd_clamp_clips_both_factors_at_the_quantile(setup):
    pm, params, specs, trees = setup
    sp, tr = [specs[n] for n in MIXED], [trees[n] for n in MIXED]
    _, free = combination.combine(sp, tr, WEIGHTS, params, "svd")
    _, clipped = combination.combine(sp, tr, WEIGHTS, params, "svd", svd_clamp=0.9)
    t = lorajax.select(sp[0], params)[0]
    a, b = (np.asarray(_at(free, t.keys)[k]) for k in ("lora_A", "lora_B"))
    hi = np.quantile(np.concatenate([b.ravel(), a.ravel()]), 0.9)
    np.testing.assert_allclose(_at(clipped, t.keys)["lora_A"], np.clip(a, -hi, hi), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_at(clipped, t.keys)["lora_B"], np.clip(b, -hi, hi), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- task arithmetic


def test_negate_then_add_is_zero_and_sum_of_deltas_is_sequential_merge(setup):
    pm, params, specs, trees = setup
    d0, d3 = (combination.delta(specs[n], params, trees[n]) for n in ("a0", "a3"))
    for leaf in jax.tree_util.tree_leaves(combination.add([d0, combination.negate(d0)])):
        assert float(jnp.abs(leaf).max()) == 0.0
    seq = lorajax.merge(specs["a3"], lorajax.merge(specs["a0"], params, trees["a0"]), trees["a3"])
    once = combination.apply_delta({"params": params}, combination.add([d0, d3]))["params"]
    for path, w in jax.tree_util.tree_flatten_with_path(seq)[0]:
        np.testing.assert_allclose(_at(once, [p.key for p in path]), w, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_bad_input(setup):
    pm, params, specs, trees = setup
    sp, tr = [specs[n] for n in EQUAL], [trees[n] for n in EQUAL]
    with pytest.raises(ValueError, match="unknown combination method 'tie'.*'ties_svd'"):
        combination.combine(sp, tr, WEIGHTS, params, "tie")
    with pytest.raises(ValueError, match="weights has 2 entries for 3 adapters"):
        combination.combine(sp, tr, WEIGHTS[:2], params, "linear")
    for bad in (None, 0.0, 1.5):
        with pytest.raises(ValueError, match=f"density in \\(0, 1\\].*got {bad}"):
            combination.combine(sp, tr, WEIGHTS, params, "ties", density=bad)
    with pytest.raises(ValueError, match="pass key="):
        combination.combine(sp, tr, WEIGHTS, params, "dare_linear", density=0.5)
    mixed = [specs[n] for n in MIXED], [trees[n] for n in MIXED]
    with pytest.raises(ValueError, match=r"needs equal ranks.*ranks \[2, 2, 3\]"):
        combination.combine(*mixed, WEIGHTS, params, "linear")
    with pytest.raises(ValueError, match="majority_sign_method must be one of"):
        combination.combine(sp, tr, WEIGHTS, params, "ties", density=0.5, majority_sign_method="mean")
    # different targets: adapter 1 adapts q_proj only
    only_q = lorajax.Spec("lora", rank=2, alpha=3.0, targets=["q_proj"])
    flat = {t.keys: _at(tr[1], t.keys) for t in lorajax.select(only_q, params)}
    with pytest.raises(ValueError, match=r"different targets.*only in adapter 0: \['model.layers.0.self_attn.v_proj'"):
        combination.combine([sp[0], only_q], [tr[0], lorajax.plan.nest(flat)], WEIGHTS[:2], params, "cat")
    # a variant that is not plain LoRA, found through the registry
    other = next(
        n for n in lorajax.list_variants() if (f := lorajax.registry.get(n).factors) is not None and not f.exact
    )
    with pytest.raises(ValueError, match=f"got variant '{other}'"):
        combination.combine([sp[0].replace(variant=other)] + sp[1:], tr, WEIGHTS, params, "cat")
