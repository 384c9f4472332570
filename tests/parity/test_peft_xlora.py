"""X-LoRA parity with PEFT's ``XLoraModel``: scalings and logits of a tiny HF Llama with three LoRA experts
(different ranks and alphas) equal lorajax's `lorajax.xlora` (float32), for the defaults, and layer-wise scalings
through a depth-2 classifier with top-k and the top-k softmax; plus the save/load round trip and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorajax  # noqa: E402
from lorajax import xlora  # noqa: E402

RANKS, ALPHAS = (2, 3, 2), (4, 3, 8)
TARGETS = ["q_proj", "v_proj", "down_proj"]
D = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("xlora")
    hc = transformers.LlamaConfig(
        vocab_size=40, hidden_size=D, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(hc).eval()
    base.save_pretrained(root / "base", safe_serialization=True)
    dirs = {}
    for i, (r, a) in enumerate(zip(RANKS, ALPHAS)):
        torch.manual_seed(10 + i)
        m = transformers.LlamaForCausalLM(hc)
        m.load_state_dict(base.state_dict())
        cfg = peft.LoraConfig(r=r, lora_alpha=a, target_modules=TARGETS, init_lora_weights=False)
        peft.get_peft_model(m, cfg).save_pretrained(root / f"e{i}")
        dirs[str(i)] = str(root / f"e{i}")  # PEFT 0.21 X-LoRA needs the names "0", "1", ...
    model, params = lorajax.models.from_pretrained(root / "base")
    loaded = [lorajax.peft.load(dirs[str(i)], params) for i in range(len(RANKS))]
    specs = [s for s, _ in loaded]
    pool = xlora.stack(specs, [a for _, a in loaded])
    ids = np.random.default_rng(0).integers(0, 40, (2, 7))
    return root, hc, base, dirs, model, params, specs, pool, ids


def _peft_run(setup, **cfg):
    root, hc, base, dirs, *_, ids = setup
    torch.manual_seed(5)
    m = transformers.LlamaForCausalLM(hc)
    m.load_state_dict(base.state_dict())
    m.config.use_cache = False
    xm = peft.get_peft_model(m, peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=D, adapters=dirs, **cfg))
    xm.eval()
    with torch.no_grad():
        logits = xm(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    lam = xm.get_latest_scalings().numpy()
    clf = xm.base_model.internal_xlora_classifier.layers
    linears = [layer for layer in clf if isinstance(layer, torch.nn.Linear)]
    classifier = tuple(
        {"kernel": jnp.asarray(lin.weight.detach().numpy().T), "bias": jnp.asarray(lin.bias.detach().numpy())}
        for lin in linears
    )
    return logits, lam, classifier


CASES = {
    "defaults": {},
    "layerwise_depth2_top_k": {
        "layerwise_scalings": True, "xlora_depth": 2, "xlora_size": 8, "global_scaling_weight": 1.5,
        "top_k_lora": 2, "enable_softmax_topk": True, "softmax_temperature": 0.7,
    },
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_scalings_and_logits_match_peft(setup, case):
    _, _, _, _, model, params, specs, pool, ids = setup
    want_logits, want_lam, classifier = _peft_run(setup, **CASES[case])
    config = xlora.Config(hidden_size=D, **CASES[case])
    fwd = jax.jit(xlora.adapt(model.apply, specs[0], config), static_argnames="return_scalings")
    logits, lam = fwd({"params": params}, pool, classifier, jnp.asarray(ids), return_scalings=True)
    assert lam.shape == want_lam.shape == (2, 7, 2 * len(TARGETS), 3)
    np.testing.assert_allclose(lam, want_lam, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    base_logits = model.apply({"params": params}, jnp.asarray(ids))
    assert float(jnp.abs(logits - base_logits).max()) > 1e-3  # the experts change the output


def test_one_hot_scalings_give_the_single_expert(setup):
    """λ one-hot on expert 1 (a saturated classifier) == the plain LoRA model of expert 1."""
    _, _, _, dirs, model, params, specs, pool, ids = setup
    config = xlora.Config(hidden_size=D)
    clf = ({"kernel": jnp.zeros((D, 3)), "bias": jnp.array([-1e4, 1e4, -1e4])},)
    got = xlora.adapt(model.apply, specs[0], config)({"params": params}, pool, clf, jnp.asarray(ids))
    spec1, expert1 = lorajax.peft.load(dirs["1"], params)
    want = lorajax.adapt(model.apply, spec1)({"params": params}, expert1, jnp.asarray(ids))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_classifier_and_when_asked_the_experts(setup):
    """Training differentiates the classifier (the default) and, with trainable adapters, the pool: with λ one-hot
    on expert 1, the pool's gradient on expert 1 equals plain LoRA's gradient of that expert, and the others get 0."""
    _, _, _, dirs, model, params, specs, pool, ids = setup
    config = xlora.Config(hidden_size=D, use_trainable_adapters=True)
    fwd = xlora.adapt(model.apply, specs[0], config)
    g = jax.random.normal(jax.random.key(1), (2, 7, 40))
    clf = xlora.init_classifier(config, 3, 2 * len(TARGETS), jax.random.key(2))
    grad = jax.jit(jax.grad(lambda p, c: jnp.sum(fwd({"params": params}, p, c, jnp.asarray(ids)) * g), (0, 1)))
    d_clf = grad(pool, clf)[1]
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(d_clf))
    onehot = ({"kernel": jnp.zeros((D, 3)), "bias": jnp.array([-1e4, 1e4, -1e4])},)
    d_pool = grad(pool, onehot)[0]  # the same compiled gradient (same shapes)
    spec1, expert1 = lorajax.peft.load(dirs["1"], params)
    plain = lorajax.adapt(model.apply, spec1)
    d_plain = jax.jit(jax.grad(lambda a: jnp.sum(plain({"params": params}, a, jnp.asarray(ids)) * g)))(expert1)
    for t in lorajax.select(spec1, {"params": params}):
        got, want = get_leaf(d_pool, t.keys), get_leaf(d_plain, t.keys)
        r = want["lora_A"].shape[1]  # expert 1's own rank inside the pool's padded rank
        np.testing.assert_allclose(got["lora_A"][1][:, :r], want["lora_A"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["lora_B"][1][:r], want["lora_B"], rtol=1e-4, atol=1e-6)
        assert float(jnp.abs(got["lora_A"][0]).max()) == 0.0 and float(jnp.abs(got["lora_B"][2]).max()) == 0.0


def get_leaf(tree, keys):
    for k in keys if keys[0] in tree else keys[1:]:
        tree = tree[k]
    return tree


def test_save_load_round_trip_and_bad_input(setup, tmp_path):
    _, _, _, dirs, model, params, specs, pool, ids = setup
    config = xlora.Config(hidden_size=D, xlora_depth=2, xlora_size=8, top_k_lora=1)
    clf = xlora.init_classifier(config, 3, 2 * len(TARGETS), jax.random.key(0))
    xlora.save(tmp_path / "x", config, clf, dirs)
    raw = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "XLORA" and raw["adapters"] == dirs
    peft.XLoraConfig.from_pretrained(tmp_path / "x")  # PEFT reads the config
    config2, clf2, dirs2 = xlora.load(tmp_path / "x")
    assert config2 == config and dirs2 == dirs
    jax.tree.map(np.testing.assert_array_equal, clf, clf2)
    fwd = xlora.adapt(model.apply, specs[0], config)
    with pytest.raises(ValueError, match="classifier has 1 layers"):
        fwd({"params": params}, pool, clf[:1], jnp.asarray(ids))
    wrong = xlora.init_classifier(config, 2, 2 * len(TARGETS), jax.random.key(0))  # 2 experts, pool has 3
    with pytest.raises(ValueError, match="3 experts"):
        fwd({"params": params}, pool, wrong, jnp.asarray(ids))
    with pytest.raises(ValueError, match="top_k_lora"):
        xlora.Config(hidden_size=D, enable_softmax_topk=True)
    with pytest.raises(ValueError, match="differ in targets"):
        other = lorajax.Spec("lora", rank=2, targets=["q_proj"])
        xlora.stack([specs[0], other], [lorajax.init(specs[0], params, 0), lorajax.init(other, params, 0)])
    (tmp_path / "x" / "adapter_model.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="safetensors"):
        xlora.load(tmp_path / "x")
