"""LoRA-GA against Hugging Face PEFT (``init_lora_weights="lora_ga"``, ``preprocess_loraga``).

Gradients: PEFT's ``preprocess_loraga(model, config, train_step)`` runs the
user's ``train_step`` (here: forward + backward over the same batches, MSE
loss) with only the target weights requiring grad and attaches
``weight.grad / n_backward`` to each target; ``lorajax.inits.estimate_gradients``
must give the same averages (transposed to ``[in, out]``).

Init: PEFT's ``lora_ga_init`` takes ``torch.svd_lowrank`` of that gradient.
Singular vectors are unique only up to paired signs, and LoRA-GA puts
different triplets into A and B (A's row i is triplet i, B's column i is
triplet r+i), so the signs change ``B A`` and the shifted base, not only A
and B. lorajax fixes the signs (largest-magnitude entry of each left
singular vector positive); the tests give PEFT's ``torch.svd_lowrank`` the
same rule by wrapping it (PEFT's own randomized SVD still runs), and then
compare A, B, the shifted base, the outputs and ``merge_and_unload`` at
rtol 1e-5 (float32 on both sides). With r = 4 the sketch width
``q = min(4r, m, n) = 16`` spans every target's whole range, so both
randomized SVDs equal the exact one up to rounding.

Conditioning: the options matrix uses a designed gradient with a geometric
spectrum (sigma_i = 0.7^i) attached to PEFT's layers in place of the
estimated one, so that two correct float32 SVDs agree to ~1e-6; the
end-to-end test uses the real estimated gradients.
"""

import copy

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
    to_np,
    torch_name,
    torch_out,
)

TARGETS = ["q_proj", "v_proj", "o_proj"]
# PEFT counts backward passes with full backward hooks; torch warns when a layer's inputs need no grad
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
R, ALPHA = 4, 8


def make_net(seed):
    """The test network with every Linear weight rescaled to singular values 0.7^i (for "weight_svd")."""
    net = make_torch_net(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.Linear):
                u, s, vh = torch.linalg.svd(mod.weight.double(), full_matrices=False)
                mod.weight.copy_(((u * 0.7 ** torch.arange(s.shape[0], dtype=torch.float64)) @ vh).float())
    return net


def _canonical_svd_lowrank(original):
    """``torch.svd_lowrank`` with lorajax's sign rule: each column of U has its largest |entry| positive."""

    def svd_lowrank(a, q=6, niter=2, M=None):
        u, s, v = original(a, q=q, niter=niter, M=M)
        rows = u.abs().argmax(dim=0)
        sign = torch.sign(u[rows, torch.arange(u.shape[1])])
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return u * sign, s, v * sign

    return svd_lowrank


@pytest.fixture
def canonical_torch_svd(monkeypatch):
    monkeypatch.setattr(torch, "svd_lowrank", _canonical_svd_lowrank(torch.svd_lowrank))


def _batches(n=2, seed=10):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((3, 6, 16)).astype(np.float32), rng.standard_normal((3, 6, 16)).astype(np.float32))
            for _ in range(n)]


def _jax_loss(params, batch):
    x, y = batch
    return jnp.mean((FlaxNet().apply(params, x) - y) ** 2)


def _peft_preprocess(net, config, batches):
    def train_step():
        for x, y in batches:
            loss = ((net(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean()
            loss.backward()

    peft.preprocess_loraga(net, config, train_step)
    return {name: to_np(mod._peft_loraga_grad) for name, mod in net.named_modules()
            if hasattr(mod, "_peft_loraga_grad")}


def _geometric(shape, seed):
    """A [out, in] matrix with singular values 0.7^i and random singular vectors."""
    rng = np.random.default_rng(seed)
    k = min(shape)
    u = np.linalg.qr(rng.standard_normal((shape[0], k)))[0]
    v = np.linalg.qr(rng.standard_normal((shape[1], k)))[0]
    return ((u * 0.7 ** np.arange(k)[None, :]) @ v.T).astype(np.float32)


def _compare_init(spec, variables, adapters, residual, peft_model, original):
    assert lorajax_names(spec, variables) == peft_adapted_names(peft_model)
    assert_weights_match(residual, peft_model.base_model.model)             # shifted base
    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        assert scaling(t) == pytest.approx(mod.scaling["default"], rel=1e-12)
        ours = get_leaf_dict(adapters, t.keys)
        assert_close(ours["lora_A"], to_np(mod.lora_A["default"].weight).T, what=f"A {t.name}")
        assert_close(ours["lora_B"], to_np(mod.lora_B["default"].weight).T, what=f"B {t.name}")
    x = inputs(1)
    want = torch_out(original, x)
    assert_close(torch_out(peft_model, x), want, what="PEFT at init")
    for mode in ("merged", "factored"):
        assert_close(lorajax.adapt(FlaxNet().apply, spec, mode=mode)(residual, adapters, jnp.asarray(x)), want,
                     what=mode)
    assert_weights_match(lorajax.merge(spec, residual, adapters), copy.deepcopy(peft_model).merge_and_unload())


def test_gradients_match_peft_preprocess():
    net = make_net(0)
    variables = flax_variables(net)
    batches = _batches(3)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())
    want = _peft_preprocess(net, config, batches)
    spec = lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=TARGETS)
    grads = lorajax.inits.estimate_gradients(spec, _jax_loss, variables, batches)
    assert sorted(want) == lorajax_names(spec, variables)
    for t in lorajax.select(spec, variables):
        assert_close(get_leaf_dict(grads, t.keys), want[torch_name(t.name)].T, what=t.name)
    # only the targets were differentiated in PEFT, and only they come back from lorajax
    assert all(p.grad is None for p in net.parameters())
    assert {"/".join(t.keys) for t in lorajax.select(spec, variables)} == {
        "/".join(p) for p, _ in [(tuple(str(getattr(k, "key", k)) for k in path), x)
                                 for path, x in jax.tree_util.tree_flatten_with_path(grads)[0]]}


CASES = {
    "default": {},
    "A2rBr": {"direction": "A2rBr"},
    "ArBr": {"direction": "ArBr"},
    "weight_svd": {"scale": "weight_svd"},
    "gd_scale": {"scale": "gd_scale"},
    "unit": {"scale": "unit"},
    "gamma64": {"stable_gamma": 64},
}
LORA_KW = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"o_proj": 2}, "alpha_pattern": {"layers.1.v_proj": 3}},
}


# every option with plain LoRA; rsLoRA and patterns (they only change s and r) with the scales that use s
PAIRS = [(c, "plain") for c in CASES] + [(c, k) for c in ("default", "gd_scale") for k in ("rslora", "patterns")]


@pytest.mark.parametrize("case,lora_kw", PAIRS)
def test_init_matches_peft(case, lora_kw, canonical_torch_svd):
    ga_kw, kw = CASES[case], LORA_KW[lora_kw]
    net = make_net(1)
    original = copy.deepcopy(net)
    variables = flax_variables(net)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(**ga_kw), **kw)
    spec = lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=TARGETS, **kw)
    grads = {}
    for i, t in enumerate(lorajax.select(spec, variables)):
        g = _geometric(t.shape[::-1], 100 + i)                                 # [out, in]
        net.get_submodule(torch_name(t.name))._peft_loraga_grad = torch.from_numpy(g)
        node = grads
        for k in t.keys[:-1]:
            node = node.setdefault(k, {})
        node[t.keys[-1]] = jnp.asarray(g.T)
    peft_model = peft.get_peft_model(net, config).eval()
    adapters, residual = lorajax.inits.lora_ga(spec, variables, grads, **ga_kw)
    _compare_init(spec, variables, adapters, residual, peft_model, original)


def test_end_to_end_with_estimated_gradients(canonical_torch_svd):
    """preprocess_loraga + get_peft_model vs estimate_gradients + lora_ga, then one identical SGD step."""
    net = make_net(2)
    original = copy.deepcopy(net)
    variables = flax_variables(net)
    batches = _batches(2, seed=11)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())
    _peft_preprocess(net, config, batches)
    peft_model = peft.get_peft_model(net, config)
    spec = lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=TARGETS)
    grads = lorajax.inits.estimate_gradients(spec, _jax_loss, variables, batches)
    adapters, residual = lorajax.inits.lora_ga(spec, variables, grads)
    _compare_init(spec, variables, adapters, residual, peft_model.eval(), original)

    x, y = batches[0]
    lr = 0.5
    peft_model.train()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    opt.zero_grad()
    ((peft_model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean().backward()
    opt.step()
    fwd = lorajax.adapt(FlaxNet().apply, spec, mode="factored")
    g = jax.grad(lambda a: jnp.mean((fwd(residual, a, jnp.asarray(x)) - y) ** 2))(adapters)
    stepped = jax.tree_util.tree_map(lambda p, d: p - lr * d, adapters, g)
    x2 = inputs(3)
    assert_close(fwd(residual, stepped, jnp.asarray(x2)), torch_out(peft_model.eval(), x2), what="after a step")


def test_bf16_base_matches_peft(canonical_torch_svd):
    """bf16 base: PEFT rounds A, B to bf16 before the shift, then upcasts them to float32 (autocast)."""
    net = make_net(3)
    variables = flax_variables(net)
    variables16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), variables)
    net = net.to(torch.bfloat16)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())
    spec = lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=TARGETS)
    grads = {}
    for i, t in enumerate(lorajax.select(spec, variables)):
        g = _geometric(t.shape[::-1], 200 + i)
        net.get_submodule(torch_name(t.name))._peft_loraga_grad = torch.from_numpy(g)
        node = grads
        for k in t.keys[:-1]:
            node = node.setdefault(k, {})
        node[t.keys[-1]] = jnp.asarray(g.T)
    peft_model = peft.get_peft_model(net, config)
    adapters, residual = lorajax.inits.lora_ga(spec, variables16, grads)
    bf16_tol = 2.0 ** -7  # one bf16 rounding step, relative
    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        ours = get_leaf_dict(adapters, t.keys)
        a_peft, b_peft = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        assert a_peft.dtype == torch.float32 and ours["lora_A"].dtype == jnp.float32
        assert_close(ours["lora_A"], to_np(a_peft).T, tol=bf16_tol, what=f"A {t.name}")
        assert_close(ours["lora_B"], to_np(b_peft).T, tol=bf16_tol, what=f"B {t.name}")
        w_res = get_leaf_dict(residual, t.keys)
        assert w_res.dtype == jnp.bfloat16
        assert_close(np.asarray(w_res.astype(jnp.float32)), to_np(mod.get_base_layer().weight.float()).T,
                     tol=bf16_tol, what=f"W_res {t.name}")
