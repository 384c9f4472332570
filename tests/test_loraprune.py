"""LoRAPrune (lorajax.loraprune): LoRA-guided importance, grouping, EMA, schedule, masks, pruning (spec §13a).

Expected values are rebuilt here from the definitions (PyTorch-layout formula on transposed matrices, per-head
loops with query head g in the group of kv head g // G), not from lorajax.loraprune's helpers.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import hlo, loram, loraprune
from lorajax.models import llama
from lorajax.train import TrainState
from lorajax.train.losses import cross_entropy

# tiny Llama with every bias on, so that bias masking is exercised too
CFG = llama.Config(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_bias=True,
    mlp_bias=True,
)
H, K, D, N_MLP = 4, 2, 8, 64  # query heads, kv heads, head dim, MLP neurons
G = H // K
SPEC = lorajax.Spec("lora", rank=4, alpha=8, targets="all-linear", init_weights=False)  # A and B random
MODULES = [("self_attn", m) for m in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", m) for m in ("gate_proj", "up_proj", "down_proj")
]
IN_SIDE = {"o_proj", "down_proj"}  # scored / masked on their input rows
BATCH, SEQ = 2, 7  # 14 tokens: no kernel dimension (8, 16, 32, 64) and not the rank (4)


@pytest.fixture(scope="module")
def params():
    p = llama.build(CFG).init(jax.random.key(0), *llama.example_inputs(CFG))["params"]
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))  # random biases and norms as well
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def adapters(params):
    return lorajax.init(SPEC, {"params": params}, jax.random.key(2))


def layer_of(tree, i):
    return tree["params"]["model"]["layers"][str(i)] if "params" in tree else tree["model"]["layers"][str(i)]


def head_units(name):
    """``[(kv head, column/row indices)]`` of a self_attn module, from the definitions."""
    if name in ("k_proj", "v_proj"):
        return [(h, list(range(h * D, (h + 1) * D))) for h in range(K)]
    return [(h, [g * D + t for g in range(H) if g // G == h for t in range(D)]) for h in range(K)]


def unit_vector(name, imp):
    """One module's per-unit score vector (before normalisation), from the definitions."""
    per_channel = imp.sum(1) if name in IN_SIDE else imp.sum(0)  # input rows / output columns
    if name in ("gate_proj", "up_proj", "down_proj"):
        return per_channel
    return np.array([per_channel[idx].sum() for _, idx in head_units(name)])


def grouped(imp_by_module):
    """``{"kv_heads": [L, K], "mlp": [L, I]}`` from ``{(layer, block, name): I}`` (float64)."""
    out = {"kv_heads": np.zeros((2, K)), "mlp": np.zeros((2, N_MLP))}
    for (i, block, name), imp in imp_by_module.items():
        v = unit_vector(name, np.asarray(imp, np.float64))
        out["kv_heads" if block == "self_attn" else "mlp"][i] += v / (np.linalg.norm(v) + 1e-8)
    return out


# ----------------------------------------------------------------------------- importance


def test_proxy_gradient_is_the_papers_formula_and_projects_the_weight_gradient():
    """Ĝ from autograd's LoRA gradients on a toy linear layer: the PyTorch formula on transposed matrices, one
    unit-lr SGD step of A B, and the true weight gradient projected on the adapters' spaces."""
    k = jax.random.split(jax.random.key(3), 4)
    params = {"dense": {"kernel": jax.random.normal(k[0], (6, 5))}}
    spec = lorajax.Spec("lora", rank=2, alpha=3.0, targets=["dense"], init_weights=False)  # s = 1.5
    s = 1.5
    adapters = lorajax.init(spec, params, k[1])
    x, y = jax.random.normal(k[2], (10, 6)), jax.random.normal(k[3], (10, 5))

    def loss_w(w):
        return jnp.sum(jnp.tanh(x @ w - y) ** 2)

    def loss_ad(ad):
        return loss_w(lorajax.merge(spec, params, ad)["dense"]["kernel"])

    grads = jax.grad(loss_ad)(adapters)
    f64 = lambda t: np.asarray(t, np.float64)  # noqa: E731
    w = f64(params["dense"]["kernel"])
    a, b = f64(adapters["dense"]["kernel"]["lora_A"]), f64(adapters["dense"]["kernel"]["lora_B"])
    g_a, g_b = f64(grads["dense"]["kernel"]["lora_A"]), f64(grads["dense"]["kernel"]["lora_B"])
    g_w = f64(jax.grad(loss_w)(jnp.asarray(w + s * a @ b, jnp.float32)))  # ∂L/∂(W + sAB)

    # PyTorch layout: A_pt [r, in], B_pt [out, r]; Ĝ_pt = G_B A + B G_A − G_B G_A, [out, in]
    a_pt, b_pt, ga_pt, gb_pt = a.T, b.T, g_a.T, g_b.T
    g_hat = (gb_pt @ a_pt + b_pt @ ga_pt - gb_pt @ ga_pt).T
    np.testing.assert_allclose(f64(loraprune.proxy_gradient(*map(jnp.asarray, (a, b, g_a, g_b)))), g_hat, rtol=1e-5)
    imp = loraprune.importance(params, adapters, grads, spec)
    assert list(imp) == [("dense", "kernel")] and imp[("dense", "kernel")].shape == (6, 5)
    np.testing.assert_allclose(f64(imp[("dense", "kernel")]), np.abs(g_hat * (w + s * a @ b)), rtol=1e-5, atol=1e-7)

    # one SGD step of learning rate 1 on the factors changes A B by -Ĝ
    np.testing.assert_allclose(g_hat, a @ b - (a - g_a) @ (b - g_b), rtol=1e-10, atol=1e-12)
    # the factors' gradients carry s; Ĝ is G_W projected on the column space of A and the row space of B
    np.testing.assert_allclose(g_a, s * g_w @ b.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_b, s * a.T @ g_w, rtol=1e-5, atol=1e-6)
    proj = s * (a @ a.T @ g_w + g_w @ b.T @ b) - s**2 * g_w @ b.T @ a.T @ g_w
    np.testing.assert_allclose(g_hat, proj, rtol=1e-4, atol=1e-5)

    magnitude = loraprune.importance(params, adapters, None, spec, metric="magnitude")[("dense", "kernel")]
    np.testing.assert_allclose(f64(magnitude), np.abs(w + s * a @ b), rtol=1e-6)


def test_group_scores_from_the_definitions(params):
    """Per kv head (q group columns, k/v columns, o rows) and per neuron (gate/up columns, down rows),
    each module's vector L2-normalised, summed; non-layer targets are ignored."""
    rng = np.random.default_rng(0)
    imp, by_module = {}, {}
    for i in range(2):
        for block, name in MODULES:
            shape = layer_of(params, i)[block][name]["kernel"].shape
            x = rng.random(shape).astype(np.float32)
            imp[("params", "model", "layers", str(i), block, name, "kernel")] = jnp.asarray(x)
            by_module[(i, block, name)] = x
    imp[("params", "lm_head", "kernel")] = jnp.ones((32, 32))
    got = loraprune.group_scores(imp, CFG)
    want = grouped(by_module)
    assert set(got) == {"kv_heads", "mlp"} and got["kv_heads"].shape == (2, K) and got["mlp"].shape == (2, N_MLP)
    for kind in want:
        np.testing.assert_allclose(np.asarray(got[kind]), want[kind], rtol=1e-5)
    # every layer needs a scored module of each block
    no_mlp = {k: v for k, v in imp.items() if k[3:5] != ("1", "mlp")}
    with pytest.raises(ValueError, match=r"mlp of layers \[1\].*gate/up/down"):
        loraprune.group_scores(no_mlp, CFG)
    bad = dict(imp)
    bad[("params", "model", "layers", "0", "self_attn", "k_proj", "kernel")] = jnp.ones((32, 24))
    with pytest.raises(ValueError, match="k_proj"):
        loraprune.group_scores(bad, CFG)


# ----------------------------------------------------------------------------- EMA and schedule


def test_ema():
    s = {"kv_heads": jnp.array([[1.0, 2.0]]), "mlp": jnp.array([[0.0, 4.0, 8.0]])}
    n = {"kv_heads": jnp.array([[3.0, 0.0]]), "mlp": jnp.array([[10.0, 4.0, -2.0]])}
    out = loraprune.ema(s, n)
    np.testing.assert_allclose(np.asarray(out["kv_heads"]), [[0.9 * 1 + 0.1 * 3, 0.9 * 2]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["mlp"]), [[1.0, 4.0, 0.9 * 8 - 0.2]], rtol=1e-6)
    half = loraprune.ema(s, n, decay=0.5)
    np.testing.assert_allclose(np.asarray(half["kv_heads"]), [[2.0, 1.0]])
    # a non-finite step is skipped (the official keeps the old scores on NaN)
    nan = {"kv_heads": jnp.array([[jnp.nan, 0.0]]), "mlp": n["mlp"]}
    jax.tree.map(np.testing.assert_array_equal, loraprune.ema(s, nan), s)
    with pytest.raises(ValueError, match="structure"):
        loraprune.ema(s, {"mlp": n["mlp"]})
    with pytest.raises(ValueError, match="shape"):
        loraprune.ema(s, {"kv_heads": jnp.ones((1, 3)), "mlp": n["mlp"]})


def test_schedule_values():
    sched = lambda step: loraprune.schedule_sparsity_ratio(step, 100, 0.1, 0.1, 0.0, 0.5)  # noqa: E731
    assert sched(0) == 0.0 and sched(10) == 0.0  # warm-up: step <= 0.1·100
    assert sched(11) == pytest.approx(0.5 - 0.5 * (1 - 1 / 80) ** 3, abs=1e-12)
    assert sched(50) == pytest.approx(0.5 - 0.5 * 0.5**3, abs=1e-12)  # m = 1 − 40/80
    assert sched(89) == pytest.approx(0.5 - 0.5 * (1 / 80) ** 3, abs=1e-12) and sched(89) < 0.5
    assert all(sched(t) == 0.5 for t in range(90, 120))  # from (1 − cooldown)·total on: m = 0
    values = [sched(t) for t in range(101)]
    assert values == sorted(values)
    # from init_ratio 0.2, other fractions; a jax step gives the same in float32
    other = loraprune.schedule_sparsity_ratio(30, 50, 0.2, 0.3, 0.2, 0.6)  # w = 10, m = 1 − 20/25
    assert other == pytest.approx(0.6 - 0.4 * 0.2**3, abs=1e-12)
    traced = jax.jit(lambda t: loraprune.schedule_sparsity_ratio(t, 100, 0.1, 0.1, 0.0, 0.5))
    np.testing.assert_allclose(
        [float(traced(jnp.int32(t))) for t in (0, 10, 11, 50, 89, 90, 100)],
        [sched(t) for t in (0, 10, 11, 50, 89, 90, 100)],
        atol=1e-6,
    )
    for bad in [dict(ratio=1.0), dict(init_ratio=-0.1), dict(warmup=0.6, cooldown=0.4), dict(total=0)]:
        kw = {"total": 100, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            loraprune.schedule_sparsity_ratio(5, **kw)


# ----------------------------------------------------------------------------- masks


def random_scores(seed):
    r = np.random.default_rng(seed)
    return {
        "kv_heads": jnp.asarray(r.random((2, K)), jnp.float32),
        "mlp": jnp.asarray(r.random((2, N_MLP)), jnp.float32),
    }


def test_masks_select_the_lowest_scores():
    scores = random_scores(0)
    none = loraprune.masks(scores, CFG, 0.0, exclude_layers=())
    assert all(bool(np.all(np.asarray(m))) for m in none.values())  # ratio 0 masks nothing
    m = loraprune.masks(scores, CFG, 0.3, exclude_layers=())
    for i in range(2):
        mlp = np.asarray(scores["mlp"][i])
        assert m["mlp"].dtype == jnp.bool_ and int((~np.asarray(m["mlp"][i])).sum()) == 19  # int(64 · 0.3)
        assert set(np.flatnonzero(~np.asarray(m["mlp"][i]))) == set(np.argsort(mlp)[:19])
        assert np.asarray(m["kv_heads"][i]).all()  # int(2 · 0.3) = 0
    half = loraprune.masks(scores, CFG, 0.5, exclude_layers=())
    for i in range(2):
        assert int((~np.asarray(half["kv_heads"][i])).sum()) == 1
        assert int(np.argmin(np.asarray(half["kv_heads"][i]))) == int(np.argmin(np.asarray(scores["kv_heads"][i])))
    # the official's exclusion: first int(0.1·L) layers and the last
    assert loraprune.default_exclude_layers(2) == (1,) and loraprune.default_exclude_layers(20) == (0, 1, 19)
    default = loraprune.masks(scores, CFG, 0.5)
    assert np.asarray(default["mlp"][1]).all() and int((~np.asarray(default["mlp"][0])).sum()) == 32
    # previously masked units stay masked, even with the highest scores now
    top = int(np.argmax(np.asarray(scores["mlp"][0])))
    prev = {"kv_heads": jnp.ones((2, K), bool), "mlp": jnp.ones((2, N_MLP), bool).at[0, top].set(False)}
    grown = loraprune.masks(scores, CFG, 0.3, exclude_layers=(), previous=prev)
    assert not bool(grown["mlp"][0, top]) and int((~np.asarray(grown["mlp"][0])).sum()) == 19
    assert set(np.flatnonzero(~np.asarray(grown["mlp"][0]))) == {top} | set(
        np.argsort(np.asarray(scores["mlp"][0]))[:18]
    )


def test_masks_group_a_kv_head_with_its_query_group(params, adapters):
    """A masked kv head zeroes its q group's columns, its k/v columns and biases, its query group's o rows;
    a masked neuron its gate/up columns and biases and its down row; nothing else changes."""
    m = {"kv_heads": jnp.array([[False, True], [True, True]]), "mlp": jnp.ones((2, N_MLP), bool).at[1, 5].set(False)}
    masked = loraprune.apply_masks(params, m)
    wrapped = loraprune.apply_masks({"params": params}, m)
    jax.tree.map(np.testing.assert_array_equal, wrapped["params"], masked)
    zeroed_cols = {  # (layer, module) -> output columns / input rows that must be zero
        (0, "q_proj"): range(0, 16),
        (0, "k_proj"): range(0, 8),
        (0, "v_proj"): range(0, 8),
        (0, "o_proj"): range(0, 16),
        (1, "gate_proj"): [5],
        (1, "up_proj"): [5],
        (1, "down_proj"): [5],
    }
    for i, (block, name) in itertools.product(range(2), MODULES):
        before, after = layer_of(params, i)[block][name], layer_of(masked, i)[block][name]
        w, w2 = np.asarray(before["kernel"]), np.asarray(after["kernel"])
        idx = list(zeroed_cols.get((i, name), []))
        expect, bias = w.copy(), np.asarray(before["bias"]).copy()
        if name in IN_SIDE:
            expect[idx] = 0.0
        else:
            expect[:, idx] = 0.0
            bias[idx] = 0.0
        np.testing.assert_array_equal(w2, expect)
        np.testing.assert_array_equal(np.asarray(after["bias"]), bias)  # o/down biases [D] stay
        ad = layer_of(adapters, i)[block][name]["kernel"]
        ad2 = layer_of(loraprune.mask_adapters(adapters, m), i)[block][name]["kernel"]
        a, b = np.asarray(ad["lora_A"]).copy(), np.asarray(ad["lora_B"]).copy()
        if name in IN_SIDE:
            a[idx] = 0.0
        else:
            b[:, idx] = 0.0
        np.testing.assert_array_equal(np.asarray(ad2["lora_A"]), a)
        np.testing.assert_array_equal(np.asarray(ad2["lora_B"]), b)
    assert layer_of(masked, 0)["input_layernorm"] is layer_of(params, 0)["input_layernorm"]


def test_masked_model_equals_physically_pruned_model(params, adapters):
    """Masked base + masked LoRA == loram.prune'd base + loram.prune_adapters'd LoRA, on a random batch."""
    m = loraprune.masks(random_scores(1), CFG, 0.5, exclude_layers=())
    keep = loraprune.to_keep(m)
    for i in range(2):
        assert list(keep.mlp[i]) == np.flatnonzero(np.asarray(m["mlp"][i])).tolist()
        assert list(keep.kv_heads[i]) == np.flatnonzero(np.asarray(m["kv_heads"][i])).tolist()
    small_cfg, small = loram.prune(CFG, params, keep)
    small_adapters = loram.prune_adapters(adapters, keep, CFG)
    assert (small_cfg.intermediate_size, small_cfg.num_key_value_heads, small_cfg.num_attention_heads) == (32, 1, 2)
    ids = jax.random.randint(jax.random.key(5), (BATCH, SEQ), 0, CFG.vocab_size)
    out_masked = lorajax.adapt(llama.build(CFG).apply, SPEC, mode="factored")(
        {"params": loraprune.apply_masks(params, m)}, loraprune.mask_adapters(adapters, m), ids
    )
    out_small = lorajax.adapt(llama.build(small_cfg).apply, SPEC, mode="factored")(
        {"params": small}, small_adapters, ids
    )
    assert out_masked.dtype == jnp.float32 and out_masked.shape == (BATCH, SEQ, CFG.vocab_size)
    np.testing.assert_allclose(np.asarray(out_masked), np.asarray(out_small), atol=1e-5, rtol=1e-5)
    # with the default exclusion (the last layer keeps everything) the layers differ: no single pruned config
    with pytest.raises(ValueError, match="same number.*exclude_layers=\\(\\)"):
        loraprune.to_keep(loraprune.masks(random_scores(1), CFG, 0.5))


def test_pruned_merged_model_saves_and_transformers_loads_it(params, adapters, tmp_path):
    """The physically pruned base + pruned LoRA, merged, written by models.save_pretrained: transformers reads a
    smaller LlamaForCausalLM from it whose logits equal the masked full model's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = loraprune.masks(random_scores(2), CFG, 0.5, exclude_layers=())
    small_cfg, small = loram.prune(CFG, params, loraprune.to_keep(m))
    small_cfg = dataclasses.replace(small_cfg, architectures=("LlamaForCausalLM",))
    small_adapters = loram.prune_adapters(adapters, loraprune.to_keep(m), CFG)
    merged = lorajax.merge(SPEC, {"params": small}, small_adapters)["params"]
    lorajax.models.save_pretrained(tmp_path, llama.build(small_cfg), merged)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (hf.config.intermediate_size, hf.config.num_key_value_heads, hf.config.num_attention_heads) == (32, 1, 2)
    ids = np.array(jax.random.randint(jax.random.key(6), (BATCH, SEQ), 0, CFG.vocab_size))
    with torch.no_grad():
        got = hf(torch.from_numpy(ids).long()).logits.numpy()
    want = lorajax.adapt(llama.build(CFG).apply, SPEC, mode="factored")(
        {"params": loraprune.apply_masks(params, m)}, loraprune.mask_adapters(adapters, m), ids
    )
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- training


def merged_loss(params, adapters, batch):
    """A cheap loss of the adapted kernels (no attention): enough for the scoring pipeline."""
    merged = lorajax.merge(SPEC, {"params": params}, adapters)["params"]["model"]["layers"]
    return sum(jnp.sum(jnp.sin(3.0 * lay[b][n]["kernel"])) for lay in merged.values() for b, n in MODULES)


def test_step_scores_ema_schedule_and_official_window(params, adapters):
    """One step's scores are 0.1 · the grouped |Ĝ ⊙ (W + sAB)| of autograd's LoRA gradients; the masks follow
    the schedule at every prune_freq-th step inside the window, grow monotonically, skip excluded layers, and
    (official quirk, strict) end one neuron short of the target; strict=False reaches it."""
    tx = optax.sgd(1e-3)
    trainable, frozen = lorajax.partition(SPEC, adapters)
    runs = {}
    for strict in (True, False):
        step = loraprune.make_step(merged_loss, tx, CFG, SPEC, total_steps=20, prune_freq=2, strict=strict)
        state = TrainState.create(tx, jax.tree.map(jnp.copy, trainable), frozen)  # the step donates it
        prune = loraprune.init_state(CFG)
        updated, counts = [], []
        for t in range(20):
            state, prune, metrics = step(params, state, prune, None)
            if t == 0 and strict:
                first_scores = jax.tree.map(np.asarray, prune.scores)
            updated.append(bool(metrics["updated"]))
            counts.append(int((~np.asarray(prune.masks["mlp"][0])).sum()))
            assert bool(metrics["finite"])
            assert float(metrics["ratio"]) == pytest.approx(
                loraprune.schedule_sparsity_ratio(t, 20, 0.1, 0.1, 0.0, 0.5), abs=1e-7
            )
        runs[strict] = (updated, counts, prune, int(state.step))
    # step 0 from the definitions: masks all kept, scores 0 -> 0.1 · S_step
    grads = jax.grad(lambda ad: merged_loss(params, ad, None))(adapters)
    s = SPEC.alpha / SPEC.rank
    by_module = {}
    for i, (block, name) in itertools.product(range(2), MODULES):
        ad, g = layer_of(adapters, i)[block][name]["kernel"], layer_of(grads, i)[block][name]["kernel"]
        a, b = np.asarray(ad["lora_A"], np.float64), np.asarray(ad["lora_B"], np.float64)
        g_a, g_b = np.asarray(g["lora_A"], np.float64), np.asarray(g["lora_B"], np.float64)
        w = np.asarray(layer_of(params, i)[block][name]["kernel"], np.float64)
        by_module[(i, block, name)] = np.abs((a @ g_b + g_a @ b - g_a @ g_b) * (w + s * a @ b))
    want = grouped(by_module)
    for kind in want:
        np.testing.assert_allclose(first_scores[kind], 0.1 * want[kind], rtol=1e-4)

    updated, counts, prune, steps = runs[True]
    assert steps == 20
    assert [t for t, u in enumerate(updated) if u] == [4, 6, 8, 10, 12, 14, 16]  # inside 0 < sched < 0.5
    assert counts == sorted(counts) and counts[-1] == int(64 * loraprune.schedule_sparsity_ratio(16, 20)) == 31
    assert np.asarray(prune.masks["kv_heads"]).all()  # int(2 · 0.499) = 0
    assert np.asarray(prune.masks["mlp"][1]).all()  # the last layer is excluded (official freeze)
    updated, counts, prune, _ = runs[False]
    assert [t for t, u in enumerate(updated) if u] == [4, 6, 8, 10, 12, 14, 16, 18]
    assert counts[-1] == 32 and int((~np.asarray(prune.masks["kv_heads"][0])).sum()) == 1


def test_training_step_forms_no_weight_gradient(params, adapters):
    """The compiled step of the tiny Llama (masked forward, LoRA gradients, Ĝ, scores, masks, SGD) has no
    product of a weight's shape contracting over the tokens; the weight-shaped products it has (Ĝ, A B)
    contract over the rank. Then a few steps run and train."""
    fwd = lorajax.adapt(llama.build(CFG).apply, SPEC, mode="factored")

    def loss_fn(p, ad, ids):
        logits = fwd({"params": p}, ad, ids[:, :-1])
        return cross_entropy(logits.reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1)).mean()

    tx = optax.adam(1e-2)
    trainable, frozen = lorajax.partition(SPEC, adapters)
    state = TrainState.create(tx, jax.tree.map(jnp.copy, trainable), frozen)  # the step donates it
    prune = loraprune.init_state(CFG)
    step = loraprune.make_step(loss_fn, tx, CFG, SPEC, total_steps=10, prune_freq=1, exclude_layers=())
    ids = jax.random.randint(jax.random.key(6), (BATCH, SEQ + 1), 0, CFG.vocab_size)
    compiled = step.lower(params, state, prune, ids).compile()
    shapes = {s for w in jax.tree.leaves(params) if w.ndim == 2 for s in (w.shape, w.shape[::-1])}
    n_grad, n_shaped = hlo.count_weight_gradients(compiled.as_text(), shapes, BATCH * SEQ)
    assert n_grad == 0 and n_shaped > 0, (n_grad, n_shaped)
    losses = []
    for _ in range(6):
        state, prune, metrics = compiled(params, state, prune, ids)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # steps 2..5 prune (sched > 0): kv heads int(2 · r) = 0 until r >= 0.5, neurons int(64 · r) in both layers
    want = int(64 * loraprune.schedule_sparsity_ratio(5, 10))
    assert [int((~np.asarray(prune.masks["mlp"][i])).sum()) for i in range(2)] == [want, want] and want > 0


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_bad_ratios(bad):
    with pytest.raises(ValueError, match=r"ratio.*\[0, 1\)"):
        loraprune.masks(random_scores(0), CFG, bad)
    with pytest.raises(ValueError, match=r"ratio.*\[0, 1\)"):
        loraprune.make_step(merged_loss, optax.sgd(1.0), CFG, SPEC, total_steps=10, ratio=bad)


def test_bad_inputs(params, adapters):
    grads = jax.tree.map(jnp.ones_like, adapters)
    other = lorajax.Spec("lora", rank=2, alpha=8, targets="all-linear")
    with pytest.raises(ValueError, match="grads at .*lora_A: shape"):
        loraprune.importance(params, adapters, lorajax.init(other, {"params": params}, 0), SPEC)
    only_q = lorajax.init(lorajax.Spec("lora", rank=4, targets=["q_proj"]), {"params": params}, 0)
    with pytest.raises(ValueError, match="do not match"):
        loraprune.importance(params, adapters, only_q, SPEC)
    no_b = jax.tree.map(lambda x: x, grads)
    no_b["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]["lora_B"] = None
    with pytest.raises(ValueError, match="up_proj.*lora_B: no gradient"):
        loraprune.importance(params, adapters, no_b, SPEC)
    with pytest.raises(ValueError, match="got variant 'dora'"):
        loraprune.importance(params, adapters, grads, lorajax.Spec("dora", rank=4, targets="all-linear"))
    with pytest.raises(ValueError, match=r"metric='grad'.*\['lora', 'magnitude'\]"):
        loraprune.importance(params, adapters, grads, SPEC, metric="grad")
    with pytest.raises(ValueError, match=r"scores\['mlp'\] has shape \(2, 8\)"):
        loraprune.masks({"kv_heads": jnp.ones((2, K)), "mlp": jnp.ones((2, 8))}, CFG, 0.5)
    with pytest.raises(ValueError, match="keys"):
        loraprune.masks({"mlp": jnp.ones((2, N_MLP))}, CFG, 0.5)
    with pytest.raises(ValueError, match=r"exclude_layers has 2: .*0\.\.1"):
        loraprune.masks(random_scores(0), CFG, 0.5, exclude_layers=[2])
    with pytest.raises(ValueError, match="masks have 3 layers"):
        loraprune.apply_masks(params, {"kv_heads": jnp.ones((3, K), bool), "mlp": jnp.ones((3, N_MLP), bool)})
    with pytest.raises(ValueError, match="not a multiple"):
        loraprune.apply_masks(params, {"kv_heads": jnp.ones((2, 3), bool), "mlp": jnp.ones((2, N_MLP), bool)})
    with pytest.raises(ValueError, match="no model.layers"):
        loraprune.apply_masks({"dense": {"kernel": jnp.ones((2, 2))}}, loraprune.init_state(CFG).masks)
    with pytest.raises(ValueError, match="prune_freq"):
        loraprune.make_step(merged_loss, optax.sgd(1.0), CFG, SPEC, total_steps=10, prune_freq=0)
    with pytest.raises(ValueError, match="warmup \\+ cooldown"):
        loraprune.make_step(merged_loss, optax.sgd(1.0), CFG, SPEC, total_steps=10, warmup=0.5, cooldown=0.5)
