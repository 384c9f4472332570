"""metrics.jsonl survives: a torn line (crash or full disk mid-write) is dropped with one warning on resume, and
every line is strict JSON (a non-finite value is written as null)."""

import json
import math

import jax.numpy as jnp
import pytest
from _tiny_fit import fit as _fit
from _tiny_fit import state_bytes as _bytes
from _tiny_fit import strict_lines as _strict_lines


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
