"""One process of a 2-process CPU job (4 devices each, gloo collectives) training LoRA with fit().

Usage: python multihost_job.py PROCESS_ID PORT CKPT_DIR OUT_DIR
Each process loads the same HF checkpoint, reads only its own rows of every batch
(local_batches=True), and writes orbax checkpoints together with the other process.
Process 0 writes OUT_DIR/adapters.safetensors and OUT_DIR/losses.json.
Also runs as the 1-process reference: python multihost_job.py single 0 CKPT_DIR OUT_DIR (8 devices).
"""

import json
import os
import sys

pid, port, ckpt_dir, out_dir = sys.argv[1:5]
single = pid == "single"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 if single else 4}"

import jax  # noqa: E402
import jax.experimental.multihost_utils  # noqa: E402

from lorajax import sharding  # noqa: E402

if not single:
    sharding.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))

import numpy as np  # noqa: E402
import optax  # noqa: E402
import safetensors.numpy  # noqa: E402

import lorajax  # noqa: E402

assert len(jax.devices()) == 8 and jax.process_count() == (1 if single else 2)
model, params = lorajax.models.from_pretrained(ckpt_dir)
spec = lorajax.Spec("lora", rank=4, alpha=8, targets="all-linear", init_weights=False)
tx = optax.sgd(0.1, momentum=0.9)
rows = np.random.default_rng(0).integers(0, 128, (8, 17))
fwd = lorajax.adapt(model.apply, spec, mode="factored")


def loss_fn(params, adapters, batch):
    logits = fwd({"params": params}, adapters, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def batch_fn(step):  # the same global batch every step; each process takes its half
    if single:
        return rows
    half = rows.shape[0] // 2
    return rows[int(pid) * half:(int(pid) + 1) * half]


mesh = sharding.make_mesh("data=2,fsdp=4")
adapters = lorajax.init(spec, params, 0)
trainable, frozen = lorajax.partition(spec, adapters)
p = sharding.shard(params, mesh)
trainable = sharding.shard(trainable, mesh, like=params)
state, hist = lorajax.train.fit(loss_fn, tx, p, lorajax.train.TrainState.create(tx, trainable, frozen), batch_fn, 4,
                                out_dir=os.path.join(out_dir, "run"), ckpt_every=2, log_every=1, progress=False,
                                mesh=mesh, local_batches=not single)
trainable = state.trainable
gathered = jax.experimental.multihost_utils.process_allgather(trainable, tiled=True) if not single else trainable
if jax.process_index() == 0:
    flat = {"/".join(str(k.key) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(gathered)[0]}
    safetensors.numpy.save_file(flat, os.path.join(out_dir, "adapters.safetensors"))
    with open(os.path.join(out_dir, "losses.json"), "w") as fh:
        json.dump([h["loss"] for h in hist], fh)
