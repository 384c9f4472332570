"""Exports are atomic: a kill mid-write leaves the old folder (or none), never a half-written one; user files stay."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy

import lorajax
from lorajax import atomic
from lorajax.models import hub, llama


def _tree(folder):
    """``{relative path: bytes}`` of every file under ``folder`` (links followed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _temporaries(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _dies_mid_write(error, seen):
    """A stand-in for safetensors' ``save_file`` that is killed mid-write: it records the files already in the
    folder, writes 10 bytes of the weights file, then raises ``error``."""

    def save_file(tensors, filename, metadata=None):
        seen.append(sorted(os.listdir(os.path.dirname(filename))))
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise error

    return save_file


def _old_folder_or_none(folder, before):
    """After a killed export: the folder as it was (``before``), or no folder when there was none; no temporaries."""
    if before is not None:
        assert _tree(folder) == before
    else:
        assert not folder.exists()
    assert _temporaries(folder.parent, folder.name) == []


# ----------------------------------------------------------------------------- lorajax.atomic

def test_write_bytes_replaces_and_cleans_stale(tmp_path):
    target = tmp_path / "sub" / "results[1].md"  # glob metacharacters in the name
    atomic.write_text(target, "old")
    stale = tmp_path / "sub" / ".results[1].md.tmp-deadbeef0000"
    stale.write_text("half")
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert _temporaries(target.parent, target.name) == []


def test_directory_exception_keeps_old_folder(tmp_path):
    out = tmp_path / "export"
    with atomic.directory(out) as tmp:
        (tmp / "a.txt").write_text("old a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("old b")
    before = _tree(out)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.directory(out) as tmp:
            (tmp / "a.txt").write_text("new a")
            raise RuntimeError("disk full")
    assert _tree(out) == before == {"a.txt": b"old a", "sub/b.txt": b"old b"}
    assert _temporaries(tmp_path, "export") == []
    out.chmod(0o700)
    with atomic.directory(out) as tmp:  # a complete write replaces the folder whole, keeping its permissions
        (tmp / "c.txt").write_text("c")
    assert _tree(out) == {"c.txt": b"c"} and out.stat().st_mode & 0o777 == 0o700
    assert _temporaries(tmp_path, "export") == []


def test_directory_kill_between_renames_restores_old(tmp_path):
    # what a writer killed between its two renames leaves: the old folder aside, a new one under a temp name
    old = tmp_path / ".export.old-0123456789ab"
    old.mkdir()
    (old / "a.txt").write_text("old a")
    (tmp_path / ".export.tmp-0123456789ab").mkdir()
    (tmp_path / ".export.tmp-0123456789ab" / "a.txt").write_text("new a")
    with pytest.raises(RuntimeError):
        with atomic.directory(tmp_path / "export"):
            raise RuntimeError("killed again")
    assert _tree(tmp_path / "export") == {"a.txt": b"old a"}
    assert _temporaries(tmp_path, "export") == []


def test_directory_symlink_keep_and_file(tmp_path):
    real = tmp_path / "disk" / "model"
    with atomic.directory(real) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
        (tmp / "user.txt").write_bytes(b"mine")
    link = tmp_path / "model"
    link.symlink_to(real, target_is_directory=True)
    with atomic.directory(link, keep=lambda name: name == "user.txt") as tmp:
        (tmp / "w.bin").write_bytes(b"2")
    assert link.is_symlink() and _tree(real) == {"user.txt": b"mine", "w.bin": b"2"}
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="notes.txt"):
        with atomic.directory(a_file):
            pass
    assert a_file.read_text() == "keep me" and _temporaries(tmp_path, "notes.txt") == []


def test_directory_refuses_the_working_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "data.txt").write_text("user data")
    monkeypatch.chdir(work / "sub")
    for target in (".", "..", work):
        with pytest.raises(ValueError, match="holds the working folder"):
            with atomic.directory(target):
                pass
    with atomic.directory("out") as tmp:  # relative names work below it
        (tmp / "x").write_text("x")
    assert _tree(work) == {"data.txt": b"user data", "sub/out/x": b"x"}


# ----------------------------------------------------------------------------- save_pretrained

@pytest.fixture(scope="module")
def tiny():
    cfg = llama.Config(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, architectures=("LlamaForCausalLM",))
    model = llama.build(cfg)
    params = {}  # random weights of the right shapes, without compiling model.init
    rng = np.random.default_rng(0)
    for path, shape in hub.param_shapes(model, llama.example_inputs(cfg)).items():
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    return model, params, jax.tree.map(lambda x: x + 1.0, params)


def _old_export_with_user_files(folder, model, params):
    """A previous export written as HF shards (index + 2 shards), plus files and a folder of the user's."""
    lorajax.models.save_pretrained(folder, model, params)
    tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    half = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in half.items():
        safetensors.numpy.save_file({k: tensors[k] for k in keys}, str(folder / shard))
    (folder / "model.safetensors").unlink()
    weight_map = {k: shard for shard, keys in half.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "tokenizer.json").write_text('{"user": "file"}')
    (folder / "notes").mkdir()
    (folder / "notes" / "run.txt").write_text("my notes")


def test_save_pretrained_replaces_export_keeps_user_files(tiny, tmp_path):
    model, params, params2 = tiny
    folder = tmp_path / "base"
    _old_export_with_user_files(folder, model, params)
    _, back = lorajax.models.from_pretrained(folder)  # the sharded old export loads
    jax.tree.map(np.testing.assert_array_equal, back, params)
    lorajax.models.save_pretrained(folder, model, params2)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "notes", "tokenizer.json"]
    assert (folder / "tokenizer.json").read_text() == '{"user": "file"}'
    assert (folder / "notes" / "run.txt").read_text() == "my notes"
    _, back = lorajax.models.from_pretrained(folder)  # the new weights, not the stale shards
    jax.tree.map(np.testing.assert_array_equal, back, params2)
    assert _temporaries(tmp_path, "base") == []


@pytest.mark.parametrize("existing", [True, False])
def test_save_pretrained_killed_mid_export(tiny, tmp_path, monkeypatch, existing):
    model, params, params2 = tiny
    folder = tmp_path / "base"
    if existing:
        lorajax.models.save_pretrained(folder, model, params)
        (folder / "README.md").write_text("user readme")
    before = _tree(folder) if existing else None
    seen = []
    monkeypatch.setattr(safetensors.flax, "save_file", _dies_mid_write(KeyboardInterrupt("killed mid-export"), seen))
    with pytest.raises(KeyboardInterrupt):
        lorajax.models.save_pretrained(folder, model, params2)
    assert seen == [["config.json"]]  # config.json was already written
    _old_folder_or_none(folder, before)


# ----------------------------------------------------------------------------- lorajax.peft.save

@pytest.fixture(scope="module")
def adapter():
    params = {"layers": {str(i): {"q_proj": {"kernel": jnp.ones((8, 12))}} for i in range(2)}}
    spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["q_proj"])
    adapters = jax.tree.map(lambda x: x + 0.5, lorajax.init(spec, params, 0))
    return spec, params, adapters


def test_peft_save_replaces_and_keeps_user_files(adapter, tmp_path):
    spec, params, adapters = adapter
    out = tmp_path / "peft_adapter"
    lorajax.peft.save(out, spec, jax.tree.map(jnp.zeros_like, adapters), params)
    (out / "README.md").write_text("model card")
    lorajax.peft.save(out, spec, adapters, params)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (out / "README.md").read_text() == "model card"
    _, back = lorajax.peft.load(out, params)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)
    assert _temporaries(tmp_path, "peft_adapter") == []


@pytest.mark.parametrize("existing", [True, False])
def test_peft_save_killed_mid_export(adapter, tmp_path, monkeypatch, existing):
    spec, params, adapters = adapter
    out = tmp_path / "peft_adapter"
    if existing:
        lorajax.peft.save(out, spec, jax.tree.map(jnp.zeros_like, adapters), params)
    before = _tree(out) if existing else None

    seen = []
    monkeypatch.setattr(safetensors.flax, "save_file", _dies_mid_write(OSError(28, "No space left on device"), seen))
    with pytest.raises(OSError, match="No space left"):
        lorajax.peft.save(out, spec, adapters, params)
    assert seen == [["adapter_config.json"]]  # adapter_config.json was already written
    _old_folder_or_none(out, before)


def test_peft_save_nonfinite_writes_nothing(adapter, tmp_path):
    spec, params, adapters = adapter
    bad = jax.tree.map(lambda x: x.at[0, 0].set(jnp.nan), adapters)
    with pytest.raises(FloatingPointError, match="non-finite"):
        lorajax.peft.save(tmp_path / "peft_adapter", spec, bad, params)
    assert list(tmp_path.iterdir()) == []
