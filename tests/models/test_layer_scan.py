"""`lorajax.layer_scan` through the Llama model: a scanned stack equals the unrolled one, outputs and adapter
gradients, for plain, shared-state and sampling variants; unlike layers and adapter statistics raise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.models import llama

CFG = llama.Config(
    vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, CFG.vocab_size)
    params = llama.LlamaForCausalLM(CFG).init(jax.random.key(1), ids)["params"]
    return params, ids


def _loss_and_grads(spec, params, adapters, ids, *, scan, remat=False, mode="factored", rng=None):
    model = llama.LlamaForCausalLM(CFG, scan_layers=scan, remat=remat)
    fwd = lorajax.adapt(model.apply, spec, mode=mode)

    def loss(a):
        logits = fwd({"params": params}, a, ids, adapter_rng=rng, adapter_train=rng is not None)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)

    return jax.jit(jax.value_and_grad(loss))(adapters)


def _nonzero(adapters):
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize(
    "variant, remat, mode",
    [("lora", "nothing_saveable", "factored"), ("vera", False, "factored"), ("lora", False, "merged")],
)
def test_scan_equals_unrolled(setup, variant, remat, mode):
    params, ids = setup
    spec = lorajax.Spec(variant, rank=4, targets="all-linear")
    adapters = _nonzero(lorajax.init(spec, params, jax.random.key(2)))
    l0, g0 = _loss_and_grads(spec, params, adapters, ids, scan=False, remat=remat, mode=mode)
    l1, g1 = _loss_and_grads(spec, params, adapters, ids, scan=True, remat=remat, mode=mode)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        # atol: float32 reassociation at gradients of size ~4 (a scanned and an unrolled program fuse differently)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=5e-6, err_msg=jax.tree_util.keystr(path))
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g0))


def test_scan_uses_each_layers_own_key(setup):
    """A sampling variant (DyLoRA's rank, drawn per target) sees the same per-layer keys scanned or not."""
    params, ids = setup
    spec = lorajax.Spec("dylora", rank=4, targets=["q_proj", "v_proj"])
    adapters = _nonzero(lorajax.init(spec, params, jax.random.key(2)))
    rng = jax.random.key(5)
    l0, g0 = _loss_and_grads(spec, params, adapters, ids, scan=False, rng=rng)
    l1, g1 = _loss_and_grads(spec, params, adapters, ids, scan=True, rng=rng)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6), g0, g1)


def test_scan_compiles_one_layer(setup):
    """The scanned step's HLO holds one copy of the layer's matmuls (in a while loop), not one per layer."""
    params, ids = setup
    spec = lorajax.Spec("lora", rank=4, targets="all-linear")
    adapters = lorajax.init(spec, params, jax.random.key(2))

    def hlo(scan):
        fwd = lorajax.adapt(llama.LlamaForCausalLM(CFG, scan_layers=scan).apply, spec)
        return jax.jit(fwd).lower({"params": params}, adapters, ids).as_text()

    unrolled, scanned = hlo(False), hlo(True)
    assert "while" in scanned and "while" not in unrolled
    assert scanned.count("dot_general") < unrolled.count("dot_general") / 2


def test_scanned_lora_step_forms_no_weight_gradient(setup):
    """The scanned, rematerialised LoRA step differentiates the adapters only: no dot of a kernel's shape that
    contracts over the tokens in the compiled HLO (the conformance suite's check, `lorajax.hlo`)."""
    from lorajax import hlo

    params, ids = setup
    spec = lorajax.Spec("lora", rank=4, targets="all-linear")
    adapters = lorajax.init(spec, params, jax.random.key(2))
    fwd = lorajax.adapt(llama.LlamaForCausalLM(CFG, scan_layers=True, remat=True).apply, spec)

    def loss(a):
        return jnp.mean(fwd({"params": params}, a, ids) ** 2)

    text = jax.jit(jax.grad(loss)).lower(adapters).compile().as_text()
    shapes = [tuple(x.shape) for x in jax.tree.leaves(params["model"]["layers"]) if x.ndim == 2]
    assert hlo.count_weight_gradients(text, shapes, ids.size)[0] == 0


def test_scan_refuses_unlike_layers_and_statistics(setup):
    params, ids = setup
    model = llama.LlamaForCausalLM(CFG, scan_layers=True)
    partial = lorajax.Spec("lora", rank=2, targets=["q_proj"], layers_to_transform=[0, 1])
    fwd = lorajax.adapt(model.apply, partial)
    with pytest.raises(ValueError, match="not in all 3"):
        fwd({"params": params}, lorajax.init(partial, params, 0), ids)
    ranks = lorajax.Spec("lora", rank=2, targets=["q_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 4})
    with pytest.raises(ValueError, match="unlike"):
        lorajax.adapt(model.apply, ranks)({"params": params}, lorajax.init(ranks, params, 0), ids)
    spec = lorajax.Spec("flylora", rank=4, targets=["q_proj"], top_k=2)
    fwd = lorajax.adapt(model.apply, spec, aux=True)
    with pytest.raises(ValueError, match="not collected inside a scan"):
        fwd({"params": params}, lorajax.init(spec, params, 0), ids)
    plain = lorajax.Spec("lora", rank=2, targets=["q_proj"])  # no statistics to collect: aux is {}
    _, aux = lorajax.adapt(model.apply, plain, aux=True)({"params": params}, lorajax.init(plain, params, 0), ids)
    assert aux == {}


def test_scan_refuses_mixed_windows():
    cfg = llama.Config(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, layer_types=("sliding_attention", "full_attention"),
    )  # fmt: skip
    ids = jnp.zeros((1, 6), jnp.int32)
    model = llama.LlamaForCausalLM(cfg, scan_layers=True)
    params = model.init(jax.random.key(0), ids)["params"]
    with pytest.raises(ValueError, match="mixes attention windows"):
        model.apply({"params": params}, ids)
