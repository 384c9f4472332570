"""lorajax.sharding over quantised bases: a `QuantizedArray`'s codes and scales are placed like the weight they
encode, and adapters under a quantised weight follow its logical ``[in, out]`` shape.

One CPU device: a ``1 x 1`` mesh gives the specs the rules imply (every axis divides); the divisibility
fallbacks are checked on the pure spec function with fake axis sizes.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import lorajax
from lorajax import quant, sharding
from lorajax.models import llama

FT = ("fsdp", "tensor")
SIZES = {"fsdp": 4, "tensor": 2}


def entries(kind, field, weight_entries, weight_shape, leaf_shape, sizes=SIZES):
    return sharding._quantized_entries(kind, field, weight_entries, weight_shape, leaf_shape, sizes)


def test_quantized_entries_follow_the_weight():
    # int8: codes have the kernel's shape and spec; scales its output axes (N-D: the trailing entries)
    assert entries("int8", "codes", FT, (64, 32), (64, 32)) == FT
    assert entries("int8", "scales", FT, (64, 32), (32,)) == ("tensor",)
    assert entries("int8", "scales", ("fsdp", None, "tensor"), (16, 4, 8), (4, 8)) == (None, "tensor")
    # int4 [G·g/2, out] / [G, out]: the weight's input entry on axis 0 when it divides, its output entry last
    assert entries("int4", "codes", FT, (64, 32), (32, 32)) == FT
    assert entries("int4", "scales", FT, (64, 32), (1, 32)) == (None, "tensor")  # one group: 1 % 4
    assert entries("int4", "codes", FT, (12, 32), (6, 32)) == (None, "tensor")  # 6 % 4
    assert entries("int4", "codes", FT, (64, 6), (32, 6), {"fsdp": 4, "tensor": 4}) == ("fsdp", None)
    # nf4: flat arrays over every mesh axis the weight's spec names (in its order), when the product divides
    assert entries("nf4", "codes", FT, (64, 32), (1024,)) == (FT,)
    assert entries("nf4", "codes", ("tensor", "fsdp"), (32, 64), (1024,)) == (("tensor", "fsdp"),)
    assert entries("nf4", "codes", ("tensor", None), (32, 64), (1024,)) == ("tensor",)
    assert entries("nf4", "scales", FT, (64, 32), (32,)) == (FT,)
    assert entries("nf4", "scales", FT, (60, 10), (10,)) == (None,)  # 10 % 8
    assert entries("nf4", "codes", (None, None), (64, 32), (1024,)) == (None,)
    # second-level constants and the offset: replicated
    assert entries("nf4", "scales2", FT, (64, 32), (1,)) == (None,)
    assert entries("nf4", "offset", FT, (64, 32), ()) == ()


CFG = llama.Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    """The tiny Llama's params as shapes (``jax.eval_shape``: traced, not run) and a 1 x 1 mesh."""
    model = llama.build(CFG)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *llama.example_inputs(CFG))["params"])
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), FT)
    return params, mesh


@pytest.mark.parametrize("kind", ["nf4", "int8", "int4"])
def test_quantized_llama_placed_like_its_weights(setup, kind):
    params, mesh = setup
    qparams = jax.eval_shape(lambda p: quant.quantize(p, None, kind), params)  # all-linear: lm_head stays float
    assert sharding.default_rules(qparams) == sharding.LLAMA_RULES
    got = sharding.shardings(qparams, mesh)  # the default (Llama) rules
    layer = got["model"]["layers"]["0"]
    q, o = layer["self_attn"]["q_proj"]["kernel"], layer["mlp"]["down_proj"]["kernel"]
    assert quant.is_quantized(q) and q.kind == kind  # the same node, a NamedSharding per array
    col, row = P("fsdp", "tensor"), P("tensor", "fsdp")  # the rules of q_proj and down_proj
    want = {
        "nf4": {"codes": (P(FT), P(("tensor", "fsdp"))), "scales": (P(FT), P(("tensor", "fsdp")))},
        "int8": {"codes": (col, row), "scales": (P("tensor"), P("fsdp"))},
        "int4": {"codes": (col, row), "scales": (col, row)},
    }[kind]
    for field, (w_q, w_o) in want.items():
        assert getattr(q, field).spec == w_q, (field, getattr(q, field).spec)
        assert getattr(o, field).spec == w_o, (field, getattr(o, field).spec)
    if kind == "nf4":
        assert q.scales2.spec == P(None) and q.offset.spec == P()
    assert got["lm_head"]["kernel"].spec == col  # a float leaf: its rule as before
    # adapters under quantised weights follow the logical [in, out] kernel, as under the float weights
    spec = lorajax.Spec("lora", rank=4, targets="all-linear")
    adapters = jax.eval_shape(lambda p: lorajax.init(spec, p, jax.random.key(1)), qparams)
    on_q = sharding.shardings(adapters, mesh, like=qparams)
    on_f = sharding.shardings(adapters, mesh, like=params)
    assert jax.tree.map(lambda s: s.spec, on_q) == jax.tree.map(lambda s: s.spec, on_f)
    a = on_q["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]
    assert a["lora_A"].spec == P("tensor", None) and a["lora_B"].spec == P(None, "fsdp")


def test_shard_places_quantized_arrays_and_keeps_the_node(setup):
    _, mesh = setup
    w = jax.random.normal(jax.random.key(0), (32, 16))
    qparams = jax.jit(lambda w: quant.quantize({"q_proj": {"kernel": w}, "x": {"kernel": w}}, ".*", "nf4"))(w)
    rules = [(r"q_proj\.kernel", P("fsdp", "tensor"))]
    placed = sharding.shard(qparams, mesh, rules)
    leaf, other = placed["q_proj"]["kernel"], placed["x"]["kernel"]
    assert quant.is_quantized(leaf) and leaf.codes.sharding.spec == P(FT) and leaf.offset.sharding.spec == P()
    assert other.codes.sharding.spec == P(None)  # no rule: replicated
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(qparams)):  # the same values, only placed
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a rule is checked against the kernel's logical shape (2 axes), not its flat codes
    with pytest.raises(ValueError, match=r"more entries than the array has axes \(2\)"):
        sharding.shardings(qparams, mesh, [(r"q_proj\.kernel", P("fsdp", "tensor", None))])
