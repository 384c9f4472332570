"""The synthetic protein grammar: determinism, the exact oracle against brute force, the tokenizer."""

import itertools

import numpy as np
import pytest

from lorajax.data import proteins as P


@pytest.fixture(scope="module")
def grammar():
    return P.make_grammar(seed=0)


def test_sampling_is_deterministic_in_the_seed(grammar):
    cls = np.arange(32) % 4
    a, b, c = P.sample(grammar, cls, seed=1), P.sample(grammar, cls, seed=1), P.sample(grammar, cls, seed=2)
    assert a == b and a != c
    assert P.make_grammar(seed=0).motifs == grammar.motifs and P.make_grammar(seed=1).motifs != grammar.motifs
    np.testing.assert_array_equal(P.make_grammar(seed=0).trans, grammar.trans)
    assert all(len(s) == P.LENGTH and set(s) <= set(P.AMINO_ACIDS) for s in a)
    assert all(grammar.motifs[k] in s for s, k in zip(a, cls))  # each carries its class motif
    np.testing.assert_allclose(grammar.trans.sum(-1), 1.0)


def test_oracle_recovers_the_class_of_true_samples(grammar):
    cls = np.arange(400) % 4
    seqs = P.sample(grammar, cls, seed=3)
    acc = float((P.classify(grammar, seqs) == cls).mean())
    assert acc >= 0.99, acc


def test_oracle_likelihood_equals_brute_force_over_the_hidden_letters():
    """p(x | k) of a length-6 sequence = (1/4) Σ_p [motif at p] Σ_{hidden letters under the motif} P_k(z)."""
    g = P.make_grammar(seed=5, num_classes=2, length=6)
    m = g.motifs[0]
    rng = np.random.default_rng(0)
    x = m + "".join(rng.choice(list(P.AMINO_ACIDS), 3))
    x = x[:3] + m  # the motif at positions 0 and 3: two insertion hypotheses
    ids = np.array([P.AMINO_ACIDS.index(c) for c in x])
    a = len(P.AMINO_ACIDS)
    for k in range(2):
        total = 0.0
        for p in range(6 - 3 + 1):
            if x[p : p + 3] != g.motifs[k]:
                continue
            for hidden in itertools.product(range(a), repeat=3):
                z = ids.copy()
                z[p : p + 3] = hidden
                prob = g.start[k, z[0]] * np.prod([g.trans[k, z[t - 1], z[t]] for t in range(1, 6)])
                total += prob / 4
        full, chain = P.log_likelihoods(g, [x])
        expected = np.log(total) if total > 0 else -np.inf
        np.testing.assert_allclose(full[0, k], expected, rtol=1e-10)
        steps = [g.start[k, ids[0]]] + [g.trans[k, ids[t - 1], ids[t]] for t in range(1, 6)]
        np.testing.assert_allclose(chain[0, k], np.log(steps).sum(), rtol=1e-10)


def test_properties_of_a_generated_string(grammar):
    props = P.properties(grammar, grammar.motifs[2] + "AAX")
    assert props["length"] == 6 and not props["valid"]
    assert props["motifs"].tolist() == [k == 2 or grammar.motifs[k] in grammar.motifs[2] for k in range(4)]
    np.testing.assert_allclose(props["composition"].sum(), 1.0)
    assert props["composition"][P.AMINO_ACIDS.index("A")] == pytest.approx((2 + grammar.motifs[2].count("A")) / 5)


def test_tokenizer_round_trip_and_unknown_tags():
    tok = P.ProteinTokenizer(4)
    ids = tok.encode("<bos> [Gen] P3 Seq=< MPKP >")
    assert tok.decode(ids) == "<bos> [Gen] P3 Seq=< M P K P >"
    np.testing.assert_array_equal(ids, tok.record("MPKP", tag=3))
    np.testing.assert_array_equal(tok.prompt(None), tok.encode("<bos> Seq=<"))
    assert tok.sequence([*tok.encode("MK [Gen] V >"), tok.encode("A")[0]]) == "MKXV"
    assert tok.records(["AC", "DE"], tags=np.array([0, 1])).shape == (2, 4 + 2 + 1)
    with pytest.raises(ValueError, match=r"'P4'.*P0, P1, P2, P3"):
        tok.encode("<bos> [Gen] P4 Seq=< M >")
    with pytest.raises(ValueError, match="P9.*P0, P1, P2, P3"):
        tok.prompt("P9")
    with pytest.raises(ValueError, match=r"\[Make\]"):
        tok.encode("[Make] P0")
    with pytest.raises(ValueError, match="'B'"):
        tok.record("MBK")
