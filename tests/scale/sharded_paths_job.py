"""Run in a subprocess with 8 fake CPU devices: the remaining paths, sharded against one device.

Usage: python sharded_paths_job.py CKPT_DIR OUT_JSON

Computes, each on one device and on a mesh (params by the default Llama rules,
adapters and optimiser state ``shard(..., like=params)``, batches `shard_batch`):

* ``merged``: the merged-mode adapted forward's logits (mesh ``fsdp=2,tensor=4``);
* ``nf4_factored``: the factored forward over the NF4-quantised base (``fsdp=2,tensor=4``, codes and
  scales placed by `lorajax.sharding` like their weight);
* ``generate_merged`` / ``generate_factored``: greedy KV-cache generation with merged params and
  with a factored ``apply_fn`` (mesh ``data=2,fsdp=4``, 8 prompts, two left-padded), plus the
  teacher-forced logits of the result and their smallest top-2 gap (so equal tokens are a real check);
* ``allora``, ``sora``, ``galore32``, ``galore8``: 3 optimiser steps (mesh ``fsdp=2,tensor=4``).

Writes OUT_JSON: per path the errors (``‖a − b‖ / ‖b‖``, max over leaves), losses, tokens, placements.
"""

import functools
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lorajax  # noqa: E402
from lorajax import quant, sharding  # noqa: E402
from lorajax.models.llama import generate  # noqa: E402

ckpt_dir, out_path = sys.argv[1], sys.argv[2]
assert len(jax.devices()) == 8, jax.devices()
model, params = lorajax.models.from_pretrained(ckpt_dir)
rng = np.random.default_rng(0)
results: dict = {}
t_start = time.perf_counter()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_err(got, ref) -> tuple[float, str]:
    """Largest per-leaf relative error and the leaf it occurs at."""
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    worst = (0.0, "")
    for path, r in jax.tree_util.tree_flatten_with_path(ref)[0]:
        e = rel_err(flat_got[path], r)
        worst = max(worst, (e, jax.tree_util.keystr(path)))
    return worst


def spec_str(x) -> str:
    return str(getattr(x.sharding, "spec", None))


def shard_shape(x) -> list:
    return list(x.addressable_shards[0].data.shape)


def xent(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


# ---------------------------------------------------------------- 1. merged-mode forward, fsdp=2,tensor=4
spec = lorajax.Spec("lora", rank=4, alpha=8, targets="all-linear", init_weights=False)  # B != 0
adapters = lorajax.init(spec, params, 0)
mesh_ft = sharding.make_mesh("fsdp=2,tensor=4")
merged_fwd = jax.jit(lorajax.adapt(model.apply, spec, mode="merged"))
tokens = rng.integers(0, 128, (8, 16)).astype(np.int32)
ref = merged_fwd({"params": params}, adapters, tokens)
base = jax.jit(model.apply)({"params": params}, tokens)
p_ft = sharding.shard(params, mesh_ft)
a_ft = sharding.shard(adapters, mesh_ft, like=params)
got = merged_fwd({"params": p_ft}, a_ft, sharding.shard_batch(tokens, mesh_ft))
results["merged"] = {
    "rel_err": rel_err(got, ref),
    "adapter_effect": rel_err(ref, base),  # the adapters change the logits: not a test of the bare model
    "q_shard": shard_shape(p_ft["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]),
    "lora_B_shard": shard_shape(a_ft["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]["lora_B"]),
    "logits_devices": len(got.sharding.device_set),
}

# ---------------------------------------------------------------- 1b. factored forward, NF4 base, fsdp=2,tensor=4
q_params = quant.quantize(params, None, "nf4")  # all-linear: lm_head stays float
factored_jit = jax.jit(lorajax.adapt(model.apply, spec))
ref_q = factored_jit({"params": q_params}, adapters, tokens)
q_ft = sharding.shard(q_params, mesh_ft)  # codes / scales placed like their weight (the default Llama rules)
aq_ft = sharding.shard(adapters, mesh_ft, like=q_params)
got_q = factored_jit({"params": q_ft}, aq_ft, sharding.shard_batch(tokens, mesh_ft))
q_leaf = q_ft["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
results["nf4_factored"] = {
    "rel_err": rel_err(got_q, ref_q),
    "codes_spec": spec_str(q_leaf.codes),
    "codes_shard": shard_shape(q_leaf.codes),
    "scales_shard": shard_shape(q_leaf.scales),
    "lora_B_shard": shard_shape(aq_ft["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]["lora_B"]),
    "logits_devices": len(got_q.sharding.device_set),
}

# ---------------------------------------------------------------- 2. generation with KV cache, data=2,fsdp=4
mesh_df = sharding.make_mesh("data=2,fsdp=4")
S, N = 10, 6
prompts = rng.integers(1, 128, (8, S)).astype(np.int32)
mask = np.ones((8, S), np.int32)
mask[1, :3] = 0  # two left-padded rows
mask[5, :1] = 0
prompts[mask == 0] = 0
factored_fwd = lorajax.adapt(model.apply, spec)


def factored_apply(pa, ids, **kw):  # module level: hashable and stable (it keys generate's compile cache)
    return factored_fwd({"params": pa[0]}, pa[1], ids, **kw)


@jax.jit
def teacher_forced(p, out, full_mask):
    """Logits of the whole generated sequence in one pass (positions as generate: real tokens counted)."""
    pos = jnp.where(full_mask == 0, 0, jnp.cumsum(full_mask, axis=1) - 1)
    return model.apply({"params": p}, out, attention_mask=full_mask, position_ids=pos)


p_df = sharding.shard(params, mesh_df)
a_df = sharding.shard(adapters, mesh_df, like=params)
prompts_df, mask_df = sharding.shard_batch((prompts, mask), mesh_df)
merged_1 = lorajax.merge(spec, params, adapters)
merged_df = lorajax.merge(spec, p_df, a_df)
full_mask = np.concatenate([mask, np.ones((8, N), np.int32)], axis=1)
for name, (args_1, args_df, fn) in {
    "generate_merged": ((merged_1,), (merged_df,), None),
    "generate_factored": (((params, adapters),), ((p_df, a_df),), factored_apply),
}.items():
    tok_1 = np.asarray(generate(model, *args_1, prompts, N, attention_mask=mask, apply_fn=fn))
    tok_df = generate(model, *args_df, prompts_df, N, attention_mask=mask_df, apply_fn=fn)
    results[name] = {"tokens_1": tok_1.tolist(), "tokens_mesh": np.asarray(tok_df).tolist(),
                     "out_devices": len(tok_df.sharding.device_set)}
# teacher-forced logits of the generated sequence (prefill + every decoding position), merged params
tok_1 = np.asarray(results["generate_merged"]["tokens_1"], np.int32)
logits_1 = np.asarray(teacher_forced(merged_1, tok_1, full_mask))
logits_df = teacher_forced(merged_df, *sharding.shard_batch((tok_1, full_mask), mesh_df))
dec = logits_1[:, S - 1:S + N - 1]  # the logits each generated token was picked from
top2 = np.sort(dec, axis=-1)[..., -2:]
results["generate_logits"] = {
    "rel_err": rel_err(logits_df, logits_1),
    "prefill_rel_err": rel_err(np.asarray(logits_df)[:, :S], logits_1[:, :S]),
    "min_top2_gap": float((top2[..., 1] - top2[..., 0]).min()),
    "max_abs_err": float(np.abs(np.asarray(logits_df) - logits_1).max()),
    "argmax_is_generated": bool((dec.argmax(-1) == tok_1[:, S:]).all()),
    "logit_scale": float(np.abs(dec).max()),
}


# ---------------------------------------------------------------- 3. optimiser transforms, fsdp=2,tensor=4
train_tokens = jnp.asarray(rng.integers(0, 128, (8, 17)).astype(np.int32))  # one batch, 3 times: loss falls


def run_lora(spec, adapters, tx, extra=None):
    """3 steps on one device and on fsdp=2,tensor=4: losses and final trainable trees."""
    def loss_fn(p, a, batch):
        loss = xent(lorajax.adapt(model.apply, spec)({"params": p}, a, batch[:, :-1]), batch)
        return loss + (extra(a) if extra is not None else 0.0)

    step = lorajax.train.make_lora_step(loss_fn, tx)  # donates the state: start from host copies
    adapters = jax.device_get(adapters)
    out = {}
    for mesh in (None, mesh_ft):
        trainable, frozen = lorajax.partition(spec, jax.tree.map(jnp.asarray, adapters))
        state = lorajax.train.TrainState.create(tx, trainable, frozen)
        p, batch = params, train_tokens
        if mesh is not None:
            p = p_ft
            state = state.replace(trainable=sharding.shard(state.trainable, mesh, like=params),
                                  opt_state=sharding.shard(state.opt_state, mesh, like=params))
            batch = sharding.shard_batch(batch, mesh)
        losses = []
        for _ in range(3):
            state, metrics = step(p, state, batch)
            losses.append(float(metrics["loss"]))
        out[mesh is not None] = (losses, jax.device_get(state.trainable))
    (l1, t1), (lm, tm) = out[False], out[True]
    err, leaf = tree_err(tm, t1)
    delta_err, delta_leaf = tree_err(jax.tree.map(lambda a, b: a - b, tm, lorajax.partition(spec, adapters)[0]),
                                     jax.tree.map(lambda a, b: a - b, t1, lorajax.partition(spec, adapters)[0]))
    return {"losses_1": l1, "losses_mesh": lm, "rel_err": err, "worst_leaf": leaf,
            "delta_rel_err": delta_err, "delta_worst_leaf": delta_leaf}


# ALLoRA: scale-1 LoRA (alpha = rank), AdamW with eps large so ~0 entries do not magnify rounding
spec_al = lorajax.Spec("lora", rank=4, alpha=4, targets="all-linear", init_weights=False)
tx_al = lorajax.optim.allora(1e-3, eta=2.0, optimizer=functools.partial(optax.adamw, eps=1e-3, weight_decay=0.0))
results["allora"] = run_lora(spec_al, lorajax.init(spec_al, params, 1), tx_al)

# SoRA: gates get their own Adam + proximal soft-threshold; B made nonzero so every gradient is real
spec_so = lorajax.Spec("sora", rank=4, alpha=8, targets="all-linear")
ad_so = lorajax.init(spec_so, params, 2)
leaves, treedef = jax.tree_util.tree_flatten_with_path(ad_so)
ad_so = treedef.unflatten([jax.random.uniform(jax.random.key(i), x.shape, x.dtype, -0.5, 0.5)
                           if str(path[-1].key) == "lora_B" else x for i, (path, x) in enumerate(leaves)])
tx_so = lorajax.optim.sora(0.1, optimizer=functools.partial(optax.sgd, momentum=0.9), gate_lr=1e-3,
                           threshold=1e-3, gate_eps=1e-3)
results["sora"] = run_lora(spec_so, ad_so, tx_so, extra=lambda a: lorajax.optim.gate_penalty(a, 0.1))


# GaLore: full fine-tuning of the params tree; rank 2 (not divisible by tensor=4), projector refresh at step 2
@jax.jit
def _full_loss_grad(p, batch):
    return jax.value_and_grad(lambda q: xent(model.apply({"params": q}, batch[:, :-1]), batch))(p)


def run_full(tx):
    @jax.jit
    def step(p, opt_state, batch):
        loss, g = _full_loss_grad(p, batch)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    out, placed = {}, {}
    for mesh in (None, mesh_ft):
        p, batch, opt_state = params, train_tokens, tx.init(params)
        if mesh is not None:
            p = p_ft
            opt_state = sharding.shard(opt_state, mesh, like=params)
            batch = sharding.shard_batch(batch, mesh)
            placed = {jax.tree_util.keystr(path): [spec_str(x), list(x.shape)]
                      for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
                      if "layers']['0']['self_attn']['q_proj" in jax.tree_util.keystr(path)
                      or "layers']['0']['mlp']['gate_proj" in jax.tree_util.keystr(path)
                      or "embed_tokens" in jax.tree_util.keystr(path)}
        losses = []
        for _ in range(3):
            p, opt_state, loss = step(p, opt_state, batch)
            losses.append(float(loss))
        out[mesh is not None] = (losses, p)
    (l1, p1), (lm, p_mesh) = out[False], out[True]
    q = p_mesh["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    p1, pm = jax.device_get(p1), jax.device_get(p_mesh)
    err, leaf = tree_err(pm, p1)
    delta_err, delta_leaf = tree_err(jax.tree.map(lambda a, b: a - b, pm, params),
                                     jax.tree.map(lambda a, b: a - b, p1, params))
    return {"losses_1": l1, "losses_mesh": lm, "rel_err": err, "worst_leaf": leaf, "delta_rel_err": delta_err,
            "delta_worst_leaf": delta_leaf, "state_placement": placed, "q_shard_after": shard_shape(q)}


# learning rate small against the weights; Adam eps large so ~0 gradient entries do not magnify rounding
galore_kw = dict(targets="all-linear", rank=2, update_proj_gap=2, eps=1e-3)
results["galore32"] = run_full(lorajax.optim.galore(1e-3, **galore_kw, params=params))
results["galore8"] = run_full(lorajax.optim.galore(1e-3, **galore_kw, optim_bits=8, min_8bit_size=64, params=params))

results["seconds"] = time.perf_counter() - t_start
with open(out_path, "w") as fh:
    json.dump(results, fh, indent=1)
