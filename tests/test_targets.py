"""Target selection: PEFT's grammar over Flax paths (linen dicts and NNX State)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import lorajax
from lorajax.targets import layer_index


def _params(n_layers=3):
    def lin(i, o):
        return {"kernel": jnp.zeros((i, o)), "bias": jnp.zeros(o)}

    layers = {f"layers_{i}": {"attn": {"q_proj": lin(8, 8), "k_proj": lin(8, 4), "v_proj": lin(8, 4),
                                       "o_proj": lin(8, 8)},
                              "mlp": {"up_proj": lin(8, 16), "down_proj": lin(16, 8)}}
              for i in range(n_layers)}
    return {"params": {"embed": {"embedding": jnp.zeros((10, 8))}, **layers, "lm_head": lin(8, 10)}}


def names(spec, params=None):
    return [t.name for t in lorajax.select(spec, params or _params())]


def test_suffix_list():
    assert names(lorajax.Spec(targets=["q_proj", "v_proj"], rank=2)) == [
        f"layers_{i}.attn.{m}" for i in range(3) for m in ("q_proj", "v_proj")]


def test_suffix_requires_dot_boundary():
    # "proj" is not a suffix after a dot of any module name
    with pytest.raises(ValueError, match="matches no weight"):
        names(lorajax.Spec(targets=["proj"], rank=2))


def test_regex_fullmatch():
    got = names(lorajax.Spec(targets=r".*\.mlp\.(up|down)_proj", rank=2))
    assert got == [f"layers_{i}.mlp.{m}" for i in range(3) for m in ("down_proj", "up_proj")]


def test_all_linear_excludes_head_and_embedding():
    got = names(lorajax.Spec(targets="all-linear", rank=2))
    assert len(got) == 18 and "lm_head" not in got and not any("embed" in n for n in got)


def test_exclude_and_layers():
    got = names(lorajax.Spec(targets="all-linear", rank=2, exclude=["o_proj", "mlp.up_proj"],
                             layers_to_transform=[0, 2]))
    assert got == [f"layers_{i}.{m}" for i in (0, 2) for m in
                   ("attn.k_proj", "attn.q_proj", "attn.v_proj", "mlp.down_proj")]


def test_layers_pattern_and_index_parsing():
    assert layer_index("model.layers.3.self_attn.q_proj", None) == 3
    assert layer_index("layers_12.attn.q", None) == 12
    assert layer_index("h.2.attn", ("h",)) == 2
    assert layer_index("blocks_1.x", ("h",)) is None
    got = names(lorajax.Spec(targets=["q_proj"], rank=2, layers_to_transform=1, layers_pattern="layers"))
    assert got == ["layers_1.attn.q_proj"]


def test_rank_and_alpha_patterns_peft_rule():
    spec = lorajax.Spec(targets=["q_proj", "v_proj"], rank=4, alpha=8,
                        rank_pattern={"v_proj": 2, r"layers_1\.attn\.q_proj": 3}, alpha_pattern={"q_proj": 1})
    got = {t.name: (t.rank, t.alpha) for t in lorajax.select(spec, _params())}
    assert got["layers_0.attn.v_proj"] == (2, 8.0)
    assert got["layers_1.attn.q_proj"] == (3, 1.0)
    assert got["layers_2.attn.q_proj"] == (4, 1.0)


def test_unknown_target_names_closest():
    with pytest.raises(ValueError, match=r"'q_prj'.*Closest: \['q_proj'"):
        names(lorajax.Spec(targets=["q_prj"], rank=2))


def test_nothing_selected_raises():
    with pytest.raises(ValueError, match="selects no weight"):
        names(lorajax.Spec(targets=["q_proj"], rank=2, layers_to_transform=[7]))


def test_rank_too_large_names_path():
    with pytest.raises(ValueError, match=r"rank 5 .* 'layers_0.attn.k_proj'"):
        names(lorajax.Spec(targets=["k_proj"], rank=5))


def test_bare_params_and_variables_agree():
    v = _params()
    spec = lorajax.Spec(targets=["q_proj"], rank=2)
    assert names(spec, v) == names(spec, v["params"])
    assert lorajax.select(spec, v)[0].keys[0] == "params"


def test_other_collections_are_ignored():
    v = {**_params(), "batch_stats": {"layers_0": {"attn": {"q_proj": {"kernel": jnp.zeros((8, 8))}}}}}
    assert len(names(lorajax.Spec(targets=["q_proj"], rank=2), v)) == 3


def test_nd_kernel_in_axes():
    p = {"attn": {"query": {"kernel": jnp.zeros((8, 2, 4))}, "out": {"kernel": jnp.zeros((2, 4, 8))}}}
    spec = lorajax.Spec(targets=["query", "out"], rank=2, in_axes={"out": 2})
    got = {t.name: t.matrix_shape for t in lorajax.select(spec, p)}
    assert got == {"attn.query": (8, 8), "attn.out": (8, 8)}
    with pytest.raises(ValueError, match="in_axes=3"):
        lorajax.select(lorajax.Spec(targets=["query"], rank=2, in_axes=3), p)


def test_all_linear_skips_nd_kernels():
    p = {"a": {"kernel": jnp.zeros((8, 2, 4))}, "b": {"kernel": jnp.zeros((8, 8))}}
    assert names(lorajax.Spec(rank=2), p) == ["b"]


def test_nnx_state():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = nnx.Linear(8, 8, rngs=rngs)
            self.v_proj = nnx.Linear(8, 4, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([Block(rngs) for _ in range(2)])

    _, state = nnx.split(Model(nnx.Rngs(0)))
    spec = lorajax.Spec(targets=["v_proj"], rank=2, layers_to_transform=[1], layers_pattern="layers")
    assert names(spec, state) == ["layers.1.v_proj"]
    # PEFT's default rule needs two components before the index: "layers.1.v_proj" has none
    assert layer_index("layers.1.v_proj", None) is None
    adapters = lorajax.init(spec, state, jax.random.key(0))
    assert adapters["layers"]["1"]["v_proj"]["kernel"]["lora_A"].shape == (8, 2)
