"""Non-finite numbers in `fit`: "stop" raises NonFiniteError naming the step before anything non-finite is logged
or checkpointed; "skip" leaves the state as it was on that step and says so in metrics.jsonl."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_fit import PARAMS, TX, fit
from _tiny_fit import batch as _batch
from _tiny_fit import fresh_state as _fresh
from _tiny_fit import loss as _loss
from _tiny_fit import state_bytes as _bytes
from _tiny_fit import strict_lines as _lines

import lorajax
from lorajax.train.checkpoint import Checkpointer

K = 4  # the batch index that is NaN: its step number (as in metrics.jsonl) is K + 1


def _nan_at(k):
    return lambda step: _batch(step) * jnp.nan if step == k else _batch(step)


def _fit(out, steps, batch_fn, **kw):
    return fit(out, steps, batch_fn, **{"keep": 3, **kw})


def test_stop_names_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    with pytest.raises(lorajax.train.NonFiniteError) as e:
        _fit(tmp_path, 8, _nan_at(K))
    err = e.value
    assert isinstance(err, FloatingPointError) and err.step == K + 1 and err.last_checkpoint == 4
    assert str(err).startswith(f"step {K + 1}: the loss or a gradient is not finite"), str(err)
    assert "last checkpoint kept is step 4" in str(err) and "\n" not in str(err)
    ck = Checkpointer(tmp_path / "checkpoints")
    assert ck.all_steps() == [2, 4]  # the check came before the save of step 6
    state, meta = ck.restore(_fresh())
    assert int(state.step) == 4 == meta["step"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    lines = _lines(tmp_path / "metrics.jsonl")  # strict JSON, nothing past the last finite step
    assert [r["step"] for r in lines] == [2, 4] and all(math.isfinite(r["loss"]) for r in lines)


def test_stop_before_any_checkpoint(tmp_path):
    with pytest.raises(lorajax.train.NonFiniteError, match=r"^step 1: .*no checkpoint yet") as e:
        _fit(tmp_path, 4, _nan_at(0), ckpt_every=4)
    assert e.value.last_checkpoint is None
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == []
    assert not (tmp_path / "metrics.jsonl").exists() or _lines(tmp_path / "metrics.jsonl") == []


def test_skip_leaves_the_state_as_before_that_step(tmp_path):
    state, history = _fit(tmp_path, 8, _nan_at(K), on_nonfinite="skip")
    # reference: the plain step on every batch but K; at K only the step count advances
    step = lorajax.train.make_lora_step(_loss, TX)
    ref, losses = _fresh(), {}
    for s in range(8):
        if s == K:
            ref = ref.replace(step=ref.step + 1)
            continue
        ref, m = step(PARAMS, ref, _batch(s))
        losses[s] = float(m["loss"])
    assert int(state.step) == 8
    assert _bytes(state) == _bytes(ref)
    lines = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines] == [2, 4, 6, 8]
    assert lines[2] == {"step": 6, "loss": losses[K + 1], "skipped": 1}  # the mean over the finite steps only
    assert all("skipped" not in r for r in lines[:2] + lines[3:])
    assert history[2]["skipped"] == 1


def test_skip_resumes_with_a_skipped_step_pending(tmp_path):
    """A checkpoint taken between log steps, after a skipped step, resumes to the same log and state."""
    kw = {"on_nonfinite": "skip", "log_every": 3, "ckpt_every": 5}
    ref, _ = _fit(tmp_path / "ref", 8, _nan_at(K), **kw)

    def crash_at_6(step):
        if step == 6:
            raise KeyboardInterrupt  # a preemption after the checkpoint of step 5 (its period holds step K + 1)
        return _nan_at(K)(step)

    got = tmp_path / "got"
    with pytest.raises(KeyboardInterrupt):
        _fit(got, 8, crash_at_6, **kw)
    final, _ = _fit(got, 8, _nan_at(K), **kw)
    assert _bytes(final) == _bytes(ref)
    assert (got / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert _lines(got / "metrics.jsonl")[1]["skipped"] == 1


def test_bad_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of 'stop', 'skip'; got 'ignore'"):
        _fit(tmp_path, 2, _batch, on_nonfinite="ignore")
    assert not (tmp_path / "checkpoints").exists()
