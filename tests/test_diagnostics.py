"""The LoRA-gradient regime diagnostic (`lorajax.diagnostics`, applications.md §1): max-entry norms equal numpy's,
the adapter term scales as c² when A and B scale by c, the model-level function reads each layer's real input,
and the Taylor-feature factorisation reproduces the error table's transition."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import diagnostics as dg
from lorajax import registry
from lorajax.models import bert, llama

B, S, D, H, K = 2, 6, 16, 4, 2  # GQA: 4 query heads on 2 key heads, head dim 4
HD = D // H


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    x, wq, wk = f32(B, S, D), f32(D, H * HD) / 4, f32(D, K * HD) / 4
    aq, bq, ak, bk = f32(D, 3), f32(3, H * HD) / 2, f32(D, 3), f32(3, K * HD) / 2
    return x, wq, wk, (aq, bq, 0.75), (ak, bk, 1.5), f32(H * HD)


def rope_np(x, cos, sin):  # x [B, S, n, d], rotate-half convention
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def test_attention_regime_equals_numpy(layer):
    """Every quantity equals a float64 numpy computation (RoPE, GQA, causal mask, bias) to 1e-6 (relative)."""
    x, wq, wk, (aq, bq, sq), (ak, bk, sk), bias = layer
    x64 = x.astype(np.float64)
    dq, dk = sq * aq.astype(np.float64) @ bq, sk * ak.astype(np.float64) @ bk
    pos = np.arange(S)[None, :, None] * (1.0 / 10000 ** (np.arange(0, HD, 2) / HD))[None, None, :]
    cos, sin = np.cos(np.concatenate([pos, pos], -1)), np.sin(np.concatenate([pos, pos], -1))
    causal = np.tril(np.ones((S, S), bool))[None].repeat(B, 0)
    got = dg.attention_regime(
        x,
        wq,
        wk,
        (aq, bq, sq),
        (ak, bk, sk),
        num_heads=H,
        num_kv_heads=K,
        b_q=bias,
        rope=(jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32)),
        mask_BxSxS=causal,
    )
    q = rope_np((x64 @ (wq + dq) + bias).reshape(B, S, H, HD), cos, sin)
    k = rope_np((x64 @ (wk + dk)).reshape(B, S, K, HD), cos, sin)
    k_rep = np.repeat(k, H // K, axis=2)  # query head h reads key head h // (H/K)
    logits = np.einsum("bshd,bthd->bhst", q, k_rep) / math.sqrt(HD)
    max_logit = np.abs(np.where(causal[:, None], logits, 0)).max()
    want = {
        "q_base": np.abs(x64 @ wq).max(),
        "q_lora": np.abs(x64 @ dq).max(),
        "q_adapted": np.abs(x64 @ (wq + dq)).max(),
        "k_base": np.abs(x64 @ wk).max(),
        "k_lora": np.abs(x64 @ dk).max(),
        "k_adapted": np.abs(x64 @ (wk + dk)).max(),
        "max_logit": max_logit,
        "log_len": math.log(S),
        "rho": max_logit / math.log(S),
    }
    want["gamma"] = max(want["q_base"], want["k_base"], want["q_lora"], want["k_lora"])
    want["gamma_ratio"] = want["gamma"] / math.sqrt(math.log(S))
    assert set(got) == set(dg.QUANTITIES)
    for name, value in want.items():
        np.testing.assert_allclose(float(got[name]), value, rtol=1e-6, err_msg=name)
    # the dense ΔW form gives the same numbers as the factored one
    dense = dg.attention_regime(x, wq, wk, dq.astype(np.float32), dk.astype(np.float32), num_heads=H, num_kv_heads=K)
    fact = dg.attention_regime(x, wq, wk, (aq, bq, sq), (ak, bk, sk), num_heads=H, num_kv_heads=K)
    for name in dg.QUANTITIES:
        np.testing.assert_allclose(float(dense[name]), float(fact[name]), rtol=1e-5, err_msg=name)


def test_adapter_norm_scales_as_c_squared(layer):
    """(A, B) -> (cA, cB) scales ‖X s A B‖_max by c² and leaves ‖X W‖_max alone."""
    x, wq, wk, (aq, bq, sq), (ak, bk, sk), _ = layer
    base = dg.attention_regime(x, wq, wk, (aq, bq, sq), (ak, bk, sk), num_heads=H, num_kv_heads=K)
    for c in (0.1, 3.0):
        out = dg.attention_regime(x, wq, wk, (c * aq, c * bq, sq), (c * ak, c * bk, sk), num_heads=H, num_kv_heads=K)
        for name in ("q_lora", "k_lora"):
            np.testing.assert_allclose(float(out[name]), c**2 * float(base[name]), rtol=1e-5)
        for name in ("q_base", "k_base"):
            assert float(out[name]) == float(base[name])
    none = dg.attention_regime(x, wq, wk, num_heads=H, num_kv_heads=K)
    assert float(none["q_lora"]) == 0.0 and float(none["q_adapted"]) == float(none["q_base"])


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = llama.Config(
        vocab_size=32, hidden_size=D, intermediate_size=24, num_hidden_layers=2, num_attention_heads=H,
        num_key_value_heads=K,
    )  # fmt: skip
    model = llama.build(cfg)
    variables = jax.jit(model.init)(jax.random.key(0), *llama.example_inputs(cfg))
    spec = lorajax.Spec("lora", rank=2, alpha=4, targets="all-linear", init_weights=False)  # B != 0
    adapters = lorajax.init(spec, variables, jax.random.key(1))
    ids = jax.random.randint(jax.random.key(2), (B, S), 0, cfg.vocab_size)
    # one compile: the adapted model and the base alone
    fn = jax.jit(lambda v, a, i: (dg.lora_norm_regime(model, v, i, spec, a), dg.lora_norm_regime(model, v, i)))
    got, base_only = fn(variables, adapters, ids)
    return model, variables, spec, adapters, ids, got, base_only


def test_llama_layers_read_their_real_input(tiny_llama):
    """Layer 0's X is RMSNorm(embed(ids)): its norms equal attention_regime on that X with the adapters' factors;
    layer 1's X comes from the adapted model (the base-only run differs there, not at layer 0)."""
    model, variables, spec, adapters, ids, got, base_only = tiny_llama
    p = variables["params"]["model"]
    e = p["embed_tokens"]["embedding"][ids]
    x0 = (
        p["layers"]["0"]["input_layernorm"]["weight"][None, None, :]
        * e
        * jax.lax.rsqrt(jnp.mean(e * e, -1, keepdims=True) + 1e-6)
    )
    a = adapters["params"]["model"]["layers"]["0"]["self_attn"]
    att = p["layers"]["0"]["self_attn"]
    s = 4 / 2
    want = dg.attention_regime(
        x0,
        att["q_proj"]["kernel"],
        att["k_proj"]["kernel"],
        (a["q_proj"]["kernel"]["lora_A"], a["q_proj"]["kernel"]["lora_B"], s),
        (a["k_proj"]["kernel"]["lora_A"], a["k_proj"]["kernel"]["lora_B"], s),
        num_heads=H,
        num_kv_heads=K,
    )
    assert got["q_base"].shape == (2,)
    for name in ("q_base", "q_lora", "q_adapted", "k_base", "k_lora", "k_adapted"):
        np.testing.assert_allclose(float(got[name][0]), float(want[name]), rtol=1e-5, err_msg=name)
    assert float(base_only["q_lora"].max()) == 0.0
    np.testing.assert_allclose(float(base_only["q_base"][0]), float(got["q_base"][0]), rtol=1e-6)
    assert abs(float(base_only["q_base"][1]) - float(got["q_base"][1])) > 1e-4  # X from the adapted layer 0
    assert np.all(np.isfinite(np.asarray(got["rho"]))) and float(got["log_len"][0]) == pytest.approx(math.log(S))
    flat = dg.flat_metrics(got)
    assert flat["diag/layer1/rho"] == pytest.approx(float(got["rho"][1])) and len(flat) == 2 * len(dg.QUANTITIES)


def test_merged_difference_for_non_exact_variants(tiny_llama):
    """A variant without exact s·A·B factors is read through ΔW = W' − W (lorajax.merge); plain LoRA read that
    way equals its factored reading."""
    model, variables, spec, adapters, ids, got, _ = tiny_llama
    merged = lorajax.merge(spec, variables, adapters)
    p, m = variables["params"]["model"]["layers"]["0"]["self_attn"], merged["params"]["model"]["layers"]["0"]
    dq = m["self_attn"]["q_proj"]["kernel"] - p["q_proj"]["kernel"]
    e = variables["params"]["model"]["embed_tokens"]["embedding"][ids]
    x0 = (
        variables["params"]["model"]["layers"]["0"]["input_layernorm"]["weight"][None, None, :]
        * e
        * jax.lax.rsqrt(jnp.mean(e * e, -1, keepdims=True) + 1e-6)
    )
    np.testing.assert_allclose(float(jnp.abs(x0 @ dq).max()), float(got["q_lora"][0]), rtol=1e-5)
    inexact = [n for n in registry.with_capability("factors") if not registry.get(n).factors.exact]
    inexact = [n for n in inexact if registry.get(n).mergeable]
    assert inexact, "no mergeable variant without exact factors is registered: this check has nothing to read"
    sp = lorajax.Spec(inexact[0], rank=2, alpha=4, targets=["q_proj", "k_proj"])
    ad = jax.tree.map(lambda t: t + 0.1, lorajax.init(sp, variables, jax.random.key(3)))
    keys = ("params", "model", "layers", "1", "self_attn", "k_proj", "kernel")
    kernel = variables["params"]["model"]["layers"]["1"]["self_attn"]["k_proj"]["kernel"]
    read = dg._updates(sp, variables, ad, {keys: kernel})[keys]  # what the diagnostic multiplies X by
    want = lorajax.combination.delta(sp, variables, ad)["params"]["model"]["layers"]["1"]["self_attn"]["k_proj"]
    assert not isinstance(read, tuple) and float(jnp.abs(want["kernel"]).max()) > 0
    np.testing.assert_allclose(np.asarray(read), np.asarray(want["kernel"]), atol=1e-6)


def test_bert_regime():
    """BERT: one row per layer; layer 0's X is the embeddings' LayerNorm output (with padding)."""
    cfg = bert.Config(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
        max_position_embeddings=16,
    )  # fmt: skip
    model = bert.BertModel(cfg)
    ids = jax.random.randint(jax.random.key(5), (B, S), 0, 40)
    variables = jax.jit(model.init)(jax.random.key(4), ids)
    mask = jnp.ones((B, S), jnp.int32).at[:, -2:].set(0)
    out = jax.jit(lambda v, i, m: dg.lora_norm_regime(model, v, i, attention_mask=m))(variables, ids, mask)
    assert out["q_base"].shape == (2,) and float(out["q_lora"].max()) == 0.0
    emb = model.apply(variables, ids, mask, capture_intermediates=True, mutable=["intermediates"])[1]
    x0 = emb["intermediates"]["embeddings"]["__call__"][0]
    wq = variables["params"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    np.testing.assert_allclose(float(out["q_base"][0]), float(jnp.abs(x0 @ wq).max()), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(out["rho"])))


def test_bad_input(layer, tiny_llama):
    x, wq, wk, fq, fk, _ = layer
    model, variables, spec, adapters, ids, _, _ = tiny_llama
    with pytest.raises(ValueError, match="batch, seq, dim"):
        dg.attention_regime(x[0], wq, wk, num_heads=H, num_kv_heads=K)
    with pytest.raises(ValueError, match="num_kv_heads"):
        dg.attention_regime(x, wq, wk, num_heads=H, num_kv_heads=3)
    with pytest.raises(ValueError, match="w_k has"):
        dg.attention_regime(x, wq, wq, num_heads=H, num_kv_heads=K)
    with pytest.raises(ValueError, match="delta_q"):
        dg.attention_regime(x, wq, wk, (fq[0], fq[1]), num_heads=H, num_kv_heads=K)
    with pytest.raises(ValueError, match="delta_k"):
        dg.attention_regime(x, wq, wk, None, np.zeros((D, 3), np.float32), num_heads=H, num_kv_heads=K)
    with pytest.raises(ValueError, match="mask"):
        dg.attention_regime(x, wq, wk, num_heads=H, num_kv_heads=K, mask_BxSxS=np.ones((S, S), bool))
    with pytest.raises(ValueError, match="both spec and adapters"):
        dg.lora_norm_regime(model, variables, ids, spec)
    with pytest.raises(ValueError, match="input_ids"):
        dg.lora_norm_regime(model, variables, ids[0])
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        dg.lora_norm_regime(object(), variables, ids)
    factored_only = [n for n in lorajax.list_variants() if not registry.get(n).mergeable]
    sp = lorajax.Spec(factored_only[0], rank=2, alpha=4, targets=["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="input-dependent"):
        dg.lora_norm_regime(model, variables, ids, sp, lorajax.init(sp, variables, jax.random.key(0)))
    with pytest.raises(ValueError, match="degree"):
        dg.taylor_features(jnp.ones((3, 4)), -1)
    with pytest.raises(ValueError, match="features"):
        dg.taylor_features(jnp.ones((3, 64)), 5)
    with pytest.raises(ValueError, match="missing"):
        dg.flat_metrics({"gamma": np.zeros(2)})


def test_taylor_error_table():
    """applications.md §1: L=256, d=4, degree 4: relative max error < 1e-5 at B=0.25 and > 0.5 at B=2; the error
    falls with the degree; the jnp features give the same factorisation."""
    rows = {r["bound"]: r for r in dg.taylor_error_table(bounds=(0.25, 2.0), degrees=(2, 4), length=256, dim=4)}
    assert rows[0.25]["g=4"] < 1e-5 and rows[2.0]["g=4"] > 0.5
    assert rows[0.25]["g=4"] < rows[0.25]["g=2"] and rows[0.25]["rank g=4"] == 341
    q, k = jax.random.uniform(jax.random.key(7), (2, 256, 4), minval=-0.25, maxval=0.25)
    approx = dg.taylor_features(q, 4) @ dg.taylor_features(k, 4).T
    exact = jnp.exp(q @ k.T)
    assert float(jnp.abs(approx - exact).max() / exact.max()) < 1e-5


def test_lowrank_attention_matches_softmax():
    """Small entries: softmax attention through degree-4 features equals exact attention (causal and not)."""
    q, k, v = jax.random.normal(jax.random.key(8), (3, 2, 32, 4)) * 0.3
    logits = jnp.einsum("bld,bmd->blm", q, k) / 2.0
    attend = jax.jit(dg.lowrank_attention, static_argnums=(3,), static_argnames=("causal",))
    for causal in (False, True):
        if causal:
            logits_c = jnp.where(jnp.tril(jnp.ones((32, 32), bool))[None], logits, -jnp.inf)
        else:
            logits_c = logits
        exact = jax.nn.softmax(logits_c, -1) @ v
        got = attend(q, k, v, 4, causal=causal)
        np.testing.assert_allclose(np.asarray(got), np.asarray(exact), atol=1e-4)


def test_launcher_logs_the_diagnostic_at_each_evaluation(tiny_llama):
    """The lm task's --diagnose hook adds lora_norm_regime's numbers on the batch to the evaluation metrics."""
    from experiments.tasks import lm

    model, variables, spec, adapters, ids, got, _ = tiny_llama

    class State:  # what fit hands eval_fn: the adapters as state.combined
        combined = adapters

    batch = np.concatenate([np.asarray(ids), np.zeros((B, 1), np.int32)], axis=1)  # [B, S + 1] windows
    assert lm.with_diagnostic(lambda st: {"val_loss": 1.0}, model, spec, variables, None)(State) == {"val_loss": 1.0}
    out = lm.with_diagnostic(lambda st: {"val_loss": 1.0}, model, spec, variables, batch)(State)
    assert out["val_loss"] == 1.0
    for name in ("q_lora", "rho", "max_logit"):
        assert out[f"diag/layer1/{name}"] == pytest.approx(float(got[name][1]), rel=1e-5)


@pytest.mark.parametrize("variant", ["full", "factored-only"])
def test_diagnose_flag_needs_a_mergeable_variant(tmp_path, capsys, monkeypatch, variant):
    from experiments import run

    if variant == "factored-only":
        variant = [n for n in lorajax.list_variants() if not registry.get(n).mergeable][0]
    monkeypatch.setattr(run, "load_task", lambda name: pytest.fail("the task was loaded for an invalid config"))
    with pytest.raises(SystemExit):
        run.main(["--task", "lm", "--diagnose", "--spec.variant", variant, "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "--diagnose" in err and "mergeable" in err and not (tmp_path / "o").exists()
