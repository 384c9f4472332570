"""Scale beyond this machine by simulation: AOT-compile sharded train steps of Llama-3 8B / 70B.

No weights, no training: every array is a ``jax.ShapeDtypeStruct`` with the sharding
`lorajax.sharding` gives it; ``jax.jit(step).lower(...).compile()`` runs XLA's SPMD
partitioner for a fake CPU mesh (``--xla_force_host_platform_device_count``), and
``compiled.memory_analysis()`` reports the per-device bytes (arguments, outputs, temporaries).
Beside it the analytic estimate: weights / fsdp + adapter and optimiser state + activations.

The real depth (32 or 80 unrolled layers) is compiled: 20–110 s per step on 2 CPU cores for every
mesh here, once XLA's propagation gathers weights rather than activations (``token_sharding``).
``--extrapolate`` instead compiles 2 and 4 layers (``--layers-fit``) and extrapolates linearly
(``m(L) = m(2) + (L − 2)·(m(4) − m(2))/2``), a quick look only: XLA:CPU's scheduler changes its
decisions with depth, and with ``remat`` the extrapolation was wrong by far (even negative).

Protocol: bf16 base weights, LoRA r=16 (alpha 32) on all seven projections with f32 factors and
Adam (f32 moments), or full fine-tuning with Adam (moments in the params' bf16); one sequence
of ``--seq`` tokens per device (global batch = devices), mesh ``fsdp=N`` (weights and batch over
all devices; pure FSDP minimises memory); each step without and with ``remat`` (activation
checkpointing per decoder layer).
CPU compilation only: these are XLA's buffer-assignment numbers for the CPU backend, close to but
not the same as a TPU/GPU compile; nothing here is timed.

Command: ``python -m experiments.bench_scale`` (each mesh size runs in its own subprocess).
Writes ``experiments/results/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GIB = 2**30
MODELS = {
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    ),
    "llama3-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    ),
}
# XLA:CPU's default scheduler trades memory for concurrency (it hoisted remat's recomputation and kept
# activations alive: remat measured *more* memory); the memory-minimising one is closer to what the TPU/GPU
# backends' memory-aware schedulers do. Measured on llama3-8b at 4 layers, seq 1024, 8 devices: temp
# 8.19 -> 7.91 GiB without remat, 9.27 -> 4.16 GiB with remat.
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


def _abstract_setup(model_name: str, devices: int, seq: int, layers: int | None) -> tuple:
    """``(cfg_kw, cfg, model, tokens, params, place, ce)`` on an ``fsdp=devices`` mesh, every array abstract.

    ``model``: bf16 weights, hidden states pinned by ``token_sharding`` (without it XLA's propagation gathers
    activations, not weights); ``place(tree, like=None)`` gives a tree its `lorajax.sharding` shardings as
    ``ShapeDtypeStruct``s; ``ce(logits, batch)`` is the mean next-token loss in float32.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from lorajax import sharding
    from lorajax.models import llama

    cfg_kw: dict[str, Any] = dict(MODELS[model_name])
    if layers is not None:
        cfg_kw["num_hidden_layers"] = layers
    cfg = llama.Config(**cfg_kw, architectures=("LlamaForCausalLM",))
    mesh = sharding.make_mesh(f"fsdp={devices}")
    model = llama.LlamaForCausalLM(cfg, param_dtype=jnp.bfloat16, token_sharding=sharding.token_sharding(mesh))
    tokens = jax.ShapeDtypeStruct((devices, seq + 1), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])

    def place(tree, like=None):
        sh = sharding.shardings(tree, mesh, like=like)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

    def ce(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch[:, 1:]).mean()

    return cfg_kw, cfg, model, tokens, params, place, ce


#: ``scale.md``'s configurations: row suffix -> (LlamaForCausalLM kwargs, chunked cross-entropy); "levers" is
#: the library's memory recipe (`LEVERS`' last row): remat, bf16 compute, blockwise attention (the default),
#: scanned layers and the chunked vocabulary cross-entropy
RECIPES: dict[str, tuple[dict[str, Any], bool]] = {
    "plain": ({}, False),
    "remat": ({"remat": True}, False),
    "levers": ({"remat": "nothing_saveable", "dtype": "bfloat16", "scan_layers": True}, True),
}
_SUFFIX = {"plain": "", "remat": " + remat", "levers": " + remat, bf16, scan, chunked CE"}


def measure(model_name: str, devices: int, seq: int, layers: int | None, recipes=tuple(RECIPES)) -> list[dict]:
    """In a process with ``devices`` fake CPU devices: compile LoRA and full steps, return memory rows."""
    import jax
    import jax.numpy as jnp
    import optax

    import lorajax
    from lorajax.models import llama

    cfg_kw, cfg, plain, tokens, params, place, ce = _abstract_setup(model_name, devices, seq, layers)

    def chunked_ce(h_BxSxD, p, batch):
        h_TxD = h_BxSxD.reshape(-1, cfg.hidden_size)
        w = llama.output_kernel(cfg, p)
        return lorajax.train.losses.chunked_cross_entropy(h_TxD, w, batch[:, 1:].reshape(-1), chunk=1024)

    rows = []
    p_sds = place(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    spec = lorajax.Spec("lora", rank=RANK, alpha=ALPHA, targets=TARGETS, dtype="float32")
    adapters = jax.eval_shape(lambda p: lorajax.init(spec, p, 0), params)
    tx = optax.adam(1e-4)
    a_sds = place(adapters, like=params)
    o_sds = place(jax.eval_shape(tx.init, adapters), like=params)
    empty = jax.tree.map(lambda _: None, adapters)
    opt_full = place(jax.eval_shape(tx.init, params), like=params)
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))

    for recipe in recipes:
        kw, chunked = RECIPES[recipe]
        m = plain.clone(**{k: (jnp.dtype(v) if k == "dtype" else v) for k, v in kw.items()})
        tag = _SUFFIX[recipe]
        fwd = lorajax.adapt(m.apply, spec, mode="factored")

        def lora_loss(p, a, batch, fwd=fwd, chunked=chunked):
            if chunked:
                return chunked_ce(fwd({"params": p}, a, batch[:, :-1], return_hidden=True), p, batch)
            return ce(fwd({"params": p}, a, batch[:, :-1]), batch)

        step = lorajax.train.make_lora_step(lora_loss, tx, jit=False)
        t0 = time.perf_counter()
        # abstract state for .lower(): a ShapeDtypeStruct stands in for the step array
        state = lorajax.train.TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),  # type: ignore[arg-type]
            trainable=a_sds,
            frozen=empty,
            opt_state=o_sds,
        )
        compiled = jax.jit(step, donate_argnums=(1,)).lower(p_sds, state, tokens).compile()
        rows.append(
            _row(
                f"LoRA r=16{tag}",
                model_name,
                cfg_kw,
                devices,
                seq,
                compiled,
                time.perf_counter() - t0,
                n_params,
                n_adapter,
                full=False,
            )
        )

        def full_loss(_, p, batch, m=m, chunked=chunked):
            if chunked:
                return chunked_ce(m.apply({"params": p}, batch[:, :-1], return_hidden=True), p, batch)
            return ce(m.apply({"params": p}, batch[:, :-1]), batch)

        full_step = lorajax.train.make_lora_step(full_loss, tx, jit=False)
        t0 = time.perf_counter()
        # abstract state for .lower(): a ShapeDtypeStruct stands in for the step array
        state = lorajax.train.TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),  # type: ignore[arg-type]
            trainable=p_sds,
            frozen=jax.tree.map(lambda _: None, params),
            opt_state=opt_full,
        )
        compiled = jax.jit(full_step, donate_argnums=(1,)).lower(None, state, tokens).compile()
        rows.append(
            _row(
                f"full FT{tag}",
                model_name,
                cfg_kw,
                devices,
                seq,
                compiled,
                time.perf_counter() - t0,
                n_params,
                n_params,
                full=True,
            )
        )
    return rows


#: ``--levers``: LoRA r=16 steps with the memory levers added one at a time (label, LlamaForCausalLM kwargs).
#: "before" is the model as it was before the levers existed: dense attention, and f32 compute wherever the
#: f32 adapters promote the bf16 activations.
LEVERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("LoRA, before: dense attention, no remat, f32 adapters promote", dict(attention="dense")),
    ("+ remat (nothing_saveable)", dict(attention="dense", remat="nothing_saveable")),
    ("+ bf16 compute (adapters cast to bf16)", dict(attention="dense", remat="nothing_saveable", dtype="bfloat16")),
    ("+ blockwise causal attention (library default)", dict(remat="nothing_saveable", dtype="bfloat16")),
    ("+ chunked vocabulary cross-entropy (1024 tokens)", dict(remat="nothing_saveable", dtype="bfloat16")),
    (
        "+ layers scanned (lax.scan, one layer recomputed per backward iteration)",
        dict(remat="nothing_saveable", dtype="bfloat16", scan_layers=True),
    ),
)
#: `LEVERS` rows whose loss is `lorajax.train.losses.chunked_cross_entropy` over the hidden states
CHUNKED_CE = {4, 5}


def measure_levers(model_name: str, devices: int, seq: int, layers: int | None, only: list[int]) -> list[dict]:
    """In a process with ``devices`` fake CPU devices: the LoRA step with each `LEVERS` entry (indices ``only``)."""
    import jax
    import jax.numpy as jnp
    import optax

    import lorajax
    from lorajax.models import llama

    cfg_kw, cfg, base, tokens, params, place, ce = _abstract_setup(model_name, devices, seq, layers)

    spec = lorajax.Spec("lora", rank=RANK, alpha=ALPHA, targets=TARGETS, dtype="float32")
    adapters = jax.eval_shape(lambda p: lorajax.init(spec, p, 0), params)
    tx = optax.adam(1e-4)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    rows = []
    for i in only:
        label, levers = LEVERS[i]
        kw: dict[str, Any] = {k: (jnp.dtype(v) if k == "dtype" else v) for k, v in levers.items()}
        m = base.clone(**kw)
        fwd = lorajax.adapt(m.apply, spec, mode="factored")

        def lora_loss(p, a, batch, fwd=fwd):
            return ce(fwd({"params": p}, a, batch[:, :-1]), batch)

        def chunked_loss(p, a, batch, fwd=fwd):
            h = fwd({"params": p}, a, batch[:, :-1], return_hidden=True)
            h_TxD = h.reshape(-1, cfg.hidden_size)
            w = llama.output_kernel(cfg, p)
            return lorajax.train.losses.chunked_cross_entropy(h_TxD, w, batch[:, 1:].reshape(-1), chunk=1024)

        step = lorajax.train.make_lora_step(chunked_loss if i in CHUNKED_CE else lora_loss, tx, jit=False)
        state = lorajax.train.TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),  # type: ignore[arg-type]
            trainable=place(adapters, like=params),
            frozen=jax.tree.map(lambda _: None, adapters),
            opt_state=place(jax.eval_shape(tx.init, adapters), like=params),
        )
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(1,)).lower(place(params), state, tokens).compile()
        seconds = time.perf_counter() - t0
        rows.append(_row(label, model_name, cfg_kw, devices, seq, compiled, seconds, n_params, n_adapter, False))
    return rows


def _row(method, model_name, cfg, devices, seq, compiled, compile_s, n_params, n_train, full) -> dict:
    m = compiled.memory_analysis()
    measured = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    d, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    weights = 2 * n_params / devices
    if full:  # bf16 params + bf16 Adam moments + bf16 gradients
        state = 3 * 2 * n_train / devices
    else:  # f32 factors + f32 Adam moments + f32 gradients, split along the weights' fsdp axis
        state = 4 * 4 * n_train / devices
    # activations kept for the backward pass, per token and layer (Korthikanti et al. 2022, no recompute,
    # 16-bit): 34·d + 5·heads·seq bytes (the second term: attention scores, softmax, dropout mask);
    # lorajax's Llama computes in f32 (bf16 weights are promoted), so x2; + the f32 logits and softmax
    heads = cfg["num_attention_heads"]
    acts = seq * (2 * (34 * d + 5 * heads * seq) * layers + 8 * v)
    return {
        "model": model_name,
        "layers": layers,
        "method": method,
        "devices": devices,
        "seq": seq,
        "measured_gib": measured / GIB,
        "temp_gib": m.temp_size_in_bytes / GIB,
        "args_gib": m.argument_size_in_bytes / GIB,
        "formula_gib": (weights + state + acts) / GIB,
        "weights_gib": weights / GIB,
        "state_gib": state / GIB,
        "acts_gib": acts / GIB,
        "compile_s": compile_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--extrapolate", action="store_true", help="compile --layers-fit depths and extrapolate (quick)")
    ap.add_argument("--layers-fit", type=int, nargs=2, default=[2, 4], help="depths for --extrapolate")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "DEVICES"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--levers",
        type=int,
        nargs="*",
        default=None,
        help="LoRA step with the memory levers added one by one (indices into LEVERS; none given: all); "
        "writes --levers-out",
    )
    ap.add_argument("--levers-out", default="experiments/results/scale_levers.md")
    ap.add_argument(
        "--recipes",
        nargs="+",
        choices=list(RECIPES),
        default=list(RECIPES),
        help="scale.md configurations to compile (rows of other configurations are kept from scale.json)",
    )
    ap.add_argument("--out", default="experiments/results/scale.md")
    args = ap.parse_args()
    if args.levers is not None and not args.levers:
        args.levers = list(range(len(LEVERS)))
    if args.worker:
        if args.levers is not None:
            rows = measure_levers(args.worker[0], int(args.worker[1]), args.seq, args.layers, args.levers)
        else:
            rows = measure(args.worker[0], int(args.worker[1]), args.seq, args.layers, args.recipes)
        print("ROWS " + json.dumps(rows))
        return
    if args.levers is not None:
        return run_levers(args)
    store = Path(args.out).with_suffix(".json")  # rows of earlier runs, merged by (model, devices, method)
    rows = [] if args.extrapolate or not store.is_file() else json.loads(store.read_text())
    depths = list(args.layers_fit) if args.extrapolate else [None]
    for name in args.models:
        for n in args.devices:
            runs = []
            for depth in depths:
                env = {
                    **os.environ,
                    "XLA_FLAGS": f"--xla_force_host_platform_device_count={n} {SCHEDULER_FLAG}",
                    "JAX_PLATFORMS": "cpu",
                }
                cmd = [
                    sys.executable,
                    "-m",
                    "experiments.bench_scale",
                    "--worker",
                    name,
                    str(n),
                    "--seq",
                    str(args.seq),
                    "--recipes",
                    *args.recipes,
                ] + (["--layers", str(depth)] if depth else [])
                print("compiling", name, "on", n, "devices,", depth or "all", "layers ...", flush=True)
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    break
                runs.append(json.loads(proc.stdout.split("ROWS ", 1)[1]))
            else:
                new = runs[0] if len(runs) == 1 else extrapolate(runs, MODELS[name]["num_hidden_layers"])
                keys = {(r["model"], r["devices"], r["method"]) for r in new}
                rows = [r for r in rows if (r["model"], r["devices"], r["method"]) not in keys] + new
                order = [f"{kind}{_SUFFIX[r]}" for r in RECIPES for kind in ("LoRA r=16", "full FT")]
                rows.sort(key=lambda r: (list(MODELS).index(r["model"]), r["devices"], order.index(r["method"])))
                if not args.extrapolate:
                    store.write_text(json.dumps(rows, indent=1))
                write(rows, Path(args.out), args)  # after every mesh: a stopped run keeps what it measured


def run_levers(args) -> None:
    """Each (model, devices, lever) compiled in its own subprocess (a compile's memory is freed with it)."""

    out = Path(args.levers_out)
    store = out.with_suffix(".json")  # rows of earlier runs, merged by (model, layers, devices, lever)
    rows: list[dict] = json.loads(store.read_text()) if store.is_file() else []
    for name in args.models:
        for n in args.devices:
            for i in args.levers:
                env = {
                    **os.environ,
                    "XLA_FLAGS": f"--xla_force_host_platform_device_count={n} {SCHEDULER_FLAG}",
                    "JAX_PLATFORMS": "cpu",
                }
                cmd = [sys.executable, "-m", "experiments.bench_scale", "--worker", name, str(n)]
                cmd += ["--seq", str(args.seq), "--levers", str(i)]
                cmd += ["--layers", str(args.layers)] if args.layers else []
                print("compiling", name, "on", n, "devices:", LEVERS[i][0], flush=True)
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    continue
                for new in json.loads(proc.stdout.split("ROWS ", 1)[1]):
                    key = (new["model"], new["layers"], new["devices"], new["method"])
                    rows = [r for r in rows if (r["model"], r["layers"], r["devices"], r["method"]) != key] + [new]
                write_levers(rows, out, args.seq)


def write_levers(rows: list[dict], out: Path, seq: int) -> None:
    """``out`` (``scale_levers.md``) and its ``.json`` from ``rows``; hand notes after the table are kept."""
    from experiments.report import markdown_table

    store = out.with_suffix(".json")
    order = [label for label, _ in LEVERS]
    rows.sort(key=lambda r: (list(MODELS).index(r["model"]), r["devices"], order.index(r["method"])))
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(rows, indent=1))
    table = markdown_table(
        ["model", "layers", "devices", "LoRA r=16 step", "measured GiB/device", "of which temp",
         "fits 16 GiB", "fits 40 GiB", "compile s"],
        [
            [r["model"], str(r["layers"]), str(r["devices"]), r["method"], f"{r['measured_gib']:.2f}",
             f"{r['temp_gib']:.2f}", "yes" if r["measured_gib"] <= 16 else "no",
             "yes" if r["measured_gib"] <= 40 else "no", f"{r['compile_s']:.0f}"]
            for r in rows
        ],
    )  # fmt: skip
    marker = "\nNotes (by hand"  # notes written after a run are kept across re-runs
    old = out.read_text() if out.is_file() else ""
    notes = old[old.index(marker) :] if marker in old else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Memory levers of the sharded LoRA step (Llama-3 8B / 70B, AOT on fake CPU meshes)\n\n"
        "Command: `python -m experiments.bench_scale --levers [INDEX ...] --models MODEL --devices N "
        f"--seq {seq}` (each run adds or replaces its rows; the others are kept from "
        "`scale_levers.json`). Same protocol as `scale.md` "
        "(bf16 weights, LoRA r=16 on the seven projections with f32 factors and f32 Adam, one "
        f"{seq}-token sequence per device, mesh `fsdp=N`, `token_sharding`, XLA:CPU's "
        "memory-minimising scheduler, the real depth); each row adds one lever to the row above it "
        "(`LEVERS` in experiments/bench_scale.py). measured = arguments + outputs − donated aliases + "
        "temporaries of `compiled.memory_analysis()` (CPU buffer assignment; a TPU/GPU compile "
        f"differs).\n\n{table}\n{notes}"
    )
    print(table, flush=True)


def extrapolate(runs: list[list[dict]], depth: int) -> list[dict]:
    """Rows at ``depth`` layers from two compiled depths, linear in the layer count."""
    out = []
    for a, b in zip(*runs):
        la, lb = a["layers"], b["layers"]
        row = dict(b, layers=depth, extrapolated_from=(la, lb))
        # measured bytes, and the formula's terms (also linear in depth)
        for k in ("measured_gib", "temp_gib", "args_gib", "formula_gib", "weights_gib", "state_gib", "acts_gib"):
            row[k] = a[k] + (depth - la) * (b[k] - a[k]) / (lb - la)
        row["compile_s"] = a["compile_s"] + b["compile_s"]
        out.append(row)
    return out


def write(rows: list[dict], out: Path, args) -> None:
    from experiments.report import markdown_table

    table = markdown_table(
        [
            "model",
            "method",
            "devices",
            "measured GiB/device",
            "of which temp",
            "formula GiB/device",
            "weights",
            "adapter+opt state",
            "activations",
            "fits 16 GiB",
            "fits 95 GiB",
            "compile s",
        ],
        [
            [
                r["model"]
                + (
                    f" (extrapolated from {r['extrapolated_from'][0]},{r['extrapolated_from'][1]} layers)"
                    if "extrapolated_from" in r
                    else ""
                ),
                r["method"],
                str(r["devices"]),
                f"{r['measured_gib']:.2f}",
                f"{r['temp_gib']:.2f}",
                f"{r['formula_gib']:.2f}",
                f"{r['weights_gib']:.2f}",
                f"{r['state_gib']:.2f}",
                f"{r['acts_gib']:.2f}",
                "yes" if r["measured_gib"] <= 16 else "no",
                "yes" if r["measured_gib"] <= 95 else "no",
                f"{r['compile_s']:.0f}",
            ]
            for r in rows
        ],
    )
    marker = "\nNotes (by hand"  # notes written after a run are kept across re-runs
    old = out.read_text() if out.is_file() else ""
    notes = old[old.index(marker) :] if marker in old else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Sharded train steps of Llama-3 8B / 70B, AOT-compiled on fake CPU meshes\n\n"
        f"Command: `python -m experiments.bench_scale --devices {' '.join(map(str, args.devices))} --seq {args.seq}"
        f"{' --extrapolate' if args.extrapolate else ''}` (2-core CPU, compile only, "
        f"{'depth extrapolated, see the module docstring' if args.extrapolate else 'the real depth'}; XLA:CPU's "
        "memory-minimising scheduler, `SCHEDULER_FLAG`). "
        f"Mesh `fsdp=N`, one {args.seq}-token sequence per device, bf16 weights, LoRA r={RANK} on q,k,v,o,gate,up,down "
        "(f32 factors, f32 Adam) vs full fine-tuning (Adam, bf16 moments); '+ remat' rows recompute each "
        "decoder layer in the backward pass; '+ remat, bf16, scan, chunked CE' rows add the library's other "
        "memory levers (`RECIPES`; one at a time in `scale_levers.md`): bf16 compute, blockwise attention, the "
        "layers as one `lax.scan` (`scan_layers`) and the chunked vocabulary cross-entropy. Hidden states are "
        "pinned to the batch axes at every layer boundary (`token_sharding`): without that, XLA's propagation "
        "gathered the activations instead of the FSDP weights "
        "and the per-device memory grew with the device count (8B LoRA: 95 GiB on 8 devices, 203 GiB on 64).\n\n"
        "measured = arguments + outputs − donated aliases + temporaries from `compiled.memory_analysis()` "
        "(XLA CPU buffer assignment; a TPU/GPU compile differs in layout and fusion). formula = weights/N + "
        "trainable state/N + activations (2 x (34·d + 5·heads·seq) bytes per token per layer, f32 compute, + f32 "
        "logits), an estimate.\n\n"
        f"{table}\n\nNo GPU or TPU was available to this task: no step times are reported.\n{notes}"
    )
    print(table, flush=True)


if __name__ == "__main__":
    main()
