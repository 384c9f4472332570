"""A small resumable LoRA job for tests/test_resume.py: `python tests/resume_job.py OUT_DIR STEPS`."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

import lorajax
from lorajax.models.char_lm import CharLM, Config, next_token_loss


def main(out_dir: str, steps: int) -> None:
    cfg = Config(vocab_size=23, dim=32, layers=1, heads=2, ffn=48, max_len=16)
    model = CharLM(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    spec = lorajax.Spec("lora", rank=4, targets="all-linear")
    trainable, frozen = lorajax.partition(spec, lorajax.init(spec, variables, 1))
    fwd = lorajax.adapt(model.apply, spec, "factored")
    corpus = np.random.default_rng(0).integers(0, cfg.vocab_size, 4000).astype(np.int32)

    def batch_fn(step):  # a pure function of the step
        starts = np.random.default_rng([7, step]).integers(0, len(corpus) - 17, 8)
        return jnp.asarray(np.stack([corpus[s:s + 17] for s in starts]))

    def loss_fn(params, adapters, batch):
        return next_token_loss(fwd(params, adapters, batch[:, :-1]), batch)

    tx = optax.adam(1e-2)
    state, _ = lorajax.train.fit(loss_fn, tx, variables, lorajax.train.TrainState.create(tx, trainable, frozen),
                                 batch_fn, steps, out_dir=out_dir, ckpt_every=3, keep=2, log_every=2, progress=False)
    leaves = jax.tree_util.tree_flatten_with_path(state.trainable)[0]
    safetensors.numpy.save_file({jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves},
                                f"{out_dir}/final.safetensors")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
