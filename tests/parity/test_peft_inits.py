"""PiSSA and OLoRA initialisers against Hugging Face PEFT (``init_lora_weights="pissa"`` / ``"olora"``).

Both change the frozen base: PEFT overwrites ``base_layer.weight`` with the
residual; ``lorajax.inits.pissa`` / ``olora`` return ``(adapters, new_params)``.
SVD and QR factors are unique only up to the signs of paired columns/rows, so
we compare the residual weights, the product ``s·BA``, and ``|A|``, ``|B|``
element-wise (a sign flip moves between a column of B and the matching row of A).

The base weights get a geometric spectrum (sigma_i = 0.7^i, like the decaying
spectra of trained weights). With the near-flat spectrum of a random init, the
rank-r truncation is ill-conditioned (sigma_4 - sigma_5 ~ 0.03) and two correct
float32 SVDs (torch's and XLA's LAPACK) disagree by ~1e-5 relative, which is
conditioning, not a parity error.
"""

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lorajax  # noqa: E402
from lorajax.variants.lora import scaling  # noqa: E402

from _torch_models import (  # noqa: E402
    FlaxNet,
    assert_close,
    assert_weights_match,
    flax_variables,
    get_leaf_dict,
    inputs,
    lorajax_names,
    make_torch_net,
    peft_adapted_names,
    peft_module,
    set_adapter,
    to_np,
    torch_out,
)

TARGETS = ["q_proj", "v_proj", "o_proj"]
CONFIGS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"o_proj": 2}, "alpha_pattern": {"layers.1.v_proj": 3}},
}


def make_net(seed):
    """The test network with every Linear weight rescaled to singular values 0.7^i (same singular vectors)."""
    net = make_torch_net(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.Linear):
                u, s, vh = torch.linalg.svd(mod.weight.double(), full_matrices=False)
                sigma = 0.7 ** torch.arange(s.shape[0], dtype=torch.float64)
                mod.weight.copy_(((u * sigma) @ vh).float())
    return net


def init_fn(method):
    return {"pissa": lorajax.inits.pissa, "olora": lorajax.inits.olora}[method]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_init_matches_peft(method, config):
    kw = CONFIGS[config]
    net = make_net(0)
    original = copy.deepcopy(net)
    variables = flax_variables(net)
    peft_model = peft.get_peft_model(
        net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=method, **kw)
    ).eval()
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=TARGETS, **kw)
    assert lorajax_names(spec, variables) == peft_adapted_names(peft_model)

    adapters, residual = init_fn(method)(spec, variables)

    # the residual base equals PEFT's modified base weights; untargeted weights are untouched
    assert_weights_match(residual, peft_model.base_model.model)
    # lorajax.merge(residual, adapters) is the original model's weights
    assert_weights_match(lorajax.merge(spec, residual, adapters), original)

    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        assert t.rank == mod.r["default"] and scaling(t) == pytest.approx(mod.scaling["default"], rel=1e-12)
        a_peft, b_peft = to_np(mod.lora_A["default"].weight), to_np(mod.lora_B["default"].weight)  # [r,in], [out,r]
        ours = get_leaf_dict(adapters, t.keys)
        a_ours, b_ours = np.asarray(ours["lora_A"]), np.asarray(ours["lora_B"])  # [in,r], [r,out]
        s = scaling(t)
        assert_close(s * a_ours @ b_ours, (s * b_peft @ a_peft).T, what=f"s*BA {t.name}")
        assert_close(np.abs(a_ours), np.abs(a_peft.T), what=f"|A| {t.name}")
        assert_close(np.abs(b_ours), np.abs(b_peft.T), what=f"|B| {t.name}")
        if method == "olora":  # B has orthonormal columns (rows in lorajax's layout)
            assert_close(b_ours @ b_ours.T, np.eye(t.rank), what=f"BᵀB {t.name}")

    # the adapted model computes the original function, in lorajax and in PEFT
    x = inputs(1)
    want = torch_out(original, x)
    assert_close(torch_out(peft_model, x), want, what="PEFT at init")
    model = FlaxNet()
    for mode in ("merged", "factored"):
        assert_close(lorajax.adapt(model.apply, spec, mode=mode)(residual, adapters, jnp.asarray(x)), want,
                     what=mode)
    # and PEFT's merge_and_unload gives back (numerically) the original weights, as lorajax.merge
    assert_weights_match(lorajax.merge(spec, residual, adapters), peft_model.merge_and_unload())


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_init_then_train_step_matches_peft(method):
    """After one identical SGD step on A and B, the adapted outputs still agree."""
    net = make_net(1)
    variables = flax_variables(net)
    peft_model = peft.get_peft_model(
        net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=method)
    )
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=TARGETS)
    adapters, residual = init_fn(method)(spec, variables)
    # use PEFT's exact factors (signs differ across LAPACKs) to compare the training step
    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        adapters = set_adapter(adapters, t.keys, {"lora_A": to_np(mod.lora_A["default"].weight).T,
                                                  "lora_B": to_np(mod.lora_B["default"].weight).T})

    x = inputs(2)
    g = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    lr = 0.1
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    opt.zero_grad()
    (peft_model(torch.from_numpy(x)) * torch.from_numpy(g)).sum().backward()
    opt.step()

    fwd = lorajax.adapt(FlaxNet().apply, spec, mode="factored")
    grads = jax.grad(lambda a: jnp.sum(fwd(residual, a, jnp.asarray(x)) * g))(adapters)
    adapters = jax.tree_util.tree_map(lambda p, d: p - lr * d, adapters, grads)
    x2 = inputs(3)
    assert_close(fwd(residual, adapters, jnp.asarray(x2)), torch_out(peft_model.eval(), x2))


# ----------------------------------------------------------------------------- PEFT folders saved unconverted
@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_unconverted_folder_loads_with_the_rebuilt_residual_base(method, tmp_path):
    """A folder saved with init_lora_weights=method (trained, not converted): PEFT's loader re-shifts the original
    base; `load` refuses it, `load_with_base` rebuilds that base and gives PEFT's outputs."""
    net = make_net(1)
    original, variables = copy.deepcopy(net), flax_variables(net)
    kw = {"use_rslora": True} if method == "olora" else {}
    peft_model = peft.get_peft_model(
        net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=method, **kw)
    )
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # "training": the adapters move away from their init
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(tmp_path)
    x = inputs(2)
    want = torch_out(peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval(), x)
    with pytest.raises(ValueError, match=f"init_lora_weights='{method}'.*load_with_base"):
        lorajax.peft.load(tmp_path, variables)
    spec, adapters, base = lorajax.peft.load_with_base(tmp_path, variables)
    assert_weights_match(base, peft_model.base_model.model)  # the residual PEFT trained on
    assert_close(lorajax.adapt(FlaxNet().apply, spec, "factored")(base, adapters, jnp.asarray(x)), want)


def test_inits_whose_base_cannot_be_rebuilt_are_refused(tmp_path):
    """Shifts from a randomised SVD, data or quantisation raise, naming the initialiser and the way out;
    initialisers that leave the base alone load with params unchanged."""
    variables = flax_variables(make_torch_net(0))
    spec = lorajax.Spec("lora", rank=2, alpha=4, targets=TARGETS, init_weights=False)
    lorajax.peft.save(tmp_path, spec, lorajax.init(spec, variables, jax.random.key(0)), variables)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for init, needle in [("pissa_niter_4", "randomised SVD"), ("lora_ga", "gradients"), ("corda", "activations"),
                         ("loftq", "LoftQ"), ("sparse", "unknown initialiser")]:
        config_path.write_text(json.dumps({**config, "init_lora_weights": init}))
        for load in (lorajax.peft.load, lorajax.peft.load_with_base):
            with pytest.raises(ValueError, match=f"init_lora_weights='{init}'.*{needle}.*path_initial_model"):
                load(tmp_path, variables)
    for init in ("orthogonal", "eva", True):
        config_path.write_text(json.dumps({**config, "init_lora_weights": init}))
        assert lorajax.peft.load_with_base(tmp_path, variables)[2] is variables
        lorajax.peft.load(tmp_path, variables)
