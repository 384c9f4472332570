"""The parameter-count part of experiments/bench_variants.py on a tiny config: lorajax's count == the formula."""

import pytest

import lorajax
from experiments import bench_variants as bv
from lorajax.models import llama

TINY = llama.Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize("variant, kwargs", [("randlora", dict(rank=4)), ("hydra", dict(rank=2, seq_rank=3))])
def test_count_matches_formula(variant, kwargs):
    spec = lorajax.Spec(variant, targets=bv.TARGETS, **kwargs)
    got, want = bv.param_counts(spec, TINY)
    assert got == want > 0
