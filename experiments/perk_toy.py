"""PERK on a toy long-context key→value memorisation task: test-time LoRA vs no context vs an un-meta-learned init.

Task (synthetic, every draw from the seed): a vocabulary of 2 special tokens (BOS, Q), 16 key
tokens and 16 value tokens. A *context* is 8 distinct keys, each paired with a value drawn
uniformly (values may repeat): the 16-token string ``k1 v1 k2 v2 … k8 v8``, cut into 4 chunks
of 2 pairs, each chunk a row ``[BOS, k, v, k, v]``. A *question* is ``[BOS, Q, k]`` for one of
the context's keys; the answer is its value, read as the argmax of the next-token logits over
the whole vocabulary (chance ≈ 1/16 when the values are guessed uniformly). The question
never contains the context: the model can answer only from its adapter.

Model: a tiny Llama (2 layers, width 32, 4 heads; `lorajax.models.llama`, dense attention),
first pre-trained briefly as a plain LM on random contexts' chunks (it learns the format:
after a key comes some value), then frozen. LoRA (r=8, α=16, every linear layer).

Arms, on 256 fresh test contexts × 8 questions per seed:

* ``no context``: the meta-learned LoRA init, no inner loop (what the adapter alone knows).
* ``PERK``: the meta-learned init and per-step, per-tensor learning rates; 4 inner AdamW
  steps (`lorajax.perk.default_inner_tx`) on the LM loss over all 4 chunks as one batch.
* ``TTT, no meta-learning``: lorajax's standard LoRA init (B = 0), the same 4 inner steps,
  one constant learning rate picked from {3e-3, 1e-2, 3e-2, 1e-1} by accuracy on 64
  validation contexts (their own seed).

Meta-training: outer Adam (lr 3e-3), 8 contexts per outer step (``vmap``), 8 questions each,
the full second-order meta-gradient, a fixed number of outer steps. Seeds 0, 1, 2 (each: its
own base, meta-training, validation and test contexts). Differences are paired by seed; 95%
t-intervals over seeds (`experiments.stats.t_interval`). Also measured: the memory XLA plans
for one outer step (AOT ``compile().memory_analysis()``) with the full meta-gradient, with
``remat`` on the inner steps, truncated to the last 2 steps, and first-order.

Everything (arms, steps, lrs, seeds, metric) was fixed before the first run.

Run: ``python -m experiments.perk_toy`` (writes ``experiments/results/perk.md`` and ``perk.json``).

One run (the effects harness's runner, `experiments.effect_list` effect ``perk``): ``python -m
experiments.perk_toy --method {perk,ttt} --steps 250 --optim.lr LR --seed S --out-dir DIR`` — one arm
of one seed (the same seeds' draws as above): ``perk`` meta-trains ``--steps`` outer steps at outer
Adam lr ``--optim.lr`` and reports PERK's accuracy and the no-context accuracy of the same
meta-learned init; ``ttt`` (no meta-training; ``--steps`` unused) runs the 4 inner steps at the
constant inner lr ``--optim.lr``. Writes ``results.json`` (``test_accuracy``, ``val_accuracy``,
``val_error`` = 1 - val_accuracy for the harness's lr pick, ``no_context_test_accuracy``,
``base_no_context_test_accuracy``) and ``results.md`` into ``--out-dir``. A run is about a minute:
no checkpoints inside it (the harness does not re-run a folder holding ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # cheap LLVM compiles (the tests' setting): same maths

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments import plot_adapters_as_data
from experiments.report import markdown_table, write_results
from experiments.run import harness_runner_parser, parse_runner_args, run_main
from experiments.stats import t_interval
from lorajax import atomic, perk
from lorajax.models import llama

BOS, Q = 0, 1
N_KEYS = N_VALUES = 16
KEY0, VALUE0 = 2, 2 + N_KEYS
VOCAB = 2 + N_KEYS + N_VALUES
PAIRS, PAIRS_PER_CHUNK = 8, 2
STEPS = 4  # inner steps (the official n_inner_iter)
INNER_LR = 1e-2  # initial per-step rate of the meta-learned arm
TTT_LRS = (3e-3, 1e-2, 3e-2, 1e-1)
CFG = llama.Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
SPEC = lorajax.Spec("lora", rank=8, alpha=16, targets="all-linear")
PRETRAIN_STEPS, PRETRAIN_LR = 300, 3e-3
META_STEPS, META_LR, META_BATCH = 250, 3e-3, 8
N_TEST, N_VAL = 256, 64
SEEDS = (0, 1, 2)
OUT = Path(__file__).resolve().parent / "results"


def contexts(key: jax.Array, n: int) -> dict:
    """``n`` contexts: chunks ``[n, 4, 5]``, questions ``[n, 8, 3]``, answers ``[n, 8]`` (token ids)."""
    kk, kv = jax.random.split(key)
    keys = jax.vmap(lambda k: jax.random.permutation(k, N_KEYS)[:PAIRS])(jax.random.split(kk, n)) + KEY0
    values = jax.random.randint(kv, (n, PAIRS), 0, N_VALUES) + VALUE0
    pairs = jnp.stack([keys, values], -1).reshape(n, PAIRS // PAIRS_PER_CHUNK, 2 * PAIRS_PER_CHUNK)
    chunks = jnp.concatenate([jnp.full((*pairs.shape[:2], 1), BOS), pairs], -1)
    questions = jnp.stack([jnp.full_like(keys, BOS), jnp.full_like(keys, Q), keys], -1)
    return {"chunks": chunks, "questions": questions, "answers": values}


def qa_batch(ctx: dict) -> dict:
    """One context's questions as a next-token batch whose loss is on the answer only: ``[8, 4]``."""
    ids = jnp.concatenate([ctx["questions"], ctx["answers"][:, None]], -1)
    return {"input_ids": ids, "weights": jnp.zeros((PAIRS, 3)).at[:, -1].set(1.0)}


MODEL = llama.LlamaForCausalLM(CFG, attention="dense")
FWD = lorajax.adapt(MODEL.apply, SPEC)
PRE_TX = optax.adam(PRETRAIN_LR)
META_TX = optax.adam(META_LR)


def build(seed: int):
    return jax.jit(MODEL.init)(jax.random.key(1000 + seed), *llama.example_inputs(CFG))


def _lm_loss(p, ids):
    logits = jnp.asarray(MODEL.apply(p, ids))[:, :-1]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]))


@jax.jit
def _pretrain_step(p, s, key):
    ids = contexts(key, 16)["chunks"].reshape(-1, 1 + 2 * PAIRS_PER_CHUNK)
    loss_val, g = jax.value_and_grad(_lm_loss)(p, ids)
    u, s = PRE_TX.update(g, s, p)
    return optax.apply_updates(p, u), s, loss_val


def pretrain(params, seed: int):
    """Plain LM pre-training of the whole base on random contexts' chunks (the format, not any mapping)."""
    s = PRE_TX.init(params)
    for k in jax.random.split(jax.random.key(2000 + seed), PRETRAIN_STEPS):
        params, s, last = _pretrain_step(params, s, k)
    return params, float(last)


def _evaluate(params, meta, ctx, adapt_steps: bool):
    """Accuracy on one context's 8 questions after the inner loop (or with the init alone)."""
    adapters = meta["init"]
    if adapt_steps:
        batches = perk.repeat_steps({"input_ids": ctx["chunks"]}, STEPS)
        loss = perk.next_token_loss(FWD, params)
        adapters, _ = perk.inner_loop(loss, jax.lax.stop_gradient(meta), batches, first_order=True)
    logits = FWD(params, adapters, ctx["questions"])[:, -1]
    return jnp.mean(jnp.argmax(logits, -1) == ctx["answers"])


@jax.jit(static_argnums=3)
def eval_all(params, meta, ctxs, adapt_steps: bool):
    return jnp.mean(jax.vmap(lambda c: _evaluate(params, meta, c, adapt_steps))(ctxs))


def _outer_step(params, meta, state, batches, query, inner_kw, lr_scale=1.0):
    """One outer Adam step on the meta-gradient averaged over the contexts (leading axis of batches/query);
    ``lr_scale`` multiplies the step (Adam's update is linear in its lr: the outer lr is ``lr_scale * META_LR``)."""
    loss = perk.next_token_loss(FWD, params)
    g, aux = jax.vmap(lambda b, q: perk.meta_grad(loss, loss, meta, b, q, **dict(inner_kw)))(batches, query)
    g, aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), (g, aux))
    updates, state = META_TX.update(g, state, meta)
    updates = jax.tree.map(lambda u: u * lr_scale, updates)
    return optax.apply_updates(meta, updates), state, aux


outer_step = jax.jit(_outer_step, static_argnums=5)


def task_batch(key, n):
    """``n`` contexts' inner batches ``{"input_ids": [n, STEPS, 4, 5]}`` and questions ``[n, 8, 4]``."""
    ctx = contexts(key, n)
    batches = perk.repeat_steps({"input_ids": ctx["chunks"]}, STEPS)
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), batches), jax.vmap(qa_batch)(ctx)


def with_lr(meta: dict, lr: float) -> dict:
    return {**meta, "log_lr": jax.tree.map(lambda x: jnp.full_like(x, np.log(lr)), meta["log_lr"])}


def setup(seed: int):
    """Seed ``seed``'s pre-trained base, its un-meta-learned init (lr `INNER_LR`), test and validation contexts."""
    params, pre_loss = pretrain(build(seed), seed)
    adapters = lorajax.init(SPEC, params, jax.random.key(3000 + seed))
    plain = perk.init_meta(adapters, STEPS, lr=INNER_LR, per_leaf=True)
    test = contexts(jax.random.key(5000 + seed), N_TEST)
    val = contexts(jax.random.key(6000 + seed), N_VAL)
    return params, pre_loss, plain, test, val


def meta_train(params, plain, seed: int, meta_steps: int, lr: float = META_LR):
    """``(meta, curve)``: ``meta_steps`` outer Adam steps (lr ``lr``) from ``plain``; the curve every 25 steps."""
    meta, state, curve = plain, META_TX.init(plain), []
    for i, k in enumerate(jax.random.split(jax.random.key(4000 + seed), meta_steps)):
        b, q = task_batch(k, META_BATCH)
        meta, state, m = outer_step(params, meta, state, b, q, (), lr / META_LR)
        if i % 25 == 0 or i == meta_steps - 1:
            curve.append((i, float(m["outer_loss"]), float(m["inner_losses"][0]), float(m["inner_losses"][-1])))
    return meta, curve


def run_seed(seed: int, meta_steps: int) -> dict:
    t0 = time.time()
    params, pre_loss, plain, test, val = setup(seed)
    meta, curve = meta_train(params, plain, seed, meta_steps)
    val_acc = {lr: float(eval_all(params, with_lr(plain, lr), val, True)) for lr in TTT_LRS}
    best = max(TTT_LRS, key=lambda lr: val_acc[lr])
    lrs = jnp.exp(jnp.stack(jax.tree.leaves(meta["log_lr"])))
    return {
        "seed": seed,
        "pretrain_loss": pre_loss,
        "perk": float(eval_all(params, meta, test, True)),
        "no_context": float(eval_all(params, meta, test, False)),
        "ttt": float(eval_all(params, with_lr(plain, best), test, True)),
        "ttt_lr": best,
        "ttt_val": val_acc,
        "base_no_context": float(eval_all(params, plain, test, False)),  # B = 0: the frozen base itself
        "curve": curve,
        "learned_lr": {"mean_per_step": [float(x) for x in jnp.mean(lrs, 0)]},
        "seconds": time.time() - t0,
    }


def memory(seed: int = 0) -> list[dict]:
    """Bytes XLA plans for one outer step (8 contexts) per meta-gradient option (AOT, no run)."""
    params = build(seed)
    meta = perk.init_meta(lorajax.init(SPEC, params, jax.random.key(0)), STEPS, lr=INNER_LR, per_leaf=True)
    b, q = task_batch(jax.random.key(0), META_BATCH)
    rows = []
    options = [("full", ()), ("full + remat", (("remat", True),)), ("truncated (last 2)", (("unroll_last", 2),))]
    for name, kw in options + [("first-order", (("first_order", True),))]:
        compiled = outer_step.lower(params, meta, META_TX.init(meta), b, q, kw).compile()
        mem = compiled.memory_analysis()
        if mem is None:
            raise RuntimeError("this backend gives no memory analysis")
        rows.append(
            {"option": name, "temp_bytes": int(mem.temp_size_in_bytes), "arg_bytes": int(mem.argument_size_in_bytes)}
        )
    return rows


def report(runs: list[dict], mem: list[dict], wall: float) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    rows = [
        [
            str(r["seed"]),
            pct(r["base_no_context"]),
            pct(r["no_context"]),
            pct(r["ttt"]) + f" (lr {r['ttt_lr']:g})",
            pct(r["perk"]),
        ]
        for r in runs
    ]
    out = [
        "# PERK on a toy key→value memorisation task",
        "",
        "`python -m experiments.perk_toy` (`lorajax.perk`; task, arms and settings in the script's docstring).",
        f"{len(runs)} seeds × {N_TEST} test contexts × {PAIRS} questions; chance ≈ {100 / N_VALUES:.2f}% "
        f"(16 possible values). {META_STEPS} outer steps × {META_BATCH} contexts, {STEPS} inner AdamW steps, "
        f"full second-order meta-gradient. Wall time {wall / 60:.1f} min on 2 shared CPU cores.",
        "",
        "QA accuracy (%) per seed:",
        "",
        markdown_table(
            ["seed", "base, no context", "meta-learned init, no context", "TTT, no meta-learning", "PERK"], rows
        ),
        "",
        "Paired differences over seeds (accuracy points, mean and 95% t-interval):",
        "",
    ]
    diff_rows = []
    for name, a, b in [
        ("PERK − no context", "perk", "no_context"),
        ("PERK − TTT without meta-learning", "perk", "ttt"),
    ]:
        ci = t_interval([100 * (r[a] - r[b]) for r in runs])
        diff_rows.append([name, f"{ci.mean:+.1f}", f"[{ci.low:+.1f}, {ci.high:+.1f}]"])
    out += [markdown_table(["contrast", "mean", "95% CI"], diff_rows), ""]
    for name, a, b in [("PERK over the no-context baseline", "perk", "no_context"), ("PERK over TTT", "perk", "ttt")]:
        ci = t_interval([100 * (r[a] - r[b]) for r in runs])
        seen = "lies above 0: the lift is shown" if ci.low > 0 else "includes 0: the lift is not shown"
        wins = sum(r[a] > r[b] for r in runs)
        out.append(f"- {name}: higher on {wins} of {len(runs)} seeds; the 95% interval {seen} at {len(runs)} seeds.")
    out += [
        "- The TTT arm's learning rate was picked on validation contexts from a grid; PERK's rates start at "
        f"{INNER_LR:g} and are meta-learned. The base alone answers at chance, as it must "
        "(the question has no context).",
        "- Before this run, one 30-outer-step smoke run of seed 0 was looked at "
        "(PERK 29.9%, TTT 36.2%, no context 7.0%); no setting was changed after it.",
        "",
    ]
    out += [
        "Meta-training (seed 0): outer loss and inner loss at the first / last inner step, every 25 outer steps:",
        "",
        markdown_table(
            ["outer step", "outer (QA) loss", "inner loss, step 0", "inner loss, step 3"],
            [[str(i), f"{o:.3f}", f"{a:.3f}", f"{b:.3f}"] for i, o, a, b in runs[0]["curve"]],
        ),
        "",
        "Learned inner learning rates (mean over the LoRA tensors, per inner step), per seed: "
        + "; ".join(", ".join(f"{x:.3g}" for x in r["learned_lr"]["mean_per_step"]) for r in runs)
        + f" (initial {INNER_LR:g}).",
        "",
        "Memory XLA plans for one outer step (8 contexts; AOT "
        "`jit(step).lower(...).compile().memory_analysis()`, CPU):",
        "",
        markdown_table(
            ["meta-gradient", "temp (KiB)", "arguments (KiB)"],
            [[m["option"], f"{m['temp_bytes'] / 1024:.0f}", f"{m['arg_bytes'] / 1024:.0f}"] for m in mem],
        ),
        "",
        "Temporary memory relative to the full meta-gradient: "
        + ", ".join(f"{m['option']} {m['temp_bytes'] / mem[0]['temp_bytes']:.2f}×" for m in mem[1:])
        + ". Remat keeps the same gradient (tested); truncation and first-order change it.",
        "",
    ]
    return "\n".join(out)


PLOT_LINE = "\nPlot: `perk.png` (accuracy per arm, every seed a point).\n"


METHODS = ("perk", "ttt")


def parse_run(argv: list[str] | None) -> argparse.Namespace:
    """The flags of one run (the effects harness's launcher flags plus ``--method``)."""
    ap = harness_runner_parser(
        "python -m experiments.perk_toy",
        "one arm x one seed of PERK",
        METHODS,
        steps=META_STEPS,
        steps_help="outer (meta-training) steps of the perk arm",
        lr=META_LR,
        lr_help="perk: outer Adam lr; ttt: inner lr",
    )
    return parse_runner_args(ap, argv)


def run_one(args: argparse.Namespace) -> dict:
    """One arm of one seed; writes ``results.json``/``results.md`` into ``args.out_dir`` (see the module doc)."""
    t0 = time.time()
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)  # as the script's own runs (its env default)
    try:
        params, pre_loss, plain, test, val = setup(args.seed)
        results: dict = {"method": args.method, "seed": args.seed, "lr": args.lr, "pretrain_loss": pre_loss}
        if args.method == "perk":
            meta, curve = meta_train(params, plain, args.seed, args.steps, args.lr)
            results["meta_steps"] = args.steps
            results["no_context_test_accuracy"] = float(eval_all(params, meta, test, False))
            results["meta_curve"] = curve  # (outer step, outer loss, inner loss at step 0, at the last step)
        else:  # test-time training from the standard init at one constant inner lr
            meta = with_lr(plain, args.lr)
            results["meta_steps"] = 0
        results["val_accuracy"] = float(eval_all(params, meta, val, True))
        results["test_accuracy"] = float(eval_all(params, meta, test, True))
        results["base_no_context_test_accuracy"] = float(eval_all(params, plain, test, False))
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
    results["val_error"] = 1.0 - results["val_accuracy"]
    results["seconds"] = time.time() - t0
    if not all(math.isfinite(v) for v in results.values() if isinstance(v, float)):
        raise FloatingPointError(f"non-finite result: {results}")
    pct = lambda x: f"{100 * x:.1f}" if math.isfinite(x) else "—"  # noqa: E731
    row = [args.method, f"{args.lr:g}", str(results["meta_steps"]), pct(results["val_accuracy"])]
    row += [pct(results["test_accuracy"]), pct(results.get("no_context_test_accuracy", math.nan))]
    table = markdown_table(["arm", "lr", "meta steps", "val acc. %", "test acc. %", "no-context test acc. %"], [row])
    write_results(Path(args.out_dir), f"# PERK toy, one run (seed {args.seed})\n\n{table}\n", results)
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--method" in argv:  # one arm x one seed (the effects harness's runner)
        run_main(parse_run, run_one, argv)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meta-steps", type=int, default=META_STEPS)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report-only", action="store_true", help="rewrite perk.md from perk.json without running")
    args = p.parse_args(argv)
    if args.report_only:
        rec = json.loads((args.out / "perk.json").read_text())
        atomic.write_text(args.out / "perk.md", report(rec["runs"], rec["memory"], rec["wall_s"]) + PLOT_LINE)
        plot_adapters_as_data.perk(args.out / "perk.json")
        return
    t0 = time.time()
    runs = []
    for s in args.seeds:
        runs.append(run_seed(s, args.meta_steps))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}), flush=True)
    mem = memory()
    print(json.dumps(mem), flush=True)
    wall = time.time() - t0
    md = report(runs, mem, wall) + PLOT_LINE
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out / "perk.md", md)
    atomic.write_text(
        args.out / "perk.json", json.dumps({"runs": runs, "memory": mem, "wall_s": wall}, indent=1) + "\n"
    )
    plot_adapters_as_data.perk(args.out / "perk.json")
    print(md)


if __name__ == "__main__":
    main()
