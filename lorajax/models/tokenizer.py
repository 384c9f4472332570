"""A thin wrapper over Hugging Face ``tokenizers`` for local checkpoint folders (no network).

`Tokenizer.from_pretrained(path)` reads ``tokenizer.json`` (any model: BERT
WordPiece, RoBERTa byte-level BPE, ...) or, when only ``vocab.txt`` exists,
builds a BERT WordPiece tokenizer from it (``do_lower_case`` and
``strip_accents`` from ``tokenizer_config.json``). `Tokenizer.encode_batch`
returns int32 numpy ``input_ids``, ``attention_mask`` and ``token_type_ids``
``[B, S]``, with the special tokens (``[CLS] ... [SEP]``) added, as
transformers' fast tokenizer does with ``padding=True, truncation=True``.

The default truncation length ``model_max_length`` is ``max_seq_length`` from
``sentence_bert_config.json`` when present (sentence-transformers' setting, e.g.
256 for all-MiniLM-L6-v2), otherwise ``model_max_length`` from
``tokenizer_config.json``; None means no truncation.

Needs the ``tokenizers`` package (installed with transformers).

Example:
  >>> import tempfile, pathlib
  >>> from lorajax.models.tokenizer import Tokenizer
  >>> d = pathlib.Path(tempfile.mkdtemp())
  >>> _ = (d / "vocab.txt").write_text("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
  >>> tok = Tokenizer.from_pretrained(d)
  >>> batch = tok.encode_batch(["Hello world", "hello"])
  >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
  ([[2, 5, 6, 3], [2, 5, 3, 0]], [[1, 1, 1, 1], [1, 1, 1, 0]])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["Tokenizer"]

_PAD_CANDIDATES = ("[PAD]", "<pad>")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):  # AddedToken serialised as {"content": ...}
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class Tokenizer:
    """Batch encoding to int32 numpy arrays. Build with `from_pretrained`."""

    def __init__(self, tokenizer: Any, *, pad_token: str | None = None, model_max_length: int | None = None):
        """Wrap a ``tokenizers.Tokenizer``; ``pad_token`` defaults to its padding setting or ``[PAD]``/``<pad>``."""
        self._tok = tokenizer
        padding = tokenizer.padding
        if pad_token is None and padding:
            pad_token = padding.get("pad_token")
        if pad_token is None:
            pad_token = next((t for t in _PAD_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        self.pad_token = pad_token
        self.pad_token_id = None if pad_token is None else tokenizer.token_to_id(pad_token)
        if pad_token is not None and self.pad_token_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.pad_type_id = int(padding.get("pad_type_id", 0)) if padding else 0
        self.model_max_length = model_max_length
        self._tok.no_padding()
        self._tok.no_truncation()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read ``tokenizer.json`` (or ``vocab.txt`` for BERT WordPiece) from a local folder."""
        import tokenizers

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder")
        config = _read_json(path / "tokenizer_config.json")
        special = _read_json(path / "special_tokens_map.json")
        if (path / "tokenizer.json").exists():
            try:
                tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # tokenizers raises its own Exception type
                raise ValueError(f"{path / 'tokenizer.json'} could not be read: {e}") from e
        elif (path / "vocab.txt").exists():
            tok = tokenizers.BertWordPieceTokenizer(
                str(path / "vocab.txt"),
                lowercase=bool(config.get("do_lower_case", True)),
                strip_accents=config.get("strip_accents"),
                handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
                unk_token=_token_str(config.get("unk_token")) or "[UNK]",
                sep_token=_token_str(config.get("sep_token")) or "[SEP]",
                cls_token=_token_str(config.get("cls_token")) or "[CLS]",
                pad_token=_token_str(config.get("pad_token")) or "[PAD]",
                mask_token=_token_str(config.get("mask_token")) or "[MASK]",
            )._tokenizer
        else:
            raise FileNotFoundError(
                f"no tokenizer.json or vocab.txt in {path} (other formats, e.g. vocab.json + merges.txt or "
                "sentencepiece models, are not read: save a tokenizer.json with transformers' "
                "tokenizer.save_pretrained)"
            )
        pad = _token_str(special.get("pad_token")) or _token_str(config.get("pad_token"))
        if pad is not None and tok.token_to_id(pad) is None:
            pad = None
        max_len = _read_json(path / "sentence_bert_config.json").get("max_seq_length")
        if max_len is None:
            max_len = config.get("model_max_length")
        if not isinstance(max_len, int) or isinstance(max_len, bool) or not 0 < max_len < 10**6:
            max_len = None  # transformers writes a huge sentinel when there is no limit
        return cls(tok, pad_token=pad, model_max_length=max_len)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_batch(
        self, texts: Sequence[str | tuple[str, str]], max_length: int | None = None, padding: bool | str = True
    ) -> dict[str, np.ndarray]:
        """Tokenize ``texts`` (strings, or ``(first, second)`` pairs) into int32 ``[B, S]`` arrays.

        Args:
          texts: the batch; a pair gets ``token_type_ids`` 1 on its second segment.
          max_length: truncate to this many tokens, special tokens included
            (default ``model_max_length``; None there means no truncation).
          padding: ``True`` / ``"longest"``: pad to the longest sequence;
            ``"max_length"``: pad to ``max_length``; ``False``: no padding (all
            sequences must then have the same length).

        Returns:
          ``{"input_ids", "attention_mask", "token_type_ids"}``, int32 numpy ``[B, S]``.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings (a batch), not one string")
        if padding not in (True, False, "longest", "max_length"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        max_length = self.model_max_length if max_length is None else max_length
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length (or a tokenizer model_max_length)")
        if max_length is None:
            self._tok.no_truncation()
        else:
            self._tok.enable_truncation(max_length)
        texts = [tuple(t) if isinstance(t, list) else t for t in texts]
        try:
            encodings = self._tok.encode_batch(texts, add_special_tokens=True)
        finally:
            self._tok.no_truncation()
        lengths = [len(e.ids) for e in encodings]
        if padding is False:
            if len(set(lengths)) > 1:
                raise ValueError(f"padding=False but the sequences have different lengths {sorted(set(lengths))}")
            width = lengths[0] if lengths else 0
        else:
            width = max_length if padding == "max_length" and max_length is not None else max(lengths, default=0)
            if width > min(lengths, default=width) and self.pad_token_id is None:
                raise ValueError("padding needs a pad token and this tokenizer has none ([PAD] / <pad>)")
        B = len(encodings)
        out = {
            "input_ids": np.full((B, width), self.pad_token_id or 0, np.int32),
            "attention_mask": np.zeros((B, width), np.int32),
            "token_type_ids": np.full((B, width), self.pad_type_id, np.int32),
        }
        for i, e in enumerate(encodings):
            n = len(e.ids)
            out["input_ids"][i, :n] = e.ids
            out["attention_mask"][i, :n] = 1
            out["token_type_ids"][i, :n] = e.type_ids
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
