"""SHiRA against Hugging Face PEFT's ``ShiraConfig`` (random mask).

PEFT draws its masks with a torch generator that JAX cannot reproduce, so the
test imports ``shira_indices: [2, K]`` (row 0 = output index, row 1 = input
index of the torch ``[out, in]`` weight) from PEFT's state dict and swaps the
two rows into lorajax's ``[in, out]`` coordinates — nothing is redrawn and
the value vector ``shira_weight`` is copied unchanged. Compared: outputs in
both modes, per-layer deltas (``get_delta_weight``), merged weights
(``merge_and_unload``) and the gradient of ``shira_weight`` for one loss.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lorajax  # noqa: E402

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

MODES = ("merged", "factored")
ALL = ["q_proj", "v_proj", "o_proj"]


def build(r=4, targets=ALL, randomize=True, seed=None):
    net = make_torch_net(0)
    variables = flax_variables(net)
    config = peft.ShiraConfig(r=r, target_modules=targets, random_seed=seed)
    peft_model = peft.get_peft_model(net, config).eval()
    if randomize:
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name in peft_adapted_names(peft_model):
                p = peft_module(peft_model, name).shira_weight["default"]
                p.copy_(torch.randn(p.shape, generator=gen))
    spec = lorajax.Spec("shira", rank=r, targets=targets)
    assert lorajax_names(spec, variables) == peft_adapted_names(peft_model)
    return peft_model, variables, spec


def import_shira(spec, variables, peft_model):
    adapters = lorajax.init(spec, variables, jax.random.key(0))
    state = peft.get_peft_model_state_dict(peft_model)
    for t in lorajax.select(spec, variables):
        idx = to_np(state[f"base_model.model.{t.name}.shira_indices"])  # [2, K]: (out, in)
        adapters = set_adapter(adapters, t.keys, {
            "shira_indices": idx[::-1].copy(),  # -> (in, out) for the Flax [in, out] kernel
            "shira_weight": to_np(state[f"base_model.model.{t.name}.shira_weight"]),
        })
    return adapters


def test_shira_layout_matches_peft():
    """Same K = r(in+out), dtype, zero init; PEFT's indices are row-major over [out, in], as ours."""
    peft_model, variables, spec = build(randomize=False)
    ours = lorajax.init(spec, variables, jax.random.key(0))
    state = peft.get_peft_model_state_dict(peft_model)
    for t in lorajax.select(spec, variables):
        d_in, d_out = t.matrix_shape
        theirs = to_np(state[f"base_model.model.{t.name}.shira_indices"])
        mine = np.asarray(get_leaf_dict(ours, t.keys)["shira_indices"])
        assert theirs.shape == mine.shape == (2, 4 * (d_in + d_out)) and mine.dtype == np.int32
        for rows_cols in (theirs, mine[::-1]):  # both as (out, in)
            assert np.all(np.diff(rows_cols[0] * d_in + rows_cols[1]) > 0)
        np.testing.assert_array_equal(get_leaf_dict(ours, t.keys)["shira_weight"], 0.0)
    x = inputs(0)
    for mode in MODES:
        assert_close(lorajax.adapt(FlaxNet().apply, spec, mode)(variables, ours, jnp.asarray(x)),
                     torch_out(peft_model, x), what=mode)


@pytest.mark.parametrize("r,targets,seed", [(4, ALL, None), (2, ["v_proj", "o_proj"], 7)],
                         ids=["qvo-r4", "vo-r2-seeded"])
def test_shira_forward_delta_and_merge(r, targets, seed):
    peft_model, variables, spec = build(r, targets, seed=seed)
    adapters = import_shira(spec, variables, peft_model)
    model = FlaxNet()
    x = inputs(1)
    want = torch_out(peft_model, x)
    assert np.abs(want - np.asarray(model.apply(variables, x))).max() > 1e-2
    for mode in MODES:
        assert_close(lorajax.adapt(model.apply, spec, mode=mode)(variables, adapters, jnp.asarray(x)), want,
                     what=mode)
    merged = lorajax.merge(spec, variables, adapters)
    for t in lorajax.select(spec, variables):
        delta = get_leaf_dict(merged, t.keys[:-1])["kernel"] - get_leaf_dict(variables, t.keys[:-1])["kernel"]
        theirs = peft_module(peft_model, t.name).get_delta_weight("default").to_dense()
        assert_close(delta, to_np(theirs).T, what=t.name)
    assert_weights_match(merged, peft_model.merge_and_unload())


def test_shira_gradients():
    peft_model, variables, spec = build()
    adapters = import_shira(spec, variables, peft_model)
    x = inputs(3)
    g = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    peft_model.zero_grad()
    (peft_model(torch.from_numpy(x)) * torch.from_numpy(g)).sum().backward()
    trainable, frozen = lorajax.partition(spec, adapters)
    model = FlaxNet()
    for mode, sp in [("merged", spec), ("factored", spec), ("factored-dense", spec.replace(backward="dense"))]:
        fwd = lorajax.adapt(model.apply, sp, mode=mode.split("-")[0])
        grads = jax.grad(
            lambda tr: jnp.sum(fwd(variables, lorajax.combine(tr, frozen), jnp.asarray(x)) * g)
        )(trainable)
        for t in lorajax.select(spec, variables):
            gt = get_leaf_dict(grads, t.keys)
            assert gt["shira_indices"] is None  # the integer buffer is never differentiated
            theirs = to_np(peft_module(peft_model, t.name).shira_weight["default"].grad)
            assert_close(gt["shira_weight"], theirs, what=f"{mode} {t.name}")
