"""pallas_kernels vs their XLA baselines, same run, on the backend jax finds.

Each kernel is timed beside its XLA (jnp, ``jit``) baseline on the same inputs
and the ratio ``XLA time / kernel time`` is reported (> 1: the kernel is
faster). On CPU the kernels can only run in Pallas interpret mode (a ``jit``
of a scan over the grid), so their times and ratios there measure the
interpreter, not the kernel: the tables mark them correctness-only. The XLA
baselines are real on any backend; on CPU the multi-adapter section compares
the XLA forms of a heterogeneous batch (per-sequence gather + batched matmul,
per-token gather, ``lax.ragged_dot``, a loop over adapters) with one adapter
for the whole batch and with the plain matmul.

The LoRA linear's forward+backward row runs every product as a Pallas kernel
(forward emitting ``x A``; ``dx`` by the fused kernel emitting ``dy Bᵀ``; the
``dA`` and ``dB`` reductions), no ``dW``.

Shapes (performance.md §2.4, §5.2): LoRA linear T=2048 x 512 -> 512, r=16;
multi-adapter T=2048 tokens = 64 requests x 32, d=512, r=16, 64 adapters;
Flash-LoRA-Attention 4 agents sharing one base cache, 256 queries and keys,
8 heads of 64, r=8. float32.

Timing is interleaved: within a section every implementation is compiled and
called once more untimed, then ``--rounds`` rounds each time every
implementation once (the order rotates by one each round; one timing is a
burst of back-to-back calls of about ``--burst-ms``, reported per call), and
the 1-minute load average is read once per round. A time is the median over
the rounds; a ratio is taken per round (same round, same load) and its median
reported.

Command: ``python -m experiments.bench_kernels [--rounds 30] [--only multi]``
(~2 min on 2 busy CPU cores; ``--only multi --rounds 60``
~2.5 min). Writes ``experiments/results/bench_kernels.md``;
with ``--only`` only the named sections of that file are replaced (the others
are kept as they are).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from experiments.report import markdown_table

T, D, R, SEQS, ADAPTERS = 2048, 512, 16, 64, 64
ATT_B, ATT_S, ATT_H, ATT_D, ATT_R = 4, 256, 8, 64, 8
SECTIONS = ("linear", "multi", "attention")
HEADINGS = {
    "linear": "## LoRA linear: Pallas kernel vs XLA",
    "multi": "## Multi-adapter batch: 64 distinct adapters vs one adapter",
    "attention": "## Flash-LoRA-Attention: Pallas kernel vs XLA",
}
OUT = "experiments/results/bench_kernels.md"


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, burst_ms: float
) -> tuple[dict[str, list[float]], list[float]]:
    """Per-round times (ms per call) of every ``fns`` entry, timed once per round, and the load per round.

    One timing is a burst of back-to-back calls lasting about ``burst_ms`` (at least one call; the count
    is fixed per implementation from its untimed second call), so that a ~10 ms call is not one sample
    of the scheduler's noise.
    """
    calls = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn())  # compile
        t0 = time.perf_counter()
        jax.block_until_ready(fn())  # one more untimed call, which sizes the burst
        calls[name] = max(1, min(50, math.ceil(burst_ms / (1e3 * (time.perf_counter() - t0)))))
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    loads = []
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                jax.block_until_ready(fns[name]())
            times[name].append(1e3 * (time.perf_counter() - t0) / calls[name])
        loads.append(os.getloadavg()[0])
    return times, loads


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[i] / den[i]`` (times: > 1 means ``den`` is faster)."""
    return statistics.median(n / d for n, d in zip(num, den))


def load_text(loads: list[float]) -> str:
    return f"{min(loads):.1f}-{max(loads):.1f} (median {med(loads):.1f})"


def max_rel_err(out, ref) -> float:
    out = jax.tree.leaves(out)
    ref = jax.tree.leaves(ref)
    return max(
        float(
            jnp.max(jnp.abs(o.astype(jnp.float32) - r.astype(jnp.float32)))
            / max(float(jnp.max(jnp.abs(r.astype(jnp.float32)))), 1e-12)
        )
        for o, r in zip(out, ref)
    )


KERNEL_HEADER = ["kernel", "shape", "XLA baseline", "XLA ms", "kernel ms", "XLA / kernel", "max rel. error"]


def run_info(rounds: int, burst_ms: float, loads: list[float]) -> str:
    return (
        f"{rounds} interleaved rounds, one timing of each implementation per round (a ~{burst_ms:.0f} ms burst "
        f"of calls, time per call); 1-minute load average over the rounds {load_text(loads)} "
        f"on {os.cpu_count()} cores (shared machine: absolute times are noisy, same-round ratios less so).\n\n"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="interleaved timed rounds per section (after 2 untimed)")
    p.add_argument("--burst-ms", type=float, default=100.0, help="length of one timing (back-to-back calls)")
    p.add_argument("--only", default=None, help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    p.add_argument("--out", default=OUT, help="Markdown output")
    args = p.parse_args(argv)
    only = SECTIONS if args.only is None else tuple(s.strip() for s in args.only.split(","))
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}; choose from {SECTIONS}")

    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    mode = pk.resolve_mode("bench", None)
    interp = mode == "interpret"
    kernel_mode = (
        "Pallas interpret (correctness only)"
        if interp
        else f"Pallas compiled ({backend})"
        if mode == "compiled"
        else "jnp reference fallback"
    )
    rng = np.random.default_rng(0)
    f32 = lambda *shape, s=1.0: jnp.asarray(rng.standard_normal(shape) * s, jnp.float32)  # noqa: E731
    blocks: dict[str, str] = {}

    def kratio(r: float) -> str:
        return f"{r:.2f}x (interpret: not a speed)" if interp else f"{r:.2f}x"

    # --- 1. fused LoRA linear, forward and forward+backward (dx, dA, dB)
    x, w = f32(T, D), f32(D, D, s=D**-0.5)
    a, b = f32(D, R, s=D**-0.5), f32(R, D, s=0.1)
    if "linear" in only:
        ref_fwd = jax.jit(lambda x, a, b: pk.lora_linear_reference(x, w, a, b, 2.0))
        ker_fwd = jax.jit(lambda x, a, b: pk.lora_linear(x, w, a, b, 2.0))

        def grad_of(fn):
            return jax.jit(jax.grad(lambda x, a, b: jnp.sum(fn(x, w, a, b, 2.0) ** 2), argnums=(0, 1, 2)))

        ref_bwd, ker_bwd = grad_of(pk.lora_linear_reference), grad_of(pk.lora_linear)
        fns = {
            "ref fwd": lambda: ref_fwd(x, a, b),
            "ker fwd": lambda: ker_fwd(x, a, b),
            "ref bwd": lambda: ref_bwd(x, a, b),
            "ker bwd": lambda: ker_bwd(x, a, b),
        }
        times, loads = interleaved(fns, args.rounds, args.burst_ms)
        rows = []
        for what, base, key, rf, kf in (
            ("fwd", "x W + s (x A) B (jnp)", "fwd", ref_fwd, ker_fwd),
            ("fwd+bwd (dx, dA, dB)", "jax.grad of the same (jnp)", "bwd", ref_bwd, ker_bwd),
        ):
            xla, ker = times[f"ref {key}"], times[f"ker {key}"]
            rows.append(
                [
                    f"lora_linear {what}",
                    f"{T}x{D}->{D}, r={R}",
                    base,
                    f"{med(xla):.2f}",
                    f"{med(ker):.2f}",
                    kratio(ratio(xla, ker)),
                    f"{max_rel_err(kf(x, a, b), rf(x, a, b)):.1e}",
                ]
            )
        blocks["linear"] = run_info(args.rounds, args.burst_ms, loads) + markdown_table(KERNEL_HEADER, rows) + "\n"

    # --- 2. multi-adapter batch: 64 requests x 32 tokens, 64 distinct adapters
    if "multi" in only:
        tok = T // SEQS
        x3 = f32(SEQS, tok, D)
        a_pool, b_pool = f32(ADAPTERS, D, R, s=D**-0.5), f32(ADAPTERS, R, D, s=0.1)
        scales = jnp.asarray(rng.uniform(0.5, 2.0, ADAPTERS), jnp.float32)
        seq_ids_np = rng.permutation(SEQS) % ADAPTERS
        seq_ids = jnp.asarray(seq_ids_np, jnp.int32)
        tok_ids = jnp.repeat(seq_ids, tok)
        x2 = x3.reshape(T, D)
        row_groups = [(g, np.flatnonzero(np.repeat(seq_ids_np, tok) == g)) for g in np.unique(seq_ids_np)]

        def loop(x2, a_pool, b_pool):  # one matmul chain per adapter on its own (static) rows
            y = x2 @ w
            for g, idx in row_groups:
                y = y.at[idx].add(scales[g] * ((x2[idx] @ a_pool[g]) @ b_pool[g]))
            return y

        multi = {
            "merged x W (no adapter)": jax.jit(lambda x2, a_pool, b_pool: x2 @ w),
            "single adapter x W + s (x A) B": jax.jit(
                lambda x2, a_pool, b_pool: pk.lora_linear_reference(x2, w, a_pool[0], b_pool[0], 2.0)
            ),
            "per-sequence gather + bmm": jax.jit(
                lambda x2, a_pool, b_pool: pk.multi_lora_reference(
                    x2.reshape(SEQS, tok, D), w, a_pool, b_pool, scales, seq_ids
                ).reshape(T, D)
            ),
            "per-token gather + bmm": jax.jit(
                lambda x2, a_pool, b_pool: pk.multi_lora_reference(x2, w, a_pool, b_pool, scales, tok_ids)
            ),
            "lax.ragged_dot (sorted rows)": jax.jit(
                lambda x2, a_pool, b_pool: pk.multi_lora_ragged_dot(x2, w, a_pool, b_pool, scales, tok_ids)
            ),
            "loop over adapters (static rows)": jax.jit(loop),
            "multi_lora Pallas kernel": jax.jit(
                lambda x2, a_pool, b_pool: pk.multi_lora(
                    x2.reshape(SEQS, tok, D), w, a_pool, b_pool, scales, seq_ids
                ).reshape(T, D)
            ),
        }
        times, loads = interleaved(
            {n: functools.partial(f, x2, a_pool, b_pool) for n, f in multi.items()}, args.rounds, args.burst_ms
        )
        want = multi["per-sequence gather + bmm"](x2, a_pool, b_pool)
        errs = {  # the forms that compute the same heterogeneous batch
            name: max_rel_err(f(x2, a_pool, b_pool), want)
            for name, f in multi.items()
            if not name.startswith(("merged", "single"))
        }
        single, merged = times["single adapter x W + s (x A) B"], times["merged x W (no adapter)"]
        gather = times["per-sequence gather + bmm"]
        multi_rows = [
            [
                name + (" (interpret: not a speed)" if interp and "Pallas" in name else ""),
                f"{med(ms):.2f}",
                f"{ratio(single, ms):.2f}x",
                f"{ratio(merged, ms):.2f}x",
                f"{errs[name]:.1e}" if name in errs and name != "per-sequence gather + bmm" else "—",
            ]
            for name, ms in times.items()
        ]
        ker = times["multi_lora Pallas kernel"]
        rows = [
            [
                "multi_lora fwd",
                f"{SEQS} req x {tok} tok, d={D}, r={R}, {ADAPTERS} adapters",
                f"{base} (jnp)",
                f"{med(times[base]):.2f}",
                f"{med(ker):.2f}",
                kratio(ratio(times[base], ker)),
                f"{errs['multi_lora Pallas kernel']:.1e}" if base == "per-sequence gather + bmm" else "—",
            ]
            for base in ("per-sequence gather + bmm", "lax.ragged_dot (sorted rows)")
        ]
        per_round = [s / g for s, g in zip(single, gather)]
        iqr = np.quantile(per_round, [0.25, 0.75])
        blocks["multi"] = (
            f"{T} tokens = {SEQS} requests x {tok}, d={D}, r={R}, {ADAPTERS} distinct adapters (one per request). "
            "Throughput (time ratio, same round, median over rounds) relative to one adapter for the whole batch "
            "and to the plain merged matmul; error vs the per-sequence gather. "
            + run_info(args.rounds, args.burst_ms, loads)
            + markdown_table(["form", "ms", "vs single adapter", "vs merged x W", "max rel. error"], multi_rows)
            + "\n\n"
            + f"64 distinct adapters (per-sequence gather + bmm) vs one adapter: **{ratio(single, gather):.2f}x** "
            f"(per-round ratios: interquartile range {iqr[0]:.2f}-{iqr[1]:.2f}x; performance.md goal P5: "
            "≥ 0.70x, stretch ≥ 0.85x). "
            "An earlier version of this benchmark timed each form in its own block of calls and reported 1.57x, "
            "faster than the plain matmul: that was load changing between the blocks, not the method.\n\n"
            "The Pallas kernel against its XLA baselines (same rounds):\n\n"
            + markdown_table(KERNEL_HEADER, rows)
            + "\n"
        )

    # --- 3. Flash-LoRA-Attention: 4 agents, one shared base cache, per-agent low-rank K/V parts
    if "attention" in only:
        q = f32(ATT_B, ATT_S, ATT_H, ATT_D)
        kb, vb = f32(1, ATT_S, ATT_H, ATT_D), f32(1, ATT_S, ATT_H, ATT_D)
        lr_k, lr_v = f32(ATT_B, ATT_S, ATT_R), f32(ATT_B, ATT_S, ATT_R)
        bk, bv = f32(ATT_B, ATT_H, ATT_R, ATT_D, s=0.1), f32(ATT_B, ATT_H, ATT_R, ATT_D, s=0.1)
        att_args = (q, kb, vb, lr_k, lr_v, bk, bv)
        att_ref = jax.jit(lambda *z: pk.lora_attention_reference(*z, scale=2.0, causal=True))
        att_ker = jax.jit(lambda *z: pk.lora_attention(*z, scale=2.0, causal=True))
        times, loads = interleaved(
            {"ref": lambda: att_ref(*att_args), "ker": lambda: att_ker(*att_args)}, args.rounds, args.burst_ms
        )
        rows = [
            [
                "lora_attention fwd (causal)",
                f"{ATT_B} agents x {ATT_S} q/kv, {ATT_H}x{ATT_D} heads, r={ATT_R}, shared base cache",
                "materialised K, V per agent + softmax (jnp)",
                f"{med(times['ref']):.2f}",
                f"{med(times['ker']):.2f}",
                kratio(ratio(times["ref"], times["ker"])),
                f"{max_rel_err(att_ker(*att_args), att_ref(*att_args)):.1e}",
            ]
        ]
        blocks["attention"] = run_info(args.rounds, args.burst_ms, loads) + markdown_table(KERNEL_HEADER, rows) + "\n"

    out = Path(args.out)
    old = split_sections(out.read_text()) if args.only is not None and out.exists() else {}
    note = (
        f"**No GPU or TPU was available for this run** (backend `{backend}`): the kernels ran in "
        "Pallas interpret mode, so the kernel columns and the ratios against them measure the interpreter and "
        "are **correctness-only**, not kernel speed. No GPU/TPU numbers exist for these kernels yet.\n\n"
        if backend not in pk.COMPILED_BACKENDS
        else ""
    )
    text = (
        "# Pallas kernels vs XLA baselines (interleaved: same rounds within each section)\n\n"
        + __doc__.split("\n\n", 1)[1].split("Command:")[0]
        + f"Backend: `{backend}` ({device}); kernels: {kernel_mode}.\n\n"
        + note
    )
    for s in SECTIONS:
        body = blocks.get(s, old.get(s))
        if body is not None:
            text += f"{HEADINGS[s]}\n\n{body.strip()}\n\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.rstrip() + "\n")
    print(text)


def split_sections(text: str) -> dict[str, str]:
    """The body under each of `HEADINGS` in a results file written by this script."""
    parts = re.split(r"^(## .*)$", text, flags=re.M)
    by_heading = {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    return {s: by_heading[h] for s, h in HEADINGS.items() if h in by_heading}


if __name__ == "__main__":
    main()
