"""Federated LoRA on Shakespeare's comedies, one play per client: personalised (pFedLoRA) vs global held-out loss.

Non-IID split: each client is one comedy (its speeches as ``"SPEAKER: text"`` lines,
`lorajax.data.speeches`); the first 90% of its characters are its training data, the last 10%
its held-out data. Base: the effects harness's committed character Llama
(``experiments/runs/effects/_base/base``: 2 layers, width 128, pre-trained on the histories,
tragedies and romances, never on a comedy), frozen.

Arms (fixed before any result was seen; same rounds, same local steps per round, same batches):

* ``base``: the frozen base, no adaptation;
* ``fedavg``: one global LoRA (r=4, α=8, q/k/v/o/gate/up/down), `federated.fedavg_round`
  (clients as a vmap axis, Adam 3e-3 fresh per client and round, FedAvg weighted by the clients'
  training sizes); scored with the global adapter on every client;
* ``pfedlora``: the same shared LoRA plus a private, heterogeneous local model per client: a
  LoRA on the MLP (gate/up/down) of rank 2, 4, 6, 8 for clients 1..4, merged into the base; per
  round ``LOCAL_STEPS`` steps on the private LoRA (shared frozen) then ``STEPS - LOCAL_STEPS``
  on the shared one (private frozen), `federated.pfedlora_round` (a loop: the clients differ in
  structure), adapters-only aggregation; scored with each client's own local model + the global
  adapter (personalised);
* ``fed_sb``: LoRA-SB (LoRA-XS r=8 with `lorajax.inits.lora_sb`, gradients estimated on 2
  batches per client as the official code does on the training data, η = lr / total steps as
  its ``eff_lr``), only R trained and communicated, Adam 1e-2 (not tuned), exact aggregation;
* ``fed_sb_dp``: ``fed_sb`` with DP-SGD on every client (clip 1.0, σ from
  `federated.dp_noise_multiplier` for ε = 3 at δ = 1e-5 over the client's rounds × steps with
  sampling rate batch / client windows; the batches are uniform without-replacement draws of
  fixed size, the account assumes Poisson sampling).

Metric: held-out next-character loss (nats/char) per client, all non-overlapping windows of its
held-out 10%. Contrast: pfedlora − fedavg per client and averaged over clients, per seed, with a
95% t-interval over seeds (negative = personalisation helps). Command:
``python -m experiments.federated_shakespeare [--seeds 0 1 2]``; writes
``experiments/results/federated.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments import plot_adapters_as_data
from experiments.report import markdown_table, strict_json
from experiments.stats import t_interval
from experiments.tasks.lm import lm_loss, load_tokenizer, windows
from lorajax import atomic, federated
from lorajax.data import speeches

BASE = Path("experiments/runs/effects/_base/base")
CLIENTS = ("comedy_of_errors", "midsummer_nights_dream", "merry_wives_of_windsor", "taming_of_the_shrew")
PRIVATE_RANKS = (2, 4, 6, 8)
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ, BATCH, ROUNDS, STEPS, LOCAL_STEPS = 64, 16, 6, 16, 8
LR, LR_SB = 3e-3, 1e-2
DP_EPS, DP_DELTA, DP_CLIP = 3.0, 1e-5, 1.0
ARMS = ("base", "fedavg", "pfedlora", "fed_sb", "fed_sb_dp")


def client_data(tok) -> list[dict]:
    """Per client: train windows ``[n, SEQ+1]``, held-out windows, and its size (training characters)."""
    plays = speeches.load_speeches(plays=list(CLIENTS))
    out = []
    for p in CLIENTS:
        text = "".join(f"{s.speaker.rstrip('.')}: {' '.join(s.text.split())}\n" for s in plays[p])
        ids = tok.encode(text)
        cut = int(len(ids) * 0.9)
        out.append({"play": p, "train": windows(ids[:cut], SEQ), "held": windows(ids[cut:], SEQ), "size": cut})
    return out


def draw(train: np.ndarray, rng: np.random.Generator, rounds: int, steps: int) -> np.ndarray:
    """``[rounds, steps, BATCH, SEQ+1]``: each batch BATCH distinct windows drawn uniformly."""
    idx = np.stack([[rng.choice(len(train), BATCH, replace=False) for _ in range(steps)] for _ in range(rounds)])
    return train[idx]


def held_loss(loss_b, held: np.ndarray) -> float:
    """Mean loss over every held-out window (batches of 32; every window has SEQ tokens)."""
    tot = sum(float(loss_b(jnp.asarray(held[i : i + 32]))) * len(held[i : i + 32]) for i in range(0, len(held), 32))
    return tot / len(held)


def run_seed(seed: int, model, variables: dict, data: list[dict], fns: dict) -> dict:
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    k = len(data)
    sizes = [d["size"] for d in data]
    batches = np.stack([draw(d["train"], rng, ROUNDS, STEPS) for d in data], axis=1)  # [R, K, S, B, SEQ+1]
    res: dict = {"seed": seed}

    # fedavg: one global LoRA, clients as a vmap axis
    spec = fns["spec"]
    trainable, frozen = lorajax.partition(spec, lorajax.init(spec, variables, jax.random.fold_in(key, 1)))
    for r in range(ROUNDS):
        trainable, _ = fns["fedavg_round"](trainable, frozen, jnp.asarray(batches[r]), jnp.asarray(sizes, jnp.float32))
    glob = lorajax.combine(trainable, frozen)
    res["fedavg"] = [held_loss(functools.partial(fns["eval"], variables, glob), d["held"]) for d in data]
    res["bytes_fedavg"] = federated.round_bytes(trainable, k)["total"]

    # pfedlora: private heterogeneous local LoRA + the shared LoRA, adapters-only aggregation
    shared, frozen = lorajax.partition(spec, lorajax.init(spec, variables, jax.random.fold_in(key, 1)))
    locals_ = [lorajax.init(fns["private_specs"][i], variables, jax.random.fold_in(key, 10 + i)) for i in range(k)]
    locals_ = [lorajax.partition(fns["private_specs"][i], a)[0] for i, a in enumerate(locals_)]
    for r in range(ROUNDS):
        cb = [(jnp.asarray(batches[r, i, :LOCAL_STEPS]), jnp.asarray(batches[r, i, LOCAL_STEPS:])) for i in range(k)]
        locals_, shared, _ = federated.pfedlora_round(fns["pfed_steps"], locals_, shared, cb, sizes)
    res["pfedlora"] = [
        held_loss(functools.partial(fns["pfed_eval"][i], locals_[i], shared), d["held"]) for i, d in enumerate(data)
    ]
    res["pfedlora_global"] = [
        held_loss(functools.partial(fns["eval"], variables, lorajax.combine(shared, frozen)), d["held"]) for d in data
    ]
    res["bytes_pfedlora"] = federated.round_bytes(shared, k)["total"]

    # fed_sb (and DP): LoRA-SB init shared by every client, only R trained and sent
    sb_spec, sb_init = fns["sb_spec"], fns["sb_init"]
    for arm, rnd in (("fed_sb", fns["sb_round"]), ("fed_sb_dp", fns["sb_dp_round"])):
        t, f = lorajax.partition(sb_spec, sb_init)
        for r in range(ROUNDS):
            t, _ = rnd(
                t, f, jnp.asarray(batches[r]), jnp.asarray(sizes, jnp.float32), key=jax.random.fold_in(key, 100 + r)
            )
        a = lorajax.combine(t, f)
        res[arm] = [held_loss(functools.partial(fns["sb_eval"], variables, a), d["held"]) for d in data]
        res["bytes_" + arm] = federated.round_bytes(t, k)["total"]
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--results", default="experiments/results/federated.md")
    args = ap.parse_args(argv)
    t0 = time.time()
    model, params = lorajax.models.from_pretrained(BASE)
    variables = {"params": params}
    tok = load_tokenizer(BASE)
    data = client_data(tok)

    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=ATTN_MLP)
    fwd = lorajax.adapt(model.apply, spec, mode="factored")
    loss = lambda t, f, b: lm_loss(fwd(variables, lorajax.combine(t, f), b[:, :-1]), b)  # noqa: E731
    fns: dict = {"spec": spec}
    fns["eval"] = jax.jit(lambda v, a, b: lm_loss(fwd(v, a, b[:, :-1]), b))
    fns["fedavg_round"] = jax.jit(functools.partial(federated.fedavg_round, loss, optax.adam(LR)))

    private_specs = [
        lorajax.Spec("lora", rank=r, alpha=2 * r, targets=["gate_proj", "up_proj", "down_proj"]) for r in PRIVATE_RANKS
    ]
    fns["private_specs"] = private_specs

    def pfed_loss(pspec):
        def f(local, shared_t, b):
            v = lorajax.merge(pspec, variables, local)
            return lm_loss(fwd(v, lorajax.combine(shared_t, shared_frozen), b[:, :-1]), b)

        return f

    shared_frozen = lorajax.partition(spec, lorajax.init(spec, variables, 0))[1]  # plain LoRA: no frozen leaves
    fns["pfed_steps"] = [
        jax.jit(functools.partial(federated.pfedlora_local, pfed_loss(ps), optax.adam(LR), optax.adam(LR)))
        for ps in private_specs
    ]
    fns["pfed_eval"] = [jax.jit(lambda loc, sh, b, f=pfed_loss(ps): f(loc, sh, b)) for ps in private_specs]

    # Fed-SB: one LoRA-SB init from gradients on 2 batches per client (as the official code estimates on the train set)
    sb_spec = lorajax.Spec("lora_xs", rank=8, alpha=8, targets=ATTN_MLP)
    sb_fwd = lorajax.adapt(model.apply, sb_spec, mode="factored")
    est_rng = np.random.default_rng(1234)
    est = [
        jnp.asarray(d["train"][est_rng.choice(len(d["train"]), BATCH, replace=False)]) for d in data for _ in range(2)
    ]
    grads = lorajax.inits.estimate_gradients(
        sb_spec, lambda v, b: lm_loss(model.apply(v, b[:, :-1]), b), variables, iter(est), num_batches=len(est)
    )
    fns["sb_init"] = lorajax.inits.lora_sb(sb_spec, variables, grads, lr=LR_SB / (ROUNDS * STEPS))
    fns["sb_spec"] = sb_spec
    sb_loss = lambda t, f, b: lm_loss(sb_fwd(variables, lorajax.combine(t, f), b[:, :-1]), b)  # noqa: E731
    fns["sb_eval"] = jax.jit(lambda v, a, b: lm_loss(sb_fwd(v, a, b[:, :-1]), b))
    sb_round = jax.jit(functools.partial(federated.fedavg_round, sb_loss, optax.adam(LR_SB)))
    fns["sb_round"] = lambda t, f, b, w, key: sb_round(t, f, b, w)
    q = BATCH / min(len(d["train"]) for d in data)
    sigma = federated.dp_noise_multiplier(DP_EPS, DP_DELTA, q, ROUNDS * STEPS)
    eps = federated.check_budget(DP_EPS, DP_DELTA, sigma, q, ROUNDS * STEPS)
    dp = federated.DPSGD(DP_CLIP, sigma)
    fns["sb_dp_round"] = jax.jit(functools.partial(federated.fedavg_round, sb_loss, optax.adam(LR_SB), dp=dp))

    base_eval = jax.jit(lambda b: lm_loss(model.apply(variables, b[:, :-1]), b))
    base = [held_loss(base_eval, d["held"]) for d in data]
    rows = []
    for s in args.seeds:
        ts = time.time()
        rows.append(run_seed(s, model, variables, data, fns))
        print(
            f"seed {s}: {time.time() - ts:.0f} s", {a: np.round(rows[-1][a], 4).tolist() for a in ARMS[1:]}, flush=True
        )
    out = {
        "clients": [d["play"] for d in data],
        "train_chars": [d["size"] for d in data],
        "held_windows": [len(d["held"]) for d in data],
        "base": base,
        "seeds": rows,
        "dp": {
            "epsilon": eps,
            "delta": DP_DELTA,
            "noise_multiplier": sigma,
            "sample_rate": q,
            "steps": ROUNDS * STEPS,
            "clip": DP_CLIP,
        },
        "wall_s": time.time() - t0,
    }
    text = report(out, args)
    text += "\nPlot: `federated.png` (every seed a point).\n"
    path = Path(args.results)
    atomic.write_text(path, text)
    atomic.write_text(path.with_suffix(".json"), json.dumps(strict_json(out), indent=2) + "\n")
    plot_adapters_as_data.federated(path.with_suffix(".json"))
    print(text)
    return out


def _ci(x) -> str:
    i = t_interval(x)
    return f"{i.mean:+.4f} [{i.low:+.4f}, {i.high:+.4f}]"


def report(out: dict, args) -> str:
    seeds = out["seeds"]
    names = out["clients"]
    k = len(names)
    per = {a: np.array([s[a] for s in seeds]) for a in ("fedavg", "pfedlora", "pfedlora_global", "fed_sb", "fed_sb_dp")}
    rows = []
    for i, n in enumerate(names):
        rows.append(
            [n, f"{out['base'][i]:.4f}"]
            + [f"{per[a][:, i].mean():.4f}" for a in ("fedavg", "pfedlora", "fed_sb", "fed_sb_dp")]
            + [_ci(per["pfedlora"][:, i] - per["fedavg"][:, i])]
        )
    rows.append(
        ["mean over clients", f"{np.mean(out['base']):.4f}"]
        + [f"{per[a].mean():.4f}" for a in ("fedavg", "pfedlora", "fed_sb", "fed_sb_dp")]
        + [_ci(per["pfedlora"].mean(1) - per["fedavg"].mean(1))]
    )
    table = markdown_table(
        [
            "client (play)",
            "base",
            "fedavg (global)",
            "pfedlora (personalised)",
            "fed_sb (global)",
            "fed_sb_dp (global)",
            "pfedlora − fedavg, 95% CI",
        ],
        rows,
    )
    seed_rows = [
        [str(s["seed"]), a] + [f"{v:.4f}" for v in s[a]] + [f"{np.mean(s[a]):.4f}"]
        for s in seeds
        for a in ("fedavg", "pfedlora", "pfedlora_global", "fed_sb", "fed_sb_dp")
    ]
    seed_table = markdown_table(["seed", "arm"] + names + ["mean"], seed_rows)
    b = seeds[0]
    comm = markdown_table(
        ["arm", "bytes per round (K=4, up + down)", "per client each way"],
        [
            [a, str(b["bytes_" + a]), str(b["bytes_" + a] // (2 * k))]
            for a in ("fedavg", "pfedlora", "fed_sb", "fed_sb_dp")
        ],
    )
    d = out["dp"]
    sb_ci = _ci(per["fed_sb"].mean(1) - per["fedavg"].mean(1))
    dp_ci = _ci(per["fed_sb_dp"].mean(1) - per["fed_sb"].mean(1))
    return f"""# Federated LoRA on Shakespeare's comedies (one play per client)

`python -m experiments.federated_shakespeare --seeds {" ".join(str(s) for s in args.seeds)}`
({out["wall_s"]:.0f} s wall on the shared 2-core CPU). Module: `lorajax.federated`; design and arms in
the experiment's docstring.

Clients: {", ".join(names)} (non-IID: one play each); training characters {out["train_chars"]}, held-out
windows of {SEQ} characters {out["held_windows"]}. Base: the committed effects base (character Llama,
2 layers, width 128, pre-trained without comedies). {ROUNDS} rounds × {STEPS} local steps of batch {BATCH}
per client; pFedLoRA splits each round's {STEPS} steps into {LOCAL_STEPS} private-model + {STEPS - LOCAL_STEPS}
shared-adapter steps. FedAvg weighted by training characters. Arms, seeds, metric and learning rates were
fixed before any result; nothing was tuned (Fed-SB's lr 1e-2 included).

Held-out loss, nats/char (mean over {len(seeds)} seeds); the last column is the per-seed paired
difference pFedLoRA − FedAvg with its 95% t-interval over seeds (negative: the personalised model is better):

{table}

Fed-SB − FedAvg (mean over clients): {sb_ci}; Fed-SB with DP − Fed-SB: {dp_ci} (95% t-intervals over seeds).

Every seed (held-out loss per client; `pfedlora_global` = the aggregated shared adapter alone, without the
client's private model):

{seed_table}

Communication per round (formula `2 · K · bytes(trainable)`, checked against the trees in
`tests/test_federated.py`):

{comm}

DP (fed_sb_dp): noise multiplier σ = {d["noise_multiplier"]:.4f} from `dp_noise_multiplier` for ε = {DP_EPS} at
δ = {d["delta"]}: the RDP account (`dp_accounting`) of {d["steps"]} steps at sampling rate {d["sample_rate"]:.4f}
gives ε = {d["epsilon"]:.3f} per client (its examples are in its own steps only); clip norm {d["clip"]}.
Batches are fixed-size uniform draws, the account assumes Poisson sampling (an approximation, as is common).

Caveats (by design, not measured away): the seeds vary the adapter inits and the batch draws only (one base,
one split), so the intervals say nothing about other plays or bases. pFedLoRA's personalised model has more
parameters than FedAvg's global one (its private MLP LoRA, never sent) and its shared adapter trains half
of each round's steps; the contrast is "personalised vs global" as the issue asks, not capacity-matched,
and there is no local-only arm. Fed-SB's lr and DP's clip norm were not tuned.
"""


if __name__ == "__main__":
    main()
