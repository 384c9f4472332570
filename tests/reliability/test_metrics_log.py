"""metrics.jsonl survives: a torn line (crash or full disk mid-write) is dropped with one warning on resume, and
every line is strict JSON (a non-finite value is written as null)."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax

PARAMS = {"dense": {"kernel": jnp.arange(12.0).reshape(4, 3) / 10}}
SPEC = lorajax.Spec("lora", rank=2, targets=["dense"], init_weights=False)
TX = optax.adam(1e-2)


def _loss(params, adapters, x):
    return jnp.mean((x @ lorajax.merge(SPEC, params, adapters)["dense"]["kernel"] - 1.0) ** 2)


def _batch(step):
    return jnp.asarray(np.random.default_rng([3, step]).normal(size=(2, 4)), jnp.float32)


def _fit(out, steps, **kw):
    state = lorajax.train.TrainState.create(TX, *lorajax.partition(SPEC, lorajax.init(SPEC, PARAMS, 0)))
    kw = {"ckpt_every": 2, "keep": 2, "log_every": 2, **kw}
    return lorajax.train.fit(_loss, TX, PARAMS, state, _batch, steps, out_dir=str(out), progress=False, **kw)


def _bytes(state):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(state)]


def _no_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def _strict_lines(path):
    return [json.loads(line, parse_constant=_no_constant) for line in Path(path).read_text().splitlines()]


def test_torn_last_line_is_dropped_and_resume_matches(tmp_path):
    ref, _ = _fit(tmp_path / "ref", 6)
    got = tmp_path / "got"
    _fit(got, 4)  # checkpoints 2 and 4, lines 2 and 4
    with (got / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 6, "lo')  # killed while writing the next line
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: dropped line 3 of 3, not valid JSON \(torn") as rec:
        final, _ = _fit(got, 6)
    assert len([w for w in rec if "metrics.jsonl" in str(w.message)]) == 1
    assert _bytes(final) == _bytes(ref)
    assert (got / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert [r["step"] for r in _strict_lines(got / "metrics.jsonl")] == [2, 4, 6]
    assert not [p.name for p in got.iterdir() if ".tmp-" in p.name]  # the rewrite left no temporary


def test_torn_middle_line_and_old_nan_line(tmp_path):
    _fit(tmp_path, 4)
    path = tmp_path / "metrics.jsonl"
    good = path.read_text().splitlines()
    old_nan = json.dumps({**json.loads(good[0]), "eval/x": float("nan")})  # what an older writer produced
    assert "NaN" in old_nan
    path.write_text(f"{old_nan}\n\x00\x00{{\"ste\n{good[1]}\n")
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: dropped line 2 of 3"):
        _, history = _fit(tmp_path, 4)  # resumes at its last checkpoint (4): nothing to train
    assert history == []
    assert _strict_lines(path) == [{**json.loads(good[0]), "eval/x": None}, json.loads(good[1])]


def test_nonfinite_values_are_written_as_null(tmp_path):
    def eval_fn(state):
        return {"nan": float("nan"), "inf": jnp.inf, "acc": 0.5}

    _, history = _fit(tmp_path, 2, eval_fn=eval_fn)
    (line,) = _strict_lines(tmp_path / "metrics.jsonl")
    assert line["eval/nan"] is None and line["eval/inf"] is None and line["eval/acc"] == 0.5
    assert math.isfinite(line["loss"]) and line["step"] == 2
    assert math.isnan(history[-1]["eval/nan"]) and history[-1]["eval/inf"] == math.inf  # history keeps the floats
