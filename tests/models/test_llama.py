"""lorajax.models.llama against Hugging Face transformers (and PEFT) on tiny random checkpoints.

Each variant is a tiny ``*ForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 kv
heads, vocab 128, intermediate 96) with random weights, saved with
``save_pretrained(safe_serialization=True)`` and loaded by
`lorajax.models.from_pretrained`. Checked: logits (float32, with and without
left padding), greedy generation token for token (incl. a left-padded batch,
EOS handling, sliding windows across the KV cache), sampling, bf16, writing
back with `lorajax.models.save_pretrained`, sharded checkpoints, malformed
checkpoints and configs, and PEFT LoRA adapters in both directions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import safetensors.numpy  # noqa: E402

import lorajax  # noqa: E402
from lorajax.models import hub, llama  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
            pad_token_id=0)
VARIANTS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": 32}),  # window longer than every sequence
    "mistral_window": ("MistralConfig", {"sliding_window": 4}),  # window shorter than the sequences
    "qwen2_window": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "tied": ("LlamaConfig", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True, "head_dim": 8}),
    "llama3": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "linear": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
    "dynamic": ("LlamaConfig", {"max_position_embeddings": 8,
                                "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}),
}

rng = np.random.default_rng(0)
IDS = rng.integers(1, 128, (2, 12)).astype(np.int32)
PAD_MASK = np.ones_like(IDS)
PAD_MASK[1, :3] = 0  # row 1 is left-padded
PROMPT = IDS[:, :6]
PROMPT_MASK = PAD_MASK[:, :6]
NEW = 8


def make_hf(name: str, seed: int = 0):
    cls, extra = VARIANTS[name]
    config = getattr(transformers, cls)(**{**BASE, **extra})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # weights large enough that every part matters; non-trivial norms and biases
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return hf


def hf_logits(hf, ids, mask=None, **kw):
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(np.asarray(ids)).long(),
                 attention_mask=None if mask is None else torch.from_numpy(np.asarray(mask)).long(), **kw)
    return out.logits.float().numpy()


def hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf.generate(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                           max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw).numpy()


def max_diff(got, want, mask=None):
    d = np.abs(np.asarray(got, np.float32) - want)
    return float(d[np.asarray(mask, bool)].max() if mask is not None else d.max())


torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """``ckpt(name)``: the HF model, its folder, and lorajax's (model, params, jitted forward)."""
    cache = {}

    def get(name):
        if name not in cache:
            hf = make_hf(name)
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path, safe_serialization=True)
            model, params = lorajax.models.from_pretrained(path)
            fwd = jax.jit(lambda p, ids, m: model.apply({"params": p}, ids, attention_mask=m))
            cache[name] = SimpleNamespace(hf=hf, path=path, model=model, params=params, fwd=fwd)
        return cache[name]

    return get


# ----------------------------------------------------------------------------- forward parity
@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(ckpt, name):
    c = ckpt(name)
    assert isinstance(c.model, llama.LlamaForCausalLM) and c.model.cfg.model_type == VARIANTS[name][0][:-6].lower()
    full = np.ones_like(IDS)
    for mask in (full, PAD_MASK):
        got = c.fwd(c.params, IDS, mask)
        assert got.shape == (2, 12, 128) and got.dtype == jnp.float32
        assert max_diff(got, hf_logits(c.hf, IDS, mask), mask) <= TOL, (name, mask.tolist())


def test_names_equal_hf_module_names(ckpt):
    c = ckpt("tied")
    p = c.params
    assert sorted(p) == ["model"]  # tied: no lm_head
    assert sorted(p["model"]) == ["embed_tokens", "layers", "norm"]
    layer = p["model"]["layers"]["1"]
    assert sorted(layer) == ["input_layernorm", "mlp", "post_attention_layernorm", "self_attn"]
    assert sorted(layer["self_attn"]["o_proj"]) == ["bias", "kernel"]
    hf_names = {n for n, _ in c.hf.named_parameters()}
    assert set(llama.param_map(c.model.cfg)) == hf_names
    qwen = ckpt("qwen2").params["model"]["layers"]["0"]["self_attn"]
    assert "bias" in qwen["q_proj"] and "bias" not in qwen["o_proj"]
    assert "lm_head" in ckpt("qwen2").params


def test_default_mask_and_position_ids(ckpt):
    c = ckpt("llama")
    apply = c.model.apply
    no_mask = apply({"params": c.params}, jnp.asarray(IDS))
    np.testing.assert_allclose(no_mask, c.fwd(c.params, IDS, np.ones_like(IDS)), atol=1e-5)
    assert max_diff(no_mask, hf_logits(c.hf, IDS)) <= TOL
    # explicit position ids (as generate makes them for left padding)
    pos = np.where(PAD_MASK == 0, 0, np.cumsum(PAD_MASK, 1) - 1)
    got = apply({"params": c.params}, jnp.asarray(IDS), attention_mask=jnp.asarray(PAD_MASK),
                position_ids=jnp.asarray(pos))
    want = hf_logits(c.hf, IDS, PAD_MASK, position_ids=torch.from_numpy(pos).long())
    assert max_diff(got, want, PAD_MASK) <= TOL


def test_sliding_window_is_active(ckpt):
    """With window 4 < 12 tokens the logits differ from full attention (so the parity test sees the window)."""
    for name in ("mistral_window", "qwen2_window"):
        c = ckpt(name)
        full = llama.build(dataclasses.replace(c.model.cfg, sliding_window=None))
        a = c.fwd(c.params, IDS, np.ones_like(IDS))
        b = full.apply({"params": c.params}, jnp.asarray(IDS))
        assert np.abs(np.asarray(a - b))[:, :4].max() < 1e-5  # first `window` positions see the same keys
        assert np.abs(np.asarray(a - b)).max() > 1e-2
    assert ckpt("qwen2_window").model.cfg.layer_types == ("full_attention", "sliding_attention")


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["llama", "mistral_window", "qwen2_window", "tied", "dynamic"])
def test_greedy_generate_matches_transformers(ckpt, name):
    c = ckpt(name)
    for mask in (np.ones_like(PROMPT), PROMPT_MASK):  # same shapes: one compilation
        got = llama.generate(c.model, c.params, PROMPT, NEW, attention_mask=mask)
        assert got.shape == (2, 6 + NEW)
        np.testing.assert_array_equal(np.asarray(got), hf_generate(c.hf, PROMPT, mask), err_msg=name)


def test_generate_eos(ckpt):
    c = ckpt("llama")
    ref = np.asarray(llama.generate(c.model, c.params, PROMPT, NEW, attention_mask=PROMPT_MASK))
    eos = int(ref[0, 6 + 2])  # row 0 stops after 3 new tokens
    got = np.asarray(llama.generate(c.model, c.params, PROMPT, NEW, attention_mask=PROMPT_MASK,
                                    eos_token_id=eos, pad_token_id=0))
    want = hf_generate(c.hf, PROMPT, PROMPT_MASK, eos_token_id=eos)
    n = want.shape[1]  # HF stops early once every row is finished
    np.testing.assert_array_equal(got[:, :n], want)
    assert (got[:, n:] == 0).all()
    assert (got[0, 6 + 3:] == 0).all()


def test_sampling(ckpt):
    c = ckpt("llama")
    kw = dict(attention_mask=PROMPT_MASK, temperature=0.8)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = np.asarray(llama.generate(c.model, c.params, PROMPT, NEW, key=k1, top_p=0.9, **kw))
    b = np.asarray(llama.generate(c.model, c.params, PROMPT, NEW, key=k1, top_p=0.9, **kw))
    d = np.asarray(llama.generate(c.model, c.params, PROMPT, NEW, key=k2, top_p=0.9, **kw))
    np.testing.assert_array_equal(a, b)
    assert (a[:, 6:] != d[:, 6:]).any()
    assert a.dtype == np.int32 and ((a >= 0) & (a < 128)).all()
    np.testing.assert_array_equal(a[:, :6], PROMPT)
    greedy = np.asarray(llama.generate(c.model, c.params, PROMPT, NEW, attention_mask=PROMPT_MASK))
    nucleus0 = np.asarray(llama.generate(c.model, c.params, PROMPT, NEW, key=k2, top_p=1e-6, **kw))
    np.testing.assert_array_equal(nucleus0, greedy)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        llama.generate(c.model, c.params, PROMPT, NEW, temperature=1.0)


def test_top_p_filter():
    logits = jnp.log(jnp.array([[0.5, 0.1, 0.3, 0.1], [0.05, 0.05, 0.1, 0.8]]))
    kept = np.isfinite(np.asarray(llama._top_p_filter(logits, jnp.float32(0.7))))
    np.testing.assert_array_equal(kept, [[True, False, True, False], [False, False, False, True]])
    kept = np.isfinite(np.asarray(llama._top_p_filter(logits, jnp.float32(0.0))))
    assert kept.sum(1).tolist() == [1, 1]


def test_kv_cache_matches_full_forward(ckpt):
    """Prefill + one-token steps through the cache give the full forward's logits."""
    c = ckpt("mistral_window")
    cfg, S, T = c.model.cfg, 9, 12
    mask = np.ones((2, T), np.int32)
    mask[1, :3] = 0
    step = jax.jit(lambda p, ids, m, cache, i: c.model.apply({"params": p}, ids, attention_mask=m, cache=cache,
                                                             cache_index=i))
    logits, cache = step(c.params, IDS[:, :S], mask, llama.init_cache(cfg, 2, T), 0)
    steps = [logits]
    for i in range(S, T):
        lg, cache = step(c.params, IDS[:, i:i + 1], mask, cache, i)
        steps.append(lg)
    got = jnp.concatenate(steps, axis=1)
    assert max_diff(got, np.asarray(c.fwd(c.params, IDS, mask)), mask) <= 1e-5


# ----------------------------------------------------------------------------- dtypes
def test_bf16(ckpt):
    c = ckpt("llama")
    model, params = lorajax.models.from_pretrained(c.path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    got = jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m))(params, IDS, PAD_MASK)
    assert got.dtype == jnp.bfloat16
    ref = hf_logits(c.hf, IDS, PAD_MASK)
    assert max_diff(got, ref, PAD_MASK) <= 0.05 * np.abs(ref).max()
    out = np.asarray(llama.generate(model, params, PROMPT, 4, attention_mask=PROMPT_MASK))
    assert out.shape == (2, 10) and ((out >= 0) & (out < 128)).all()


# ----------------------------------------------------------------------------- checkpoints out and in
@pytest.mark.parametrize("name", ["llama", "qwen2_window", "mistral_window", "tied", "llama3", "dynamic"])
def test_save_pretrained_round_trip(ckpt, tmp_path, name):
    c = ckpt(name)
    lorajax.models.save_pretrained(tmp_path, c.model, c.params)
    assert llama.Config.from_hf(hub.load_config(tmp_path)) == c.model.cfg
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(c.hf)
    # against lorajax's logits (c.hf's "dynamic" RoPE state depends on its call history)
    assert max_diff(c.fwd(c.params, IDS, PAD_MASK), hf_logits(back, IDS, PAD_MASK), PAD_MASK) <= TOL
    model2, params2 = lorajax.models.from_pretrained(tmp_path)
    assert model2.cfg == c.model.cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, c.params)


def test_sharded_checkpoint(ckpt, tmp_path):
    c = ckpt("llama")
    c.hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _, params = lorajax.models.from_pretrained(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, c.params)
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match="shards named in"):
        lorajax.models.from_pretrained(tmp_path)


@pytest.fixture
def broken(ckpt, tmp_path):
    """A writable copy of the llama checkpoint and its tensors, to corrupt."""
    shutil.copytree(ckpt("llama").path, tmp_path, dirs_exist_ok=True)
    file = tmp_path / "model.safetensors"
    return SimpleNamespace(path=tmp_path, file=file, tensors=safetensors.numpy.load_file(str(file)))


def _write(b, tensors):
    safetensors.numpy.save_file(tensors, str(b.file), metadata={"format": "pt"})


def test_missing_tensor(broken):
    del broken.tensors["model.layers.1.mlp.up_proj.weight"]
    _write(broken, broken.tensors)
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        lorajax.models.from_pretrained(broken.path)


def test_wrong_shape(broken):
    broken.tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    _write(broken, broken.tensors)
    with pytest.raises(ValueError, match=r"k_proj\.weight'? has shape \(64, 64\), config\.json implies \(32, 64\)"):
        lorajax.models.from_pretrained(broken.path)


def test_unexpected_and_ignored_tensors(broken):
    t = dict(broken.tensors)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((8,), np.float32)  # old buffer: ignored
    _write(broken, t)
    lorajax.models.from_pretrained(broken.path)
    t["model.layers.0.self_attn.q_norm.weight"] = np.ones((16,), np.float32)
    _write(broken, t)
    with pytest.raises(ValueError, match=r"does not use.*q_norm"):
        lorajax.models.from_pretrained(broken.path)


def test_truncated_file(broken):
    data = broken.file.read_bytes()
    broken.file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lorajax.models.from_pretrained(broken.path)


def test_missing_config(broken):
    (broken.path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        lorajax.models.from_pretrained(broken.path)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                          "original_max_position_embeddings": 64}}, "unsupported RoPE type 'yarn'"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "unsupported RoPE type 'longrope'"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "needs a 'factor'"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"hidden_size": None}, r"lacks \['hidden_size'\]"),
])
def test_unsupported_config(broken, change, match):
    config = json.loads((broken.path / "config.json").read_text())
    config.update(change)
    (broken.path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        lorajax.models.from_pretrained(broken.path)


# ----------------------------------------------------------------------------- Config
def test_config_layouts():
    """transformers 4 layout (top-level rope_theta, rope_scaling with "type") and defaults."""
    v4 = {"model_type": "llama", "vocab_size": 10, "hidden_size": 32, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 5e5, "max_position_embeddings": 128,
          "rope_scaling": {"type": "linear", "factor": 4.0}, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    cfg = llama.Config.from_hf(v4)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ("linear", 4.0, 5e5)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rms_norm_eps) == (8, 4, 1e-6)
    out = cfg.to_hf()
    assert out["rope_parameters"] == {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}
    assert out["eos_token_id"] == 2 and "torch_dtype" not in out
    assert llama.Config.from_hf(out) == cfg
    # llama3: a top-level original_max_position_embeddings wins (as in transformers)
    l3 = {**v4, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
    assert llama.Config.from_hf(l3).rope_original_max_position_embeddings == 32
    assert llama.Config.from_hf({**l3, "original_max_position_embeddings": 16}
                                ).rope_original_max_position_embeddings == 16
    # Qwen2: q/k/v biases always, no window unless use_sliding_window; Mistral's default window
    qwen = llama.Config.from_hf({**v4, "model_type": "qwen2", "sliding_window": 8})
    assert (qwen.qkv_bias, qwen.o_bias, qwen.window(0)) == (True, False, None)
    mistral = llama.Config.from_hf({**v4, "model_type": "mistral", "attention_bias": True})
    assert (mistral.qkv_bias, mistral.window(0)) == (False, 4096)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_matches_transformers(name):
    """Config.from_hf(transformers' own config dict) reads every field transformers uses; to_hf inverts it."""
    cls, extra = VARIANTS[name]
    hf_cfg = getattr(transformers, cls)(**{**BASE, **extra})
    cfg = llama.Config.from_hf(hf_cfg.to_dict())
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim) == (64, 2, extra.get("head_dim", 16))
    assert cfg.rope_type == hf_cfg.rope_parameters["rope_type"]
    assert cfg.rope_theta == hf_cfg.rope_parameters["rope_theta"]
    assert llama.Config.from_hf(cfg.to_hf()) == cfg
    reloaded = getattr(transformers, cls)(**cfg.to_hf())
    assert reloaded.rope_parameters == hf_cfg.rope_parameters
    for k in ("sliding_window", "layer_types", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias"):
        assert getattr(reloaded, k, None) == getattr(hf_cfg, k, None), k


def test_rope_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("llama3", "linear", "dynamic"):
        cls, extra = VARIANTS[name]
        hf_cfg = getattr(transformers, cls)(**{**BASE, **extra})
        want, scale = ROPE_INIT_FUNCTIONS[name](hf_cfg)
        assert scale == 1.0
        np.testing.assert_allclose(llama.rope_inv_freq(llama.Config.from_hf(hf_cfg.to_dict())), want.numpy(),
                                   rtol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- LoRA / PEFT
def test_peft_lora_adapter_loads(ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    c = ckpt("llama")
    base = transformers.AutoModelForCausalLM.from_pretrained(c.path).eval()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path)
    want = hf_logits(pm, IDS, PAD_MASK)
    assert max_diff(want, hf_logits(c.hf, IDS, PAD_MASK), PAD_MASK) > 1e-2  # the adapter changes the logits

    variables = {"params": c.params}
    spec, adapters = lorajax.peft.load(tmp_path, variables)
    names = [t.name for t in lorajax.select(spec, variables)]
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    for mode in ("factored", "merged"):
        fwd = lorajax.adapt(c.model.apply, spec, mode=mode)
        got = fwd(variables, adapters, jnp.asarray(IDS), attention_mask=jnp.asarray(PAD_MASK))
        assert max_diff(got, want, PAD_MASK) <= TOL, mode

    # generation with merged params, and with the factored forward through apply_fn
    merged = lorajax.merge(spec, variables, adapters)["params"]
    out = np.asarray(llama.generate(c.model, merged, PROMPT, NEW, attention_mask=PROMPT_MASK))
    with torch.no_grad():
        ref = pm.generate(input_ids=torch.from_numpy(PROMPT).long(),
                          attention_mask=torch.from_numpy(PROMPT_MASK).long(), max_new_tokens=NEW,
                          do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(out, ref)
    factored = lorajax.adapt(c.model.apply, spec, mode="factored")
    out2 = llama.generate(c.model, (c.params, adapters), PROMPT, NEW, attention_mask=PROMPT_MASK,
                          apply_fn=_factored_apply(factored))
    np.testing.assert_array_equal(np.asarray(out2), ref)


@functools.lru_cache(maxsize=None)
def _factored_apply(fwd):
    """A stable ``apply_fn`` for `llama.generate` over ``(params, adapters)``."""
    return lambda pa, ids, **kw: fwd({"params": pa[0]}, pa[1], ids, **kw)


def test_lorajax_adapter_saves_for_peft(ckpt, tmp_path):
    peft = pytest.importorskip("peft")
    c = ckpt("llama")
    variables = {"params": c.params}
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                        init_weights=False)
    adapters = lorajax.init(spec, variables, 1)
    lorajax.peft.save(tmp_path, spec, adapters, variables)
    base = transformers.AutoModelForCausalLM.from_pretrained(c.path).eval()
    pm = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    want = hf_logits(pm, IDS, PAD_MASK)
    assert max_diff(want, hf_logits(c.hf, IDS, PAD_MASK), PAD_MASK) > 1e-2
    for mode in ("factored", "merged"):
        got = lorajax.adapt(c.model.apply, spec, mode=mode)(variables, adapters, jnp.asarray(IDS),
                                                             attention_mask=jnp.asarray(PAD_MASK))
        assert max_diff(got, want, PAD_MASK) <= TOL, mode


PEFT_CONFIGS = {
    "rslora+patterns": lambda peft: peft.LoraConfig(
        r=4, lora_alpha=6, target_modules="all-linear", use_rslora=True, rank_pattern={"mlp.down_proj": 2},
        alpha_pattern={"model.layers.1.self_attn.o_proj": 3}, init_lora_weights=False),
    "dora": lambda peft: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], use_dora=True,
                                         init_lora_weights=False),
    "layers+regex-exclude": lambda peft: peft.LoraConfig(
        r=2, target_modules=["k_proj", "gate_proj"], layers_to_transform=[1], exclude_modules=r".*gate_proj",
        init_lora_weights=False),
    "vera": lambda peft: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], save_projection=True),
    "miss": lambda peft: peft.MissConfig(r=4, target_modules=["q_proj", "o_proj", "up_proj"]),
    "shira": lambda peft: peft.ShiraConfig(r=2, target_modules=["k_proj", "down_proj"]),
    "randlora": lambda peft: peft.RandLoraConfig(r=4, target_modules=["v_proj", "gate_proj"], save_projection=True),
    # no saved indices: lorajax regenerates them in HF Llama's module order (lorajax.peft.TORCH_MODULE_ORDER)
    "unilora": lambda peft: peft.UniLoraConfig(r=2, target_modules="all-linear", theta_d_length=64),
}


@pytest.mark.parametrize("name", sorted(PEFT_CONFIGS))
def test_peft_variants_on_llama(ckpt, tmp_path, name):
    """PEFT-made adapters with non-zero updates give PEFT's logits in lorajax, factored and merged."""
    peft = pytest.importorskip("peft")
    c = ckpt("llama")
    base = transformers.AutoModelForCausalLM.from_pretrained(c.path).eval()
    pm = peft.get_peft_model(base, PEFT_CONFIGS[name](peft))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if any(k in n for k in ("lora_B", "lora_magnitude_vector", "vera_lambda", "miss_block", "shira_weight",
                                    "randlora_lambda", "randlora_gamma", "unilora_theta_d")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.eval().save_pretrained(tmp_path)
    want = hf_logits(pm, IDS, PAD_MASK)
    assert max_diff(want, hf_logits(c.hf, IDS, PAD_MASK), PAD_MASK) > 1e-2
    spec, adapters = lorajax.peft.load(tmp_path, c.params)  # bare params: adapters work with variables too
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                        if hasattr(m, "base_layer") and not n.endswith("base_layer"))
    assert sorted(t.name for t in lorajax.select(spec, c.params)) == peft_names
    for mode in ("factored", "merged"):
        got = lorajax.adapt(c.model.apply, spec, mode=mode)({"params": c.params}, adapters, jnp.asarray(IDS),
                                                            attention_mask=jnp.asarray(PAD_MASK))
        assert max_diff(got, want, PAD_MASK) <= TOL, mode


def test_remat_same_outputs_and_adapter_gradients():
    """remat=True (activation checkpointing per decoder layer) changes memory, not maths."""
    cfg = llama.Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, architectures=("LlamaForCausalLM",))
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64
    plain, remat = llama.LlamaForCausalLM(cfg), llama.LlamaForCausalLM(cfg, remat=True)
    variables = plain.init(jax.random.key(0), ids)
    spec = lorajax.Spec("lora", rank=2, targets="all-linear", init_weights=False)
    adapters = lorajax.init(spec, variables, 1)
    outs = []
    for model in (plain, remat):
        fwd = jax.jit(lorajax.adapt(model.apply, spec, mode="factored"))
        loss, grads = jax.value_and_grad(lambda a: jnp.sum(fwd(variables, a, ids) ** 2))(adapters)
        outs.append((loss, grads))
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(outs[1][1]), jax.tree.leaves(outs[0][1])):  # XLA fuses the recompute
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-5  # differently: f32 rounding only
