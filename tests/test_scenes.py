"""`lorajax.data.scenes`: SYNTHETIC shape scenes; answers recomputed from the rendered pixels."""

import numpy as np
import pytest

from lorajax.data import scenes

TOK = scenes.TOKENIZER


@pytest.fixture(scope="module")
def data():
    return scenes.make(48, seed=3)


def _objects(img):
    """Per grid cell: (colour, shape) read back from the pixels, or None (empty cell)."""
    cell = img.shape[0] // scenes.GRID
    rgb = np.stack([np.asarray(c) for c in scenes.COLOURS.values()])  # [K, 3]
    out = []
    for r in range(scenes.GRID):
        for c in range(scenes.GRID):
            patch = img[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
            fg = patch.max(-1) > 0.5
            if not fg.any():
                continue
            mean = patch[fg].mean(0)
            colour = list(scenes.COLOURS)[
                int(
                    np.argmin(
                        ((rgb / np.linalg.norm(rgb, axis=1, keepdims=True) - mean / np.linalg.norm(mean)) ** 2).sum(1)
                    )
                )
            ]
            rows, cols = np.nonzero(fg)
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            fill = fg.sum() / box
            # filled fraction of the bounding box: square 1, circle ~pi/4, triangle ~1/2
            shape = "square" if fill > 0.9 else ("circle" if fill > 0.64 else "triangle")
            out.append((colour, shape))
    return out


def test_answers_match_pixels(data):
    assert data["images"].shape == (48, 32, 32, 3) and data["images"].dtype == np.float32
    assert 0 <= data["images"].min() and data["images"].max() <= 1
    assert data["types"][:4] == list(scenes.TYPES)
    for img, q, a, kind in zip(data["images"], data["questions"], data["answers"], data["types"]):
        objs = _objects(img)
        assert 1 <= len(objs) <= 4
        words = TOK.decode(q).split()
        assert words[-1] == "<ans>" and q[-1] == TOK.ids["<ans>"]
        answer = TOK.words[a]
        colours, shapes = [o[0] for o in objs], [o[1] for o in objs]
        if kind == "colour":
            s = words[-3]
            assert shapes.count(s) == 1 and colours[shapes.index(s)] == answer
        elif kind == "shape":
            c = words[-3]
            assert colours.count(c) == 1 and shapes[colours.index(c)] == answer
        elif kind == "count":
            assert scenes.COUNTS[colours.count(words[2])] == answer
        else:
            present = (words[-4], words[-3]) in set(objs)
            assert answer == ("yes" if present else "no")


def test_deterministic_and_types():
    a, b = scenes.make(6, seed=11, types=("exist",)), scenes.make(6, seed=11, types=("exist",))
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["questions"], b["questions"])
    assert a["texts"] == b["texts"] and set(a["types"]) == {"exist"}
    c = scenes.make(6, seed=12, types=("exist",))
    assert not np.array_equal(a["images"], c["images"])


def test_tokenizer_and_bad_input():
    q = TOK.question("is there a red circle ?")
    assert q.shape == (scenes.QUESTION_LEN,) and TOK.decode(q) == "is there a red circle ? <ans>"
    assert (q[:2] == TOK.ids["<pad>"]).all() and q[2] == TOK.ids["is"]
    with pytest.raises(ValueError, match="'purple' is not in the vocabulary"):
        TOK.encode("is there a purple circle ?")
    with pytest.raises(ValueError, match="question types"):
        scenes.make(2, seed=0, types=("size",))
    with pytest.raises(ValueError, match="size must be"):
        scenes.make(2, seed=0, size=30)
    with pytest.raises(ValueError, match="n must be"):
        scenes.make(0, seed=0)
