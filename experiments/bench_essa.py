"""ESSA population evaluation: the default (automatically chunked) jit vs a loop over members, P = 8 / 32 / 128.

Same model for every row: a random-init tiny Llama (vocab 256, d 128, ffn 256, 2 layers, 4 heads),
LoRA r=8 alpha=16 on q/k/v/o/gate/up/down, ESSA product form (CMA-ES; d = 14 x 8 = 112 singular
values); each member is scored on the same 4 x 32-token prompt batch (minus the mean next-token
loss). Rows:

* default: ``jax.jit(essa.evaluate)`` with no ``member_chunk``: ``jax.lax.map`` over chunks of
  vmapped members, the chunk size chosen by `lorajax.es.essa.auto_member_chunk` from the estimated
  working set of one member (`lorajax.es.essa.member_bytes`) and ``CPU_CHUNK_BYTES``;
* one vmap: the same with ``member_chunk=P`` — every member in one ``jax.vmap`` (the default before);
* loop: one jitted single-member fitness, called P times from Python (the adapters of each member
  built inside the jit, as in the vmapped path);
* full generation: ``essa.step`` (ask + default evaluation + tell);
* int8 / bf16 base: the default evaluation over a `lorajax.quant` base (`lorajax.es.quant.quantize`: int8
  per output channel, or bf16 kernels), dequantised by each layer at use.

Timings: 1 warm-up call each, then the median of ``--repeats`` rounds; in each round every variant
of a population size is called once (round-robin, interleaved), so load changes on a shared machine
hit all alike; the 1-minute load average (``os.getloadavg()``) is recorded at the start of each round.
Memory: XLA's ``compiled.memory_analysis()`` temp (scratch) bytes of the evaluation program,
divided by P, and the marginal bytes per extra member between population sizes.

Command: ``python -m experiments.bench_essa [--repeats 5]`` (~2-3 min on 2 idle CPU cores; 5 min at load 8).
Writes ``experiments/results/bench_essa.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import lorajax
from experiments.report import markdown_table
from lorajax.es import ESSA, quant
from lorajax.es import essa as essa_mod
from lorajax.models import llama

POPS = (8, 32, 128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def medians(fns: dict, repeats: int, loads: list[float] | None = None) -> dict:
    """Median seconds per call of each function, measured round-robin (one call of each per round) so that
    load changes on a shared machine hit every variant alike; one warm-up call each first. The 1-minute
    load average at the start of each round is appended to ``loads``."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        if loads is not None:
            loads.append(os.getloadavg()[0])
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def temp_bytes(jitted, *args) -> int | None:
    try:
        return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory_analysis is backend-dependent
        return None


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="experiments/results/bench_essa.md")
    args = ap.parse_args(argv)

    cfg = llama.Config(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    model = llama.build(cfg)
    variables = model.init(jax.random.key(0), *llama.example_inputs(cfg))
    spec = lorajax.Spec("lora", rank=8, alpha=16, targets=TARGETS, init_weights=False)
    adapters = lorajax.init(spec, variables, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (4, 33), 0, cfg.vocab_size)
    fwd = quant.adapt(model.apply, spec)  # lorajax.adapt, factored; params quantised or not

    def reward(adapters, params, tokens):
        logits = fwd(params, adapters, tokens[:, :-1])
        return -optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    rows: list[list[str]] = []
    mem: dict[int, int | None] = {}
    info: dict[str, Any] = {"quant": [], "loads": []}
    qparams = {"int8": quant.quantize(variables, "int8"), "bf16": quant.quantize(variables, "bfloat16")}
    for p in POPS:
        essa = ESSA(spec, variables, adapters, population_size=p)
        state = essa.init(jax.random.key(3))
        pop, state = essa.ask(state, jax.random.key(4))
        evaluate = jax.jit(essa.evaluate, static_argnums=2)
        chunk = essa.chunk_size(state, pop, reward, variables, tokens)
        if p == POPS[0]:
            info["member_bytes"] = essa_mod.member_bytes(essa._one(state, reward, (variables, tokens)), pop[0])
        whole = ESSA(spec, variables, adapters, population_size=p, member_chunk=p)
        ev_whole = jax.jit(whole.evaluate, static_argnums=2)
        one = jax.jit(lambda g, params, tokens: reward(essa.to_adapters(state.frozen, g), params, tokens))
        fns: dict[str, Callable[[], Any]] = {
            "default": lambda: evaluate(state, pop, reward, variables, tokens),
            "vmap": lambda: ev_whole(state, pop, reward, variables, tokens),
            "loop": lambda: [one(pop[i], variables, tokens) for i in range(p)],
            "step": lambda: essa.step(state, jax.random.key(5), reward, variables, tokens),
            **{q: functools.partial(evaluate, state, pop, reward, qp, tokens) for q, qp in qparams.items()},
        }
        loads: list[float] = []
        t = medians(fns, args.repeats, loads)
        info["loads"].append(f"P={p}: {', '.join(f'{x:.1f}' for x in loads)}")
        mem[p] = m = temp_bytes(ev_whole, state, pop, reward, variables, tokens)
        info[f"default_temp_{p}"] = temp_bytes(evaluate, state, pop, reward, variables, tokens)
        if p == POPS[0]:
            info["loop_temp"] = temp_bytes(one, pop[0], variables, tokens)
            info["d"] = essa.num_dims
        rows.append(
            [
                str(p),
                str(chunk) + ("" if p % chunk == 0 else f" (+{-p % chunk} padded)"),
                f"{p / t['default']:,.0f}",
                f"{p / t['vmap']:,.0f}",
                f"{p / t['loop']:,.0f}",
                f"**{t['loop'] / t['default']:.2f}x**",
                f"{t['loop'] / t['vmap']:.2f}x",
                f"{p / t['step']:,.0f}",
                f"{statistics.median(loads):.1f} ({min(loads):.1f}-{max(loads):.1f})",
                f"{m / p / 2**20:.2f} MiB" if m is not None else "n/a",
            ]
        )
        for q in qparams:
            info["quant"].append([str(p), q, f"{p / t[q]:,.0f}", f"{t['default'] / t[q]:.2f}x"])
        print(rows[-1], flush=True)

    # the strategies' own cost per generation (genome-only reward, after 3 generations so that
    # CMA-ES's covariance is no longer the identity)
    strat_rows = []
    for strat in ("cma_es", "sep_cma_es", "open_es"):
        e = ESSA(spec, variables, adapters, population_size=32, strategy=strat, fitness_input="genome")
        st = e.init(jax.random.key(0))
        for g in range(3):
            st, _ = e.step(st, jax.random.key(g), lambda x: -jnp.sum(x**2))
        ask = jax.jit(e.ask)
        tell = jax.jit(e.tell)
        pop, st2 = ask(st, jax.random.key(9))
        fit = -jnp.sum(pop**2, -1)
        t = medians(
            {"ask": lambda: ask(st, jax.random.key(9)), "tell": lambda: tell(st2, jax.random.key(8), pop, fit)},
            args.repeats,
        )
        strat_rows.append([strat, f"{t['ask'] * 1e3:.2f} ms", f"{t['tell'] * 1e3:.2f} ms"])
    stable = markdown_table(["strategy (evosax), P=32", "ask", "tell"], strat_rows)

    marg = []
    for a, b in zip(POPS, POPS[1:]):
        mem_a, mem_b = mem[a], mem[b]
        if mem_a is not None and mem_b is not None:
            marg.append(f"{a}->{b}: {(mem_b - mem_a) / (b - a) / 2**20:.2f} MiB per extra member")
    base_bytes, int8_bytes = quant.nbytes(variables), quant.nbytes(qparams["int8"])
    table = markdown_table(
        [
            "population",
            "chunk (auto)",
            "members/s default",
            "members/s one vmap",
            "members/s loop",
            "default / loop",
            "one vmap / loop",
            "members/s full generation (ask+eval+tell)",
            "load avg, median (min-max)",
            "one-vmap temp memory / member",
        ],
        rows,
    )
    chunk_mem = "; ".join(
        f"P={p}: {info[f'default_temp_{p}'] / 2**20:.1f} MiB total"
        for p in POPS
        if info.get(f"default_temp_{p}") is not None
    )
    qtable = markdown_table(["population", "base", "members/s default", "vs float32 base"], info["quant"])
    loop_temp = info["loop_temp"]
    text = f"""# ESSA: population evaluation (default: automatic chunks) vs a loop over members

{__doc__.split(chr(10), 1)[1].split("Command:")[0].strip()}

Device: {jax.devices()[0].device_kind} ({jax.device_count()} device), jax {jax.__version__};
genome d = {info["d"]}; {args.repeats} timed calls per cell. One run on a shared 2-core machine
that a background job kept loaded (1-minute load average per round in the table and below; 2 cores):
read the ratios, not the absolute rates.

{table}

- Load average at the start of each round: {"; ".join(info["loads"])}.
- Automatic chunk: one member's estimated working set (peak live member-dependent bytes of the fitness
  jaxpr) {info["member_bytes"] / 2**20:.2f} MiB; budget `CPU_CHUNK_BYTES` = {essa_mod.CPU_CHUNK_BYTES / 2**20:.0f} MiB.
- Marginal scratch memory of one vmap: {"; ".join(marg) or "n/a"}.
- Default (chunked) evaluation scratch: {chunk_mem or "n/a"}.
- Loop path: one member's compiled fitness needs {loop_temp / 2**20 if loop_temp else float("nan"):.2f} MiB
  scratch (reused across the P calls).
- Base params: float32 {base_bytes / 2**20:.2f} MiB, int8 {int8_bytes / 2**20:.2f} MiB
  (embeddings stay float32).

The strategies' own cost per generation (d = {info["d"]}; CMA-ES's ask eigendecomposes the d x d
covariance, which is what separates the "full generation" column from the evaluation at small P):

{stable}

Reduced-precision base (default evaluation, same members):

{qtable}

On CPU each int8 layer converts its codes (times their scales) to a float32 weight before the matmul
(one fused elementwise pass per call), which costs time rather than saving it; the benefit of
weight-only quantisation is memory (and bandwidth on accelerators).
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
