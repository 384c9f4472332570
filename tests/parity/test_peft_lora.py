"""LoRA / rsLoRA and target selection against Hugging Face PEFT's ``LoraConfig``.

Each test builds the same tiny network in torch (wrapped by ``peft.get_peft_model``)
and in linen, copies PEFT's adapter values into a ``lorajax.init`` tree
(transposed), and compares: the set of adapted modules, rank and scaling per
module, outputs in ``merged`` and ``factored`` modes, merged weights against
``merge_and_unload``, and (for plain LoRA) gradients w.r.t. A and B.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lorajax  # noqa: E402
from lorajax.variants.lora import scaling  # noqa: E402

from _torch_models import (  # noqa: E402
    D_MODEL,
    FlaxNet,
    assert_close,
    assert_weights_match,
    flax_name,
    flax_variables,
    get_leaf_dict,
    import_lora,
    inputs,
    lorajax_names,
    make_torch_net,
    peft_adapted_names,
    peft_module,
    plain_forward,
    to_np,
    torch_name,
    torch_out,
)

MODES = ("merged", "factored")


def build(seed=0, style="dot", **config):
    """(peft_model, linen variables of the same base weights, linen model)."""
    net = make_torch_net(seed)
    variables = flax_variables(net, style)
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    peft_model = peft.get_peft_model(net, peft.LoraConfig(**config)).eval()
    return peft_model, variables, FlaxNet(style=style)


def check_lora(peft_model, spec, variables, model, style="dot"):
    """Same targets, ranks, scalings, outputs (both modes) and merged weights as PEFT."""
    assert lorajax_names(spec, variables) == peft_adapted_names(peft_model)
    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        assert t.rank == mod.r["default"], t.name
        assert scaling(t) == pytest.approx(mod.scaling["default"], rel=1e-12), t.name
    adapters = import_lora(spec, variables, peft_model)

    x = inputs(1)
    want = torch_out(peft_model, x)
    assert np.abs(want - np.asarray(model.apply(variables, x))).max() > 1e-2, "adapters change nothing"
    for mode in MODES:
        got = lorajax.adapt(model.apply, spec, mode=mode)(variables, adapters, jnp.asarray(x))
        assert_close(got, want, what=mode)

    merged = lorajax.merge(spec, variables, adapters)
    assert_close(model.apply(merged, x), want, what="apply(merge)")
    unmerged = lorajax.unmerge(spec, merged, adapters)
    for a, b in zip(jax.tree_util.tree_leaves(unmerged), jax.tree_util.tree_leaves(variables), strict=True):
        assert_close(a, b, what="unmerge(merge)")
    torch_merged = peft_model.merge_and_unload()
    assert_weights_match(merged, torch_merged, style)
    assert_close(torch_out(torch_merged, x), want, what="torch merge_and_unload forward")
    return adapters


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_forward_and_merge(use_rslora):
    peft_model, variables, model = build(target_modules=["q_proj", "v_proj"], use_rslora=use_rslora)
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=["q_proj", "v_proj"],
                        use_rslora=use_rslora, init_weights=False)
    # B really is non-zero, so the test is not vacuous
    assert float(np.abs(to_np(peft_module(peft_model, "model.layers.0.q_proj").lora_B["default"].weight)).min()) > 0

    # a bare params dict (no "params" collection) and a plain-function forward, merged mode
    x = inputs(2)
    bare = variables["params"]
    bare_adapters = import_lora(spec, bare, peft_model)
    got = lorajax.adapt(plain_forward, spec, mode="merged")(bare, bare_adapters, jnp.asarray(x))
    assert_close(got, torch_out(peft_model, x), what="plain forward, bare params")

    check_lora(peft_model, spec, variables, model)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_gradients(use_rslora):
    targets = ["q_proj", "v_proj", "o_proj"]
    peft_model, variables, model = build(target_modules=targets, use_rslora=use_rslora, lora_alpha=6)
    spec = lorajax.Spec("lora", rank=4, alpha=6, targets=targets, use_rslora=use_rslora, init_weights=False)
    adapters = import_lora(spec, variables, peft_model)
    x = inputs(3)
    g = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)

    peft_model.zero_grad()
    out = peft_model(torch.from_numpy(x))
    (out * torch.from_numpy(g)).sum().backward()

    for mode in MODES:
        fwd = lorajax.adapt(model.apply, spec, mode=mode)
        grads = jax.grad(lambda a: jnp.sum(fwd(variables, a, jnp.asarray(x)) * g))(adapters)
        for t in lorajax.select(spec, variables):
            mod = peft_module(peft_model, t.name)
            gt = get_leaf_dict(grads, t.keys)
            assert_close(gt["lora_A"], to_np(mod.lora_A["default"].weight.grad).T, what=f"{mode} dA {t.name}")
            assert_close(gt["lora_B"], to_np(mod.lora_B["default"].weight.grad).T, what=f"{mode} dB {t.name}")
    # the frozen base gets no gradient in PEFT
    assert peft_module(peft_model, "model.layers.0.q_proj").base_layer.weight.grad is None


def test_lora_default_init_distribution():
    """Default init (init_lora_weights=True): B = 0 and A ~ U(±1/sqrt(in)) on both sides."""
    peft_model, variables, _ = build(target_modules=["q_proj", "o_proj"], init_lora_weights=True)
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=["q_proj", "o_proj"])
    ours = lorajax.init(spec, variables, jax.random.key(3))
    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        a_peft, b_peft = to_np(mod.lora_A["default"].weight), to_np(mod.lora_B["default"].weight)
        a_ours, b_ours = (np.asarray(v) for v in (get_leaf_dict(ours, t.keys)[k] for k in ("lora_A", "lora_B")))
        assert a_ours.shape == a_peft.T.shape and b_ours.shape == b_peft.T.shape
        assert not b_peft.any() and not b_ours.any()
        bound = 1.0 / np.sqrt(t.matrix_shape[0])
        for a in (a_peft, a_ours):
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
    x = inputs(5)
    out = lorajax.adapt(FlaxNet().apply, spec, "factored")(variables, ours, jnp.asarray(x))
    assert_close(out, torch_out(peft_model, x))


def test_lora_rank_and_alpha_pattern():
    kw = dict(rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.q_proj": 3})
    peft_model, variables, model = build(target_modules=["q_proj", "v_proj", "o_proj"], **kw)
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=["q_proj", "v_proj", "o_proj"], init_weights=False, **kw)
    ranks = {torch_name(t.name): t.rank for t in lorajax.select(spec, variables)}
    assert ranks["model.layers.0.v_proj"] == 2 and ranks["model.layers.1.o_proj"] == 4
    check_lora(peft_model, spec, variables, model)


def test_lora_pattern_first_key_in_dict_order_wins():
    # both keys match model.layers.1.q_proj; PEFT takes the first in dict order ("q_proj")
    kw = dict(rank_pattern={"q_proj": 2, "layers.1.q_proj": 3}, alpha_pattern={"q_proj": 5, "layers.1.q_proj": 7})
    peft_model, variables, model = build(target_modules=["q_proj", "v_proj"], **kw)
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=["q_proj", "v_proj"], init_weights=False, **kw)
    check_lora(peft_model, spec, variables, model)


@pytest.mark.parametrize("style", ["dot", "underscore"])
@pytest.mark.parametrize("layers_pattern", [None, "layers"])
def test_lora_layers_to_transform(style, layers_pattern):
    """PEFT reads the index from ``model.layers.1.``; linen's ``model.layers_1.`` must give the same."""
    targets = ["q_proj", "v_proj", "o_proj"]
    peft_model, variables, model = build(style=style, target_modules=targets, layers_to_transform=[1],
                                         layers_pattern=layers_pattern)
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=targets, layers_to_transform=[1],
                        layers_pattern=layers_pattern, init_weights=False)
    assert peft_adapted_names(peft_model) == [f"model.layers.1.{n}" for n in ("o_proj", "q_proj", "v_proj")]
    assert {t.name for t in lorajax.select(spec, variables)} == {
        flax_name(f"model.layers.1.{n}", style) for n in targets
    }
    check_lora(peft_model, spec, variables, model, style)


@pytest.mark.parametrize("layers_pattern", [None, "layers"])
def test_lora_layers_to_transform_top_level_names(layers_pattern):
    """Names ``layers.1.q_proj`` (no prefix): without layers_pattern PEFT finds no index (it needs two
    components before it) and selects nothing; with layers_pattern="layers" both select layer 1."""
    net = make_torch_net(0).model  # module names "layers.0.q_proj", ...
    variables = flax_variables(net)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                             layers_pattern=layers_pattern, init_lora_weights=False)
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=["q_proj", "v_proj"], layers_to_transform=[1],
                        layers_pattern=layers_pattern, init_weights=False)
    if layers_pattern is None:
        with pytest.raises(ValueError):
            peft.get_peft_model(net, config)
        with pytest.raises(ValueError, match="selects no weight"):
            lorajax.select(spec, variables)
        return
    peft_model = peft.get_peft_model(net, config).eval()
    assert lorajax_names(spec, variables) == peft_adapted_names(peft_model) == ["layers.1.q_proj", "layers.1.v_proj"]
    adapters = import_lora(spec, variables, peft_model)
    assert_weights_match(lorajax.merge(spec, variables, adapters), peft_model.merge_and_unload())


@pytest.mark.parametrize(
    "exclude", [["layers.0.v_proj", "o_proj"], r".*\.1\.(q|o)_proj"], ids=["list", "regex"]
)
def test_lora_exclude_modules(exclude):
    targets = ["q_proj", "v_proj", "o_proj"]
    peft_model, variables, model = build(target_modules=targets, exclude_modules=exclude)
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=targets, exclude=exclude, init_weights=False)
    assert 0 < len(peft_adapted_names(peft_model)) < 6
    check_lora(peft_model, spec, variables, model)


@pytest.mark.parametrize("regex", [r"model\.layers\.\d+\.(q|o)_proj", r".*1\.v_proj", r".*_proj"])
def test_lora_regex_targets(regex):
    peft_model, variables, model = build(target_modules=regex)
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=regex, init_weights=False)
    check_lora(peft_model, spec, variables, model)


def test_lora_suffix_does_not_match_partial_component():
    """``"proj"`` matches nothing in either library (a suffix must follow a dot)."""
    net = make_torch_net(0)
    variables = flax_variables(net)
    with pytest.raises(ValueError):
        peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["proj"]))
    with pytest.raises(ValueError, match="matches no weight"):
        lorajax.select(lorajax.Spec("lora", rank=4, targets=["proj"]), variables)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=D_MODEL, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _shape_params(module) -> dict:
    """A bare params tree with the module's parameter names: kernels (transposed), embeddings, scales."""
    params: dict = {}
    for name, mod in module.named_modules():
        leaf = None
        if isinstance(mod, torch.nn.Linear):
            leaf = ("kernel", tuple(mod.weight.shape[::-1]))
        elif isinstance(mod, torch.nn.Embedding):
            leaf = ("embedding", tuple(mod.weight.shape))
        elif getattr(mod, "weight", None) is not None and mod.weight.ndim == 1:
            leaf = ("scale", tuple(mod.weight.shape))
        if leaf is None:
            continue
        node = params
        for k in name.split("."):
            node = node.setdefault(k, {})
        node[leaf[0]] = jnp.zeros(leaf[1], jnp.float32)
    return params


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("exclude", [None, ["down_proj"]])
def test_lora_all_linear_on_causal_lm(exclude):
    """"all-linear" adapts every Linear but the output head (lm_head), as PEFT on a PreTrainedModel."""
    llama = _tiny_llama()
    params = _shape_params(llama)
    assert "lm_head" in params and "embed_tokens" in params["model"]
    peft_model = peft.get_peft_model(llama, peft.LoraConfig(r=4, target_modules="all-linear",
                                                            exclude_modules=exclude))
    spec = lorajax.Spec("lora", rank=4, targets="all-linear", exclude=exclude)
    names = peft_adapted_names(peft_model)
    assert "lm_head" not in names and len(names) == 2 * (7 - (exclude is not None))
    assert lorajax_names(spec, params) == names
