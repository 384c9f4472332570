"""`Selection`: the weight-picking part of a Spec, shared by adapters, GaLore and the Spec itself."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import lorajax
from lorajax.optim.galore import galore_targets
from lorajax.selection import Selection

PARAMS = {"params": {
    "layers_0": {"q": {"kernel": jnp.ones((6, 4))}, "v": {"kernel": jnp.ones((6, 2))}},
    "layers_1": {"q": {"kernel": jnp.ones((6, 4))}, "v": {"kernel": jnp.ones((6, 2))}},
    "heads": {"kernel": jnp.ones((6, 2, 3))},
}}


def test_spec_holds_a_selection_and_reads_its_fields():
    spec = lorajax.Spec("lora", rank=2, targets=["q", "v"], layers_to_transform=[1])
    assert spec.selection == Selection(["q", "v"], layers_to_transform=1)
    assert (spec.targets, spec.layers_to_transform) == (("q", "v"), (1,))
    by_selection = lorajax.Spec("lora", rank=2, targets=Selection(["q", "v"], layers_to_transform=1))
    assert by_selection == spec and hash(by_selection) == hash(spec)
    names = [t.name for t in lorajax.select(spec, PARAMS)]
    assert names == ["layers_1.q", "layers_1.v"]
    assert spec.replace(rank=1).selection == spec.selection


def test_resolve_gives_weights_with_their_matrix_view():
    weights = Selection("heads", in_axes={"heads": 1}).resolve(PARAMS)
    assert [(w.keys, w.shape, w.in_axes, w.matrix_shape) for w in weights] == [
        (("params", "heads", "kernel"), (6, 2, 3), 1, (6, 6))]


def test_selection_is_checked_when_built():
    with pytest.raises(ValueError, match="targets is empty"):
        Selection([])
    with pytest.raises(ValueError, match="not a valid regex"):
        Selection("(")
    with pytest.raises(ValueError, match="layers_to_transform must be non-negative ints"):
        Selection(["q"], layers_to_transform=[-1])
    with pytest.raises(ValueError, match="in_axes must be an int >= 1"):
        Selection(["q"], in_axes=0)
    with pytest.raises(ValueError, match="given together with a Selection"):
        lorajax.Spec("lora", rank=2, targets=Selection(["q"]), exclude=["v"])


def test_galore_selects_with_the_same_grammar():
    sel = Selection(["q"], layers_to_transform=0)
    got = galore_targets(PARAMS, sel, rank=2)
    assert [w.name for w in got] == ["layers_0.q"]
    spec = lorajax.Spec("lora", rank=4, targets=sel)
    assert [w.name for w in galore_targets(PARAMS, spec, rank=2)] == ["layers_0.q"]


def test_a_selection_can_be_a_partition_rule():
    import jax
    from jax.sharding import PartitionSpec as P

    from lorajax import sharding

    mesh = sharding.make_mesh("fsdp=1", devices=jax.devices()[:1])
    rules = [(Selection(["q"], layers_to_transform=1), P("fsdp", None))]
    got = sharding.shardings(PARAMS, mesh, rules)
    assert got["params"]["layers_1"]["q"]["kernel"].spec == P("fsdp", None)
    assert got["params"]["layers_0"]["q"]["kernel"].spec == P(None, None)  # not selected: replicated
    spec = lorajax.Spec("lora", rank=2, targets=["q"])
    adapters = lorajax.init(spec, PARAMS, 0)
    on_adapters = sharding.shardings(adapters, mesh, rules, like=PARAMS)
    assert on_adapters["params"]["layers_1"]["q"]["kernel"]["lora_A"].spec == P("fsdp", None)  # follows its weight
    with pytest.raises(ValueError, match="match no leaf"):
        sharding.shardings(PARAMS, mesh, [(Selection("nothing.*"), P("fsdp"))])
