"""pallas_kernels vs their XLA baselines, same run, on the backend jax finds.

Each kernel is timed beside its XLA (jnp, ``jit``) baseline on the same inputs
and the ratio ``XLA time / kernel time`` is reported (> 1: the kernel is
faster). On CPU the kernels can only run in Pallas interpret mode (a ``jit``
of a scan over the grid), so their times and ratios there measure the
interpreter, not the kernel: the table marks them correctness-only. The XLA
baselines are real on any backend; on CPU the multi-adapter section compares
the XLA forms of a heterogeneous batch (per-sequence gather + batched matmul,
per-token gather, ``lax.ragged_dot``, a loop over adapters).

The LoRA linear's forward+backward row runs every product as a Pallas kernel
(forward emitting ``x A``; ``dx`` by the fused kernel emitting ``dy Bᵀ``; the
``dA`` and ``dB`` reductions), no ``dW``.

Shapes (performance.md §2.4, §5.2): LoRA linear T=2048 x 512 -> 512, r=16;
multi-adapter T=2048 tokens = 64 requests x 32, d=512, r=16, 64 adapters;
Flash-LoRA-Attention 4 agents sharing one base cache, 256 queries and keys,
8 heads of 64, r=8. float32. Median of ``--reps`` calls after one warm-up
(compile time excluded).

Command: ``python -m experiments.bench_kernels [--reps 10]`` (~20 s - 2 min on 2
CPU cores, by load). Writes ``experiments/results/bench_kernels.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from experiments.report import markdown_table

T, D, R, SEQS, ADAPTERS = 2048, 512, 16, 64, 64
ATT_B, ATT_S, ATT_H, ATT_D, ATT_R = 4, 256, 8, 64, 8


def median_ms(fn, reps: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compile)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=10, help="timed calls per implementation (after 1 warm-up)")
    p.add_argument("--out", default="experiments/results/bench_kernels.md", help="Markdown output")
    args = p.parse_args(argv)

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
    rows, notes = [], []

    def ratio(xla_ms, kern_ms):
        r = f"{xla_ms / kern_ms:.2f}x"
        return f"{r} (interpret: not a speed)" if interp else r

    # --- 1. fused LoRA linear, forward and forward+backward (dx, dA, dB)
    x, w = f32(T, D), f32(D, D, s=D**-0.5)
    a, b = f32(D, R, s=D**-0.5), f32(R, D, s=0.1)
    ref_fwd = jax.jit(lambda x, a, b: pk.lora_linear_reference(x, w, a, b, 2.0))
    ker_fwd = jax.jit(lambda x, a, b: pk.lora_linear(x, w, a, b, 2.0))

    def grad_of(fn):
        return jax.jit(jax.grad(lambda x, a, b: jnp.sum(fn(x, w, a, b, 2.0) ** 2), argnums=(0, 1, 2)))

    ref_bwd, ker_bwd = grad_of(pk.lora_linear_reference), grad_of(pk.lora_linear)
    for what, base, rf, kf in (
        ("fwd", "x W + s (x A) B (jnp)", ref_fwd, ker_fwd),
        ("fwd+bwd (dx, dA, dB)", "jax.grad of the same (jnp)", ref_bwd, ker_bwd),
    ):
        xla_ms, ker_ms = median_ms(lambda: rf(x, a, b), args.reps), median_ms(lambda: kf(x, a, b), args.reps)
        rows.append(
            [
                f"lora_linear {what}",
                f"{T}x{D}->{D}, r={R}",
                base,
                f"{xla_ms:.2f}",
                f"{ker_ms:.2f}",
                ratio(xla_ms, ker_ms),
                f"{max_rel_err(kf(x, a, b), rf(x, a, b)):.1e}",
            ]
        )

    # --- 2. multi-adapter batch: 64 requests x 32 tokens, 64 distinct adapters
    per_seq = SEQS
    tok = T // per_seq
    x3 = f32(per_seq, tok, D)
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
    }
    mt = {name: median_ms(lambda f=f: f(x2, a_pool, b_pool), args.reps) for name, f in multi.items()}
    want = multi["per-sequence gather + bmm"](x2, a_pool, b_pool)
    same_maths = [name for name in multi if "gather" in name or "ragged" in name or "loop" in name]
    errs = {name: max_rel_err(multi[name](x2, a_pool, b_pool), want) for name in same_maths}
    kern = jax.jit(lambda x3, a_pool, b_pool: pk.multi_lora(x3, w, a_pool, b_pool, scales, seq_ids))
    ker_ms = median_ms(lambda: kern(x3, a_pool, b_pool), args.reps)
    gather_ms = mt["per-sequence gather + bmm"]
    rows.append(
        [
            "multi_lora fwd",
            f"{SEQS} req x {tok} tok, d={D}, r={R}, {ADAPTERS} adapters",
            "per-sequence gather + bmm (jnp)",
            f"{gather_ms:.2f}",
            f"{ker_ms:.2f}",
            ratio(gather_ms, ker_ms),
            f"{max_rel_err(kern(x3, a_pool, b_pool).reshape(T, D), want):.1e}",
        ]
    )
    ragged_ms = mt["lax.ragged_dot (sorted rows)"]
    rows.append(
        [
            "multi_lora fwd",
            "same",
            "lax.ragged_dot (jnp)",
            f"{ragged_ms:.2f}",
            f"{ker_ms:.2f}",
            ratio(ragged_ms, ker_ms),
            "—",
        ]
    )

    single = mt["single adapter x W + s (x A) B"]
    multi_rows = [
        [
            name,
            f"{ms:.2f}",
            f"{single / ms:.2f}x",
            f"{mt['merged x W (no adapter)'] / ms:.2f}x",
            f"{errs[name]:.1e}" if name in errs else "—",
        ]
        for name, ms in mt.items()
    ]

    # --- 3. Flash-LoRA-Attention: 4 agents, one shared base cache, per-agent low-rank K/V parts
    q = f32(ATT_B, ATT_S, ATT_H, ATT_D)
    kb, vb = f32(1, ATT_S, ATT_H, ATT_D), f32(1, ATT_S, ATT_H, ATT_D)
    lr_k, lr_v = f32(ATT_B, ATT_S, ATT_R), f32(ATT_B, ATT_S, ATT_R)
    bk, bv = f32(ATT_B, ATT_H, ATT_R, ATT_D, s=0.1), f32(ATT_B, ATT_H, ATT_R, ATT_D, s=0.1)
    att_args = (q, kb, vb, lr_k, lr_v, bk, bv)
    att_ref = jax.jit(lambda *z: pk.lora_attention_reference(*z, scale=2.0, causal=True))
    att_ker = jax.jit(lambda *z: pk.lora_attention(*z, scale=2.0, causal=True))
    xla_ms, ker_ms = median_ms(lambda: att_ref(*att_args), args.reps), median_ms(lambda: att_ker(*att_args), args.reps)
    rows.append(
        [
            "lora_attention fwd (causal)",
            f"{ATT_B} agents x {ATT_S} q/kv, {ATT_H}x{ATT_D} heads, r={ATT_R}, shared base cache",
            "materialised K, V per agent + softmax (jnp)",
            f"{xla_ms:.2f}",
            f"{ker_ms:.2f}",
            ratio(xla_ms, ker_ms),
            f"{max_rel_err(att_ker(*att_args), att_ref(*att_args)):.1e}",
        ]
    )

    if backend not in pk.COMPILED_BACKENDS:
        notes.append(
            f"**No GPU or TPU was available for this run** (backend `{backend}`): the kernels ran in "
            "Pallas interpret mode, so the kernel column and the ratios measure the interpreter and are "
            "**correctness-only**, not kernel speed. No GPU/TPU numbers exist for these kernels yet."
        )
    load = os.getloadavg()
    text = (
        "# Pallas kernels vs XLA baselines (same run)\n\n"
        + __doc__.split("\n\n", 1)[1].split("Command:")[0]
        + f"Backend: `{backend}` ({device}); kernels: {kernel_mode}; {args.reps} timed calls each; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores "
        "(shared machine: timings are noisy).\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n\n"
        + "## Kernels vs their XLA baseline\n\n"
        + markdown_table(
            ["kernel", "shape", "XLA baseline", "XLA ms", "kernel ms", "XLA / kernel", "max rel. error"], rows
        )
        + "\n\n## Multi-adapter batch: XLA forms on this backend\n\n"
        + f"{T} tokens = {SEQS} requests x {tok}, d={D}, r={R}, {ADAPTERS} distinct adapters (one per request). "
        "Throughput relative to one adapter for the whole batch and to the plain merged matmul; error vs the "
        "per-sequence gather.\n\n"
        + markdown_table(["form", "ms", "vs single adapter", "vs merged x W", "max rel. error"], multi_rows)
        + "\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
