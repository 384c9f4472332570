"""The ESSA driver resumes from its checkpoint and ends as the unbroken run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.es import ESSA, run
from _es_common import ADAPTERS, SPEC, VARIABLES, X, Y, close, reward

pytest.importorskip("evosax")

def test_driver_resumes_from_checkpoint(tmp_path):
    essa = ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8, strategy="open_es")
    key = jax.random.key(11)
    straight, hist = run(essa, reward, key, 4, VARIABLES, X, Y, progress=False)
    d = tmp_path / "ckpt"
    part, h1 = run(essa, reward, key, 2, VARIABLES, X, Y, checkpoint_dir=str(d), ckpt_every=1, progress=False)
    assert int(part.generation) == 2 and len(h1) == 2
    resumed, h2 = run(essa, reward, key, 4, VARIABLES, X, Y, checkpoint_dir=str(d), ckpt_every=1,
                      progress=False)
    assert int(resumed.generation) == 4 and [h["generation"] for h in h2] == [1, 2, 3, 4]
    close(resumed.es, straight.es)
    close(resumed.frozen, straight.frozen)
    assert [h["fitness_mean"] for h in h2] == pytest.approx([h["fitness_mean"] for h in hist], rel=1e-5)
