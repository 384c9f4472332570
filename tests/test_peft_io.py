"""lorajax.peft: PEFT adapter folders in and out, exact to PEFT's outputs; malformed input errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from torch import nn  # noqa: E402

D_IN, D_HID = 8, 12


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D_IN, D_HID)
        self.v_proj = nn.Linear(D_IN, D_HID, bias=False)
        self.o_proj = nn.Linear(D_HID, D_IN)

    def forward(self, x):
        return x + self.o_proj(torch.relu(self.q_proj(x) * self.v_proj(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(D_IN, 5)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def flax_params(net):
    """HF-named Flax params: {"layers": {"0": {"q_proj": {"kernel": W.T, "bias": b}}}, "lm_head": ...}."""
    out = {}
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            node = out
            for part in name.split("."):
                node = node.setdefault(part, {})
            node["kernel"] = jnp.asarray(mod.weight.detach().numpy().T)
            if mod.bias is not None:
                node["bias"] = jnp.asarray(mod.bias.detach().numpy())
    return out


def flax_forward(p, x):
    def lin(q, h):
        return h @ q["kernel"] + (q["bias"][None, :] if "bias" in q else 0.0)

    for i in ("0", "1"):
        b = p["layers"][i]
        x = x + lin(b["o_proj"], jax.nn.relu(lin(b["q_proj"], x) * lin(b["v_proj"], x)))
    return lin(p["lm_head"], x)


@pytest.fixture
def base():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, D_IN)
    return net, x


def _randomise(model, names=("lora_B", "vera_lambda_b", "vera_lambda_d", "lora_magnitude_vector", "miss_block",
                              "shira_weight", "randlora_lambda", "randlora_gamma", "unilora_theta_d")):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in n else 0.0))


CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "rslora+patterns": lambda: peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj"],
                                               use_rslora=True, rank_pattern={"v_proj": 2},
                                               alpha_pattern={"layers.1.q_proj": 3}, init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], use_dora=True,
                                    init_lora_weights=False),
    "regex": lambda: peft.LoraConfig(r=2, target_modules=r".*\.(q|o)_proj", init_lora_weights=False),
    "layers": lambda: peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], layers_to_transform=[1],
                                      layers_pattern="layers", init_lora_weights=False),
    "all-linear": lambda: peft.LoraConfig(r=2, target_modules="all-linear", exclude_modules=["o_proj"],
                                          init_lora_weights=False),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "o_proj"], save_projection=True),
    "miss": lambda: peft.MissConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]),
    "miss-bat": lambda: peft.MissConfig(r=4, target_modules=["q_proj", "o_proj"], init_weights="bat"),
    "miss-mini": lambda: peft.MissConfig(r=4, target_modules=["q_proj", "o_proj"], init_weights="mini", mini_r=4),
    "shira": lambda: peft.ShiraConfig(r=1, target_modules=["q_proj", "o_proj"]),
    "randlora": lambda: peft.RandLoraConfig(r=4, target_modules=["q_proj", "o_proj"], save_projection=True),
    # indices regenerated from the torch module order (lorajax.peft.TORCH_MODULE_ORDER) / imported
    "unilora": lambda: peft.UniLoraConfig(r=2, target_modules=["q_proj", "v_proj", "o_proj"], theta_d_length=40),
    "unilora-indices": lambda: peft.UniLoraConfig(r=3, target_modules=["o_proj", "q_proj"], theta_d_length=32,
                                                  proj_seed=3, save_indices=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_made_adapter_loads_exactly(base, tmp_path, name):
    net, x = base
    params = flax_params(net)
    model = peft.get_peft_model(net, CONFIGS[name]())
    _randomise(model)
    model.eval()
    with torch.no_grad():
        want = model(x).numpy()
    model.save_pretrained(tmp_path)
    spec, adapters = lorajax.peft.load(tmp_path, params)
    got = lorajax.adapt(flax_forward, spec, mode="merged")(params, adapters, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                        if hasattr(m, "base_layer") and not n.endswith("base_layer"))
    assert sorted(t.name for t in lorajax.select(spec, params)) == peft_names


@pytest.mark.parametrize("variant, kwargs", [
    ("lora", dict(rank=3, alpha=5, targets=["q_proj", "o_proj"], rank_pattern={"o_proj": 2}, use_rslora=True)),
    ("dora", dict(rank=2, alpha=4, targets="all-linear", layers_to_transform=[0], layers_pattern="layers")),
    ("vera", dict(rank=4, targets=["v_proj", "o_proj"])),
    ("miss", dict(rank=4, targets=["q_proj", "o_proj"], init_weights="mini", mini_r=4)),
    ("shira", dict(rank=1, targets=["v_proj", "o_proj"])),
    ("randlora", dict(rank=4, alpha=16.0, targets=["q_proj", "v_proj"])),
    ("unilora", dict(rank=2, targets=["q_proj", "v_proj", "o_proj"], theta_d_length=48)),
])
def test_lorajax_made_adapter_loads_in_peft(base, tmp_path, variant, kwargs):
    net, x = base
    params = flax_params(net)
    spec = lorajax.Spec(variant, **kwargs)
    adapters = lorajax.init(spec, params, 0)
    trainable, frozen = lorajax.partition(spec, adapters)  # perturb the trainable leaves only
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    trainable = jax.tree.unflatten(tree, [l + 0.2 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
    adapters = lorajax.combine(trainable, frozen)
    want = lorajax.adapt(flax_forward, spec, mode="merged")(params, adapters, jnp.asarray(x.numpy()))
    lorajax.peft.save(tmp_path, spec, adapters, params)
    model = peft.PeftModel.from_pretrained(net, tmp_path).eval()
    with torch.no_grad():
        got = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and back again
    spec2, adapters2 = lorajax.peft.load(tmp_path, params)
    got2 = lorajax.adapt(flax_forward, spec2, mode="merged")(params, adapters2, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(got2, want, rtol=1e-6, atol=1e-6)


@pytest.fixture
def saved(base, tmp_path):
    net, _ = base
    model = peft.get_peft_model(net, CONFIGS["lora"]())
    model.save_pretrained(tmp_path)
    return tmp_path, flax_params(Net())


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(path / "adapter_model.safetensors"))
    save_file(fn(t), str(path / "adapter_model.safetensors"))


def test_unsupported_fields_raise(saved):
    path, params = saved
    for field, value in [("lora_bias", True), ("modules_to_save", ["lm_head"]), ("peft_type", "IA3"),
                         ("bias", "all"), ("layer_replication", [[0, 1]])]:
        _edit_config(path, **{field: value})
        with pytest.raises(ValueError, match=field if field != "peft_type" else "IA3"):
            lorajax.peft.load(path, params)
        _edit_config(path, **{field: {"lora_bias": False, "modules_to_save": None, "peft_type": "LORA",
                                      "bias": "none", "layer_replication": None}[field]})
    lorajax.peft.load(path, params)  # restored: loads


def test_malformed_tensors_raise(saved):
    path, params = saved
    key = "base_model.model.layers.0.q_proj.lora_A.weight"
    _edit_tensors(path, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(ValueError, match="lacks tensor .*layers.0.q_proj.lora_A"):
        lorajax.peft.load(path, params)
    _edit_tensors(path, lambda t: {**t, key: np.zeros((4, 7), np.float32)})
    with pytest.raises(ValueError, match=r"shape \(4, 7\), expected \(4, 8\)"):
        lorajax.peft.load(path, params)
    _edit_tensors(path, lambda t: {**t, key: np.zeros((4, 8), np.float32), "base_model.model.extra": np.zeros(2)})
    with pytest.raises(ValueError, match="did not expect"):
        lorajax.peft.load(path, params)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match="truncated or malformed"):
        lorajax.peft.load(path, params)


def test_missing_files_and_pickles(tmp_path):
    params = flax_params(Net())
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lorajax.peft.load(tmp_path, params)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lorajax.peft.load(tmp_path, params)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(FileNotFoundError, match="pickles are never loaded"):
        lorajax.peft.load(tmp_path, params)


def test_target_absent_from_model_raises(saved):
    path, params = saved
    _edit_config(path, target_modules=["query", "value"])
    with pytest.raises(ValueError, match="match no weight"):
        lorajax.peft.load(path, params)


def test_unilora_without_indices_needs_a_known_order(base, tmp_path):
    """A Uni-LoRA file without indices on modules whose torch order lorajax cannot know: clear error."""
    net, _ = base
    model = peft.get_peft_model(net, peft.UniLoraConfig(r=2, target_modules=["q_proj", "lm_head"], theta_d_length=16))
    model.save_pretrained(tmp_path)
    params = flax_params(Net())
    with pytest.raises(ValueError, match="unilora_order"):
        lorajax.peft.load(tmp_path, params)
    # with the order given explicitly it loads
    spec, adapters = lorajax.peft.load(tmp_path, params, unilora_order=["q_proj", "lm_head"])
    assert spec.options["target_order"] == ("q_proj", "lm_head")


def test_unilora_inconsistent_scales_raise(base, tmp_path):
    net, _ = base
    model = peft.get_peft_model(net, CONFIGS["unilora-indices"]())
    model.save_pretrained(tmp_path)

    def bump(t):
        key = next(k for k in t if k.endswith("unilora_scales_A"))
        t[key] = t[key] * 2
        return t

    _edit_tensors(tmp_path, bump)
    with pytest.raises(ValueError, match="inconsistent"):
        lorajax.peft.load(tmp_path, flax_params(Net()))
