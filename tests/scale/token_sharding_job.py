"""Run in a subprocess with 8 fake CPU devices: FSDP LoRA steps of a tiny Llama and a tiny BERT, with and without
``token_sharding``.

Usage: python token_sharding_job.py OUT.json
For each model: the loss and adapter gradients of one LoRA step on mesh ``fsdp=8`` (weights by lorajax's rules,
batch over the devices), with and without the model's ``token_sharding``, beside the same step on one device; and
the all-gathers in the compiled (partitioned) step: the shapes they produce, split into weight-sized and
token-sized ones (leading dimension = tokens B·S or the per-sequence S).
"""

import json
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lorajax  # noqa: E402
from lorajax import sharding  # noqa: E402
from lorajax.models import bert, llama  # noqa: E402

assert len(jax.devices()) == 8, jax.devices()
B, S, D = 8, 16, 64
mesh = sharding.make_mesh("fsdp=8")
rng = np.random.default_rng(0)
ids = jnp.asarray(rng.integers(1, 100, (B, S)), jnp.int32)
probe = jnp.asarray(rng.standard_normal((B, S, 112)), jnp.float32)

MODELS = {
    "llama": llama.LlamaForCausalLM(llama.Config(vocab_size=112, hidden_size=D, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64, architectures=("LlamaForCausalLM",))),
    "bert": bert.BertModel(bert.Config(vocab_size=112, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=96, max_position_embeddings=64)),
}


def collectives(hlo: str) -> list[tuple[str, list[int]]]:
    """(op, result shape) of every cross-device collective in a compiled HLO module."""
    found = []
    for line in hlo.splitlines():
        op = re.search(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(", line)
        shape = re.search(r"=\s*\(?[a-z0-9]+\[([0-9,]*)\]", line)
        if op and shape:
            found.append((op.group(1), [int(d) for d in shape.group(1).split(",") if d]))
    return found


def activation_sized(shape: list[int]) -> bool:
    """A [tokens, features]-like array: B·S (or B, S) leading rows and at least D features per row."""
    return len(shape) >= 2 and int(np.prod(shape)) >= B * S * D // 8 and shape[-1] > 1


out = {}
for name, model in MODELS.items():
    params = model.init(jax.random.key(0), ids)["params"]
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets="all-linear", init_weights=False)
    adapters = lorajax.init(spec, {"params": params}, jax.random.key(1))

    def loss_fn(adapters, params, batch, model=model):
        y = lorajax.adapt(model.apply, spec, mode="factored")({"params": params}, adapters, batch)
        return jnp.mean(y.astype(jnp.float32) * probe[:, :, :y.shape[-1]])  # not LayerNorm-invariant

    weight_shapes = [list(x.shape) for x in jax.tree.leaves((params, adapters)) if x.ndim == 2]
    step = jax.jit(jax.value_and_grad(loss_fn))
    ref_loss, ref_grads = step(adapters, params, ids)
    row = {}
    for tag, m in (("plain", model), ("token_sharding", model.clone(token_sharding=sharding.token_sharding(mesh)))):
        p = sharding.shard(params, mesh)
        a = sharding.shard(adapters, mesh, like=params)
        x = sharding.shard_batch(ids, mesh)
        f = jax.jit(jax.value_and_grad(lambda a, p, b, m=m: loss_fn(a, p, b, model=m)))
        loss, grads = f(a, p, x)
        err = max(float(jnp.max(jnp.abs(g - r)) / (jnp.max(jnp.abs(r)) + 1e-30))
                  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
        ops = collectives(f.lower(a, p, x).compile().as_text())
        row[tag] = {"loss": float(loss), "grad_rel_err": err, "collectives": ops,
                    "gathered_weights": sum(op == "all-gather" and list(s) in weight_shapes for op, s in ops),
                    "activation_collectives": [(op, s) for op, s in ops if activation_sized(s)
                                               and list(s) not in weight_shapes]}
    row["ref_loss"] = float(ref_loss)
    out[name] = row

with open(sys.argv[1], "w") as fh:
    json.dump(out, fh, indent=1)
