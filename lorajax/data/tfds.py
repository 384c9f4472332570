"""TensorFlow Datasets as input: a tfds text-classification dataset as a ``datasets.DatasetDict``.

Reads through ``tfds.data_source`` (random access over ArrayRecord files), which
needs neither TensorFlow nor a network: the dataset must already be prepared in
``data_dir`` (``tfds build <name>`` once, or your own builder's output); lorajax
never downloads (``download=False``). The result has the columns the lorajax
tasks use, ``text`` (str) and ``label`` (``ClassLabel`` with the dataset's
names), so it plugs into the same tokenisation and batching as the Shakespeare
speeches (`lorajax.data.speeches.genre_dataset`).

Optional extra: ``pip install lorajax[tfds]`` (``tensorflow-datasets``).

Example (tfds' mock data: no files, no network):
  >>> import tensorflow_datasets as tfds
  >>> from lorajax.data.tfds import text_classification
  >>> with tfds.testing.mock_data(num_examples=3):
  ...     ds = text_classification("imdb_reviews", splits=("train",))
  >>> ds["train"].num_rows, ds["train"].features["label"].num_classes
  (3, 2)
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["text_classification"]


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # optional extra
        raise ImportError("lorajax.data.tfds needs tensorflow-datasets: pip install 'lorajax[tfds]'") from e
    return tfds


def text_classification(name: str, *, splits: Sequence[str] = ("train", "test"), text_key: str = "text",
                        label_key: str = "label", data_dir: str | None = None,
                        max_examples: int | None = None) -> Any:
    """``DatasetDict`` of ``{text, label}`` rows from the tfds dataset ``name`` (e.g. ``"imdb_reviews"``).

    Args:
      name: tfds name, with config/version if needed (``"glue/sst2"``).
      splits: tfds split names (slices such as ``"train[:10%]"`` work); the
        DatasetDict keys are the names before any ``[``.
      text_key, label_key: the feature names of the text and the class label.
      data_dir: where the prepared dataset lives (tfds' default if None).
      max_examples: keep the first ``max_examples`` rows of each split.

    Raises:
      ValueError naming the feature when ``text_key`` / ``label_key`` is not a
      Text / ClassLabel feature of the dataset; tfds' own error when the
      dataset is not prepared in ``data_dir``.
    """
    import datasets

    tfds = _import_tfds()
    features = tfds.builder(name, data_dir=data_dir).info.features
    for key, kind in ((text_key, tfds.features.Text), (label_key, tfds.features.ClassLabel)):
        if key not in features:
            raise ValueError(f"tfds dataset {name!r} has no feature {key!r} (features: {sorted(features.keys())})")
        if not isinstance(features[key], kind):
            raise ValueError(f"feature {key!r} of {name!r} is {type(features[key]).__name__}, expected {kind.__name__}")
    label = features[label_key]
    names = list(label.names) if label.names else [str(i) for i in range(label.num_classes)]
    schema = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    out = {}
    for split in splits:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        n = len(source) if max_examples is None else min(len(source), max_examples)
        rows = [source[i] for i in range(n)]
        texts = [r[text_key].decode("utf-8") if isinstance(r[text_key], bytes) else str(r[text_key]) for r in rows]
        out[split.split("[")[0]] = datasets.Dataset.from_dict(
            {"text": texts, "label": [int(r[label_key]) for r in rows]}, features=schema)
    return datasets.DatasetDict(out)
