"""Run in a subprocess with 8 fake CPU devices: 5 LoRA steps of a tiny Llama on several meshes.

Usage: python sharded_job.py CKPT_DIR OUT_DIR MESH [MESH ...]   (MESH "1" = one device, no mesh)
Writes OUT_DIR/<mesh>.safetensors (final adapters), OUT_DIR/<mesh>.json (losses, shard shapes, bytes).
Optional env RESUME_FROM=<dir>: restore adapters + optimiser state from that orbax checkpoint first;
SAVE_TO=<dir>: write one after step 3.
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import safetensors.numpy  # noqa: E402

import lorajax  # noqa: E402
from lorajax import sharding  # noqa: E402
from lorajax.train.checkpoint import Checkpointer  # noqa: E402

ckpt_dir, out_dir, meshes = sys.argv[1], sys.argv[2], sys.argv[3:]
assert len(jax.devices()) == 8, jax.devices()
model, params = lorajax.models.from_pretrained(ckpt_dir)
spec = lorajax.Spec("lora", rank=4, alpha=8, targets="all-linear", init_weights=False)
OPTIM = os.environ.get("OPTIM", "sgd")
if OPTIM == "sgd":
    tx = optax.sgd(0.1, momentum=0.9)  # linear in the gradient: Adam would magnify rounding in ~0 entries
elif OPTIM == "loraplus":
    tx = lorajax.optim.loraplus(0.05, lr_ratio=4.0, optimizer=optax.sgd)
elif OPTIM == "lora_pro":  # Adam on the full equivalent gradient: eps large so ~0 entries do not magnify rounding
    tx = lorajax.optim.lora_pro(1e-3, spec=spec, eps=1e-3)
else:
    raise SystemExit(f"unknown OPTIM {OPTIM}")
tokens = np.repeat(np.random.default_rng(0).integers(0, 128, (1, 8, 17)), 5, axis=0)  # one batch, 5 times: loss falls


def loss_fn(params, adapters, batch):
    logits = lorajax.adapt(model.apply, spec, mode="factored")({"params": params}, adapters, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


for mesh_arg in meshes:
    adapters = lorajax.init(spec, params, 0)
    trainable, frozen = lorajax.partition(spec, adapters)
    state = lorajax.train.TrainState.create(tx, trainable, frozen)
    p = params
    if mesh_arg != "1":
        mesh = sharding.make_mesh(mesh_arg)
        p = sharding.shard(params, mesh)
        state = state.replace(trainable=sharding.shard(state.trainable, mesh, like=params),
                              opt_state=sharding.shard(state.opt_state, mesh, like=params))
    if os.environ.get("RESUME_FROM"):
        ck = Checkpointer(os.environ["RESUME_FROM"], keep=1)
        state, meta = ck.restore(state)
        ck.close()
    start = int(state.step)
    step = lorajax.train.make_lora_step(loss_fn, tx)
    losses = []
    for i in range(start, 5):
        batch = jnp.asarray(tokens[i])
        if mesh_arg != "1":
            batch = sharding.shard_batch(batch, mesh)
        state, metrics = step(p, state, batch)
        losses.append(metrics["loss"])  # on the device until the end
        if os.environ.get("SAVE_TO") and i + 1 == 3:
            ck = Checkpointer(os.environ["SAVE_TO"], keep=1)
            ck.save(3, state, {"step": 3})
            ck.close()
    losses = [float(x) for x in jax.device_get(losses)]
    trainable = state.trainable
    q = p["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    a = trainable["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]["lora_A"]
    per_device = {}
    for leaf in jax.tree.leaves(p):
        for s in leaf.addressable_shards:
            per_device[str(s.device.id)] = per_device.get(str(s.device.id), 0) + s.data.nbytes
    info = {"losses": losses, "q_shard": list(q.addressable_shards[0].data.shape),
            "lora_A_shard": list(a.addressable_shards[0].data.shape), "q_spec": str(getattr(q.sharding, "spec", None)),
            "param_bytes_per_device": max(per_device.values())}
    flat = {"/".join(str(k.key) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    safetensors.numpy.save_file(flat, os.path.join(out_dir, f"{mesh_arg}.safetensors"))
    with open(os.path.join(out_dir, f"{mesh_arg}.json"), "w") as fh:
        json.dump(info, fh)
