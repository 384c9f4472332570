"""Checkpoints verify and fall back: a corrupted newest checkpoint is skipped (one warning), moved aside, and
the newest valid one restored; none valid -> one CheckpointError naming each; `fit` resumes to the same bytes."""

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_fit import fit
from _tiny_fit import state_bytes as _bytes

from lorajax.train.checkpoint import MANIFEST, Checkpointer, CheckpointError, write_manifest


def _state(step):
    return {"w": jnp.arange(6.0).reshape(2, 3) * step, "count": jnp.asarray(step, jnp.int32)}


LIKE = jax.tree.map(jnp.zeros_like, _state(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder with checkpoints 10 and 20 (keep=2)."""
    d = tmp_path_factory.mktemp("ck") / "checkpoints"
    ck = Checkpointer(d, keep=2)
    for s in (10, 20):
        ck.save(s, _state(s), {"step": s})
    ck.close()
    return d


@pytest.fixture
def ckdir(saved, tmp_path):
    d = tmp_path / "checkpoints"
    shutil.copytree(saved, d)
    return d


def _data_file(step_dir):
    """The tensor data file orbax reads (the merged OCDBT data under state/d/; state/ocdbt.process_0/ is not read)."""
    files = sorted((step_dir / "state" / "d").iterdir())
    assert len(files) == 1, files
    return files[0]


def _flip_bit(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x10
    p.write_bytes(bytes(b))


def _set_manifest_step(step_dir, value):
    m = json.loads((step_dir / MANIFEST).read_text())
    m["step"] = value
    (step_dir / MANIFEST).write_text(json.dumps(m))


CORRUPTIONS = {
    # (corrupt the step folder, a phrase the warning must contain)
    "deleted_data_file": (lambda d: _data_file(d).unlink(), "missing file state/"),
    "truncated_data_file": (lambda d: _data_file(d).write_bytes(_data_file(d).read_bytes()[:7]),
                            "size mismatch in state/"),
    "meta_not_json": (lambda d: (d / "meta" / "metadata").write_text("{not json"), "meta/metadata"),
    "flipped_bit": (lambda d: _flip_bit(_data_file(d)), "checksum mismatch in state/"),
    "deleted_manifest": (lambda d: (d / MANIFEST).unlink(), "no checksum manifest"),
    "manifest_step": (lambda d: _set_manifest_step(d, 10), "manifest is for step 10"),
    # consistent checksums (a bad write before the manifest): the later checks catch them
    "meta_step": (lambda d: ((d / "meta" / "metadata").write_text('{"step": 10}'), write_manifest(d, 20)),
                  "metadata says step 10"),
    "orbax_raises_on_meta": (lambda d: ((d / "meta" / "metadata").write_text("{not json"), write_manifest(d, 20)),
                             "orbax restore failed"),
    "orbax_raises_on_data": (lambda d: (_data_file(d).write_bytes(b"\0" * 5), write_manifest(d, 20)),
                             "orbax restore failed"),
}


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_newest_falls_back_to_older(ckdir, how):
    corrupt, phrase = CORRUPTIONS[how]
    corrupt(ckdir / "20")
    ck = Checkpointer(ckdir, keep=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, meta = ck.restore(LIKE)
    msgs = [str(w.message) for w in caught if "checkpoint" in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert msgs[0].startswith(f"checkpoint 20 in {ckdir} is invalid") and "restoring 10" in msgs[0], msgs[0]
    assert phrase in msgs[0], msgs[0]
    assert meta == {"step": 10} and int(state["count"]) == 10
    np.testing.assert_array_equal(state["w"], _state(10)["w"])
    # the bad one is moved aside (nothing deleted) and no longer listed
    assert (ckdir / "invalid-20-0").is_dir() and not (ckdir / "20").exists()
    assert ck.all_steps() == [10] and ck.latest_step() == 10
    ck.close()


def test_latest_step_skips_invalid_without_moving(ckdir):
    _flip_bit(_data_file(ckdir / "20"))
    ck = Checkpointer(ckdir, keep=2)
    assert ck.latest_step() == 10 and ck.all_steps() == [10, 20]
    with pytest.raises(CheckpointError, match=r"20 \(checksum mismatch in state/"):
        ck.restore(LIKE, step=20)  # an explicit step: no fallback
    assert (ckdir / "20").is_dir()


def test_no_valid_checkpoint_names_each(ckdir):
    (ckdir / "20" / MANIFEST).unlink()
    _data_file(ckdir / "10").unlink()
    ck = Checkpointer(ckdir, keep=2)
    with pytest.raises(CheckpointError) as e:
        ck.restore(LIKE)
    msg = str(e.value)
    assert "\n" not in msg and str(ckdir) in msg
    assert "20 (no checksum manifest" in msg and "10 (missing file state/" in msg, msg
    assert sorted(p.name for p in ckdir.iterdir()) == ["10", "20"]  # nothing moved


def test_good_checkpoint_survives_rotation_after_fallback(ckdir):
    _flip_bit(_data_file(ckdir / "20"))
    ck = Checkpointer(ckdir, keep=2)
    with pytest.warns(UserWarning, match="checkpoint 20"):
        ck.restore(LIKE)
    ck.save(15, _state(15), {"step": 15})  # keep=2: 10 and 15 stay (the invalid 20 does not count)
    assert ck.all_steps() == [10, 15] and ck.latest_step() == 15
    assert (ckdir / "invalid-20-0").is_dir()
    state, meta = ck.restore(LIKE)
    assert meta["step"] == 15 and int(state["count"]) == 15
    ck.close()


# --- fit resumes from the older checkpoint to the same bytes as an uninterrupted run ---

def _fit(out, steps):
    return fit(out, steps)[0]


def test_fit_resumes_from_older_checkpoint_bitwise(tmp_path):
    ref = _fit(tmp_path / "ref", 6)
    got = tmp_path / "got"
    _fit(got, 4)  # checkpoints 2 and 4, then "crash"
    _flip_bit(_data_file(got / "checkpoints" / "4"))
    with pytest.warns(UserWarning, match=r"checkpoint 4 in .* is invalid \(checksum mismatch.*restoring 2"):
        final = _fit(got, 6)
    assert _bytes(final) == _bytes(ref)
    assert (got / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert (got / "checkpoints" / "invalid-4-0").is_dir()
    assert Checkpointer(got / "checkpoints").all_steps() == [4, 6]
