"""SYNTHETIC visual question answering: numpy-rendered scenes of simple shapes, one-word answers.

Stands in for CDDM's crop-disease image-question-answer pairs (Liu et al., ECCV 2024,
arXiv 2503.06973) at a size a 2-core CPU can train on. Nothing here is real data.

**Scene.** An image ``[size, size, 3]`` float32 in ``[0, 1]`` (channels last; default
32x32). The image is a ``GRID x GRID`` (4x4) grid of cells of ``size / GRID`` pixels;
1 to 4 shapes are placed in distinct random cells. Each shape is a ``square``,
``circle`` or ``triangle`` (apex up) of side ``round(0.875 · cell)`` (7 of 8 pixels) at
the cell's top-left corner (no sub-cell jitter: with a random 0-1 pixel offset a 2-layer
toy VLM stayed near chance on shape questions after 1,400 steps of a trial run), in one of `COLOURS` (red,
green, blue, yellow) with each RGB channel scaled by a random brightness in
``[0.9, 1.0]``; the background is ``N(0.1, 0.03²)`` noise clipped to ``[0, 1]``. Shapes
never overlap.

**Questions** (word-level, `QUESTION_LEN` tokens, left-padded with ``<pad>``,
then the ``<ans>`` token the model answers at), one per scene, of four types:

* ``colour``: "what colour is the <shape> ?" (asked only when exactly one shape
  of that kind is present) -> a colour;
* ``shape``: "which shape is <colour> ?" (only when exactly one shape has that
  colour) -> a shape;
* ``count``: "how many <colour> shapes ?" -> ``zero`` .. ``four``;
* ``exist``: "is there a <colour> <shape> ?" -> ``yes`` / ``no`` (each with
  probability 1/2: a present pair or an absent one).

Everything is a deterministic function of the seed (``numpy.random.default_rng``).

Example:
  >>> from lorajax.data import scenes
  >>> d = scenes.make(4, seed=0, types=("count",))
  >>> d["images"].shape, d["questions"].shape, d["answers"].shape
  ((4, 32, 32, 3), (4, 9), (4,))
  >>> scenes.TOKENIZER.decode(scenes.TOKENIZER.encode("how many red shapes ?"))
  'how many red shapes ?'
"""

from __future__ import annotations

import difflib
from typing import Sequence

import numpy as np

__all__ = [
    "COLOURS",
    "SHAPES",
    "COUNTS",
    "TYPES",
    "GRID",
    "QUESTION_LEN",
    "WordTokenizer",
    "TOKENIZER",
    "render",
    "make",
]

#: colour name -> RGB
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("square", "circle", "triangle")
COUNTS = ("zero", "one", "two", "three", "four")
TYPES = ("colour", "shape", "count", "exist")
#: cells per image side
GRID = 4
#: question tokens per example (left-padded), the last being ``<ans>``
QUESTION_LEN = 9
PAD, ANS = "<pad>", "<ans>"


class WordTokenizer:
    """A fixed word-level vocabulary: ``encode`` splits on spaces; an unknown word raises ValueError."""

    def __init__(self, words: Sequence[str]):
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be distinct")
        self.words = tuple(words)
        self.ids = {w: i for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> np.ndarray:
        """``[n]`` int32 ids of the space-separated words of ``text``.

        Raises:
          ValueError: a word not in the vocabulary, naming it and the closest words.
        """
        out = []
        for w in text.split():
            if w not in self.ids:
                close = difflib.get_close_matches(w, self.words, n=3)
                raise ValueError(f"word {w!r} is not in the vocabulary; closest: {close}")
            out.append(self.ids[w])
        return np.asarray(out, np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """The words of ``ids`` joined by spaces, ``<pad>`` dropped."""
        return " ".join(self.words[int(i)] for i in ids if self.words[int(i)] != PAD)

    def question(self, text: str) -> np.ndarray:
        """``[QUESTION_LEN]`` ids: ``<pad>``... + ``text`` + ``<ans>``.

        Raises:
          ValueError: an unknown word; a question longer than ``QUESTION_LEN - 1`` words.
        """
        ids = self.encode(text)
        if len(ids) > QUESTION_LEN - 1:
            raise ValueError(f"question {text!r} has {len(ids)} words; at most {QUESTION_LEN - 1}")
        pad = np.full(QUESTION_LEN - 1 - len(ids), self.ids[PAD], np.int32)
        return np.concatenate([pad, ids, np.asarray([self.ids[ANS]], np.int32)])


_WORDS = (PAD, ANS, "what", "colour", "is", "the", "which", "shape", "how", "many", "shapes", "there", "a", "?")
TOKENIZER = WordTokenizer(_WORDS + tuple(COLOURS) + SHAPES + COUNTS + ("yes", "no"))


def _mask(kind: str, side: int) -> np.ndarray:
    """``[side, side]`` bool mask of a shape filling a ``side`` box."""
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    if kind == "square":
        return np.ones((side, side), bool)
    if kind == "circle":
        c = side / 2
        return (yy - c) ** 2 + (xx - c) ** 2 <= c**2
    # triangle, apex at the top centre: at row y the half-width grows linearly
    return np.abs(xx - side / 2) <= (yy / side) * (side / 2)


def render(objects: Sequence[tuple[str, str, int, int, int, int, float]], size: int, rng: np.random.Generator):
    """``[size, size, 3]`` float32 image of ``objects`` = ``(colour, shape, row, col, dy, dx, brightness)``."""
    img = np.clip(rng.normal(0.1, 0.03, (size, size, 3)), 0, 1).astype(np.float32)
    cell = size // GRID
    side = max(2, int(round(0.875 * cell)))
    for colour, shape, row, col, dy, dx, bright in objects:
        y0, x0 = row * cell + dy, col * cell + dx
        m = _mask(shape, side)
        rgb = np.asarray(COLOURS[colour], np.float32) * bright
        patch = img[y0 : y0 + side, x0 : x0 + side]
        patch[m] = rgb
    return img


def _scene(rng: np.random.Generator, size: int) -> list:
    n = int(rng.integers(1, 5))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objs = []
    for c in cells:
        objs.append(
            (
                str(rng.choice(list(COLOURS))),
                str(rng.choice(SHAPES)),
                int(c // GRID),
                int(c % GRID),
                0,
                0,
                float(rng.uniform(0.9, 1.0)),
            )
        )
    return objs


def _question(kind: str, objs: list, rng: np.random.Generator) -> tuple[str, str] | None:
    colours = [o[0] for o in objs]
    shapes = [o[1] for o in objs]
    if kind == "colour":
        once = [s for s in SHAPES if shapes.count(s) == 1]
        if not once:
            return None
        s = str(rng.choice(once))
        return f"what colour is the {s} ?", colours[shapes.index(s)]
    if kind == "shape":
        once = [c for c in COLOURS if colours.count(c) == 1]
        if not once:
            return None
        c = str(rng.choice(once))
        return f"which shape is {c} ?", shapes[colours.index(c)]
    if kind == "count":
        c = str(rng.choice(list(COLOURS)))
        return f"how many {c} shapes ?", COUNTS[colours.count(c)]
    present = sorted(set(zip(colours, shapes)))
    if rng.random() < 0.5:
        c, s = present[int(rng.integers(len(present)))]
        return f"is there a {c} {s} ?", "yes"
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    c, s = absent[int(rng.integers(len(absent)))]
    return f"is there a {c} {s} ?", "no"


def make(n: int, seed: int, types: Sequence[str] = TYPES, size: int = 32) -> dict:
    """``n`` SYNTHETIC scene-question-answer examples, question types cycling through ``types``.

    Returns:
      ``{"images": [n, size, size, 3] float32, "questions": [n, QUESTION_LEN] int32,
      "answers": [n] int32 (vocabulary ids), "types": [n] str, "texts": [n] str}``.

    Raises:
      ValueError: ``n < 1``, an unknown question type, or ``size`` not a multiple of `GRID` (>= 4 · GRID).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    bad = [t for t in types if t not in TYPES]
    if bad or not types:
        raise ValueError(f"question types must be a non-empty subset of {TYPES}, got {list(types)}")
    if size % GRID or size < 4 * GRID:
        raise ValueError(f"size must be a multiple of {GRID} and >= {4 * GRID}, got {size}")
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.float32)
    questions = np.zeros((n, QUESTION_LEN), np.int32)
    answers = np.zeros((n,), np.int32)
    kinds, texts = [], []
    for i in range(n):
        kind = types[i % len(types)]
        while True:
            objs = _scene(rng, size)
            qa = _question(kind, objs, rng)
            if qa is not None:
                break
        images[i] = render(objs, size, rng)
        questions[i] = TOKENIZER.question(qa[0])
        answers[i] = TOKENIZER.ids[qa[1]]
        kinds.append(kind)
        texts.append(f"{qa[0]} {qa[1]}")
    return {"images": images, "questions": questions, "answers": answers, "types": kinds, "texts": texts}
