"""Spec validation: bad input raises at construction, naming the bad value."""

import pytest

import lorajax


def test_defaults_follow_peft():
    spec = lorajax.Spec()
    assert (spec.variant, spec.rank, spec.alpha, spec.targets) == ("lora", 8, 8.0, "all-linear")
    assert dict(spec.options) == {"use_rslora": False, "init_weights": True, "dtype": None, "dropout": 0.0}  # lora_dropout=0


def test_hashable_and_equal():
    a = lorajax.Spec("lora", 4, 8, ["q", "v"], rank_pattern={"q": 2})
    b = lorajax.Spec("lora", 4, 8, ["q", "v"], rank_pattern={"q": 2})
    assert a == b and hash(a) == hash(b)
    assert a != a.replace(rank=2)
    assert a.replace(use_rslora=True).options["use_rslora"] is True


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "4"])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        lorajax.Spec("lora", rank=rank)


def test_unknown_variant_names_closest():
    with pytest.raises(ValueError, match=r"Did you mean \['dora'"):
        lorajax.Spec("dorra")


def test_unknown_option_names_closest():
    with pytest.raises(TypeError, match="use_rslora"):
        lorajax.Spec("lora", use_rs_lora=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": float("nan")}, "alpha"),
    ({"targets": []}, "empty"),
    ({"targets": "q_proj("}, "regex"),
    ({"targets": 3}, "targets"),
    ({"rank_pattern": {"q": 0}}, "rank_pattern"),
    ({"alpha_pattern": {"q": "x"}}, "alpha_pattern"),
    ({"layers_to_transform": [-1]}, "layers_to_transform"),
    ({"in_axes": 0}, "in_axes"),
    ({"init_weights": "kaiming"}, "init_weights"),
])
def test_bad_fields(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lorajax.Spec("lora", **kwargs)


def test_list_variants():
    assert {"lora", "dora", "vera"} <= set(lorajax.list_variants())
