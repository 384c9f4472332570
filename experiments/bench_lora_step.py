"""LoRA train-step time: lorajax vs PEFT on the same tiny Llama, interleaved round by round (CPU).

Protocol of shared/specs/performance.md §7: HF LlamaConfig(vocab 4096, d 512, ffn 1376, 4 layers,
8 heads), 8x256 tokens, f32, mean shifted cross-entropy, LoRA r=16 alpha=32 on all linear layers
but lm_head, AdamW lr 1e-4; torch on 2 threads. Every implementation is compiled and warmed up
first, then timed once per round, round after round (never concurrently; the order rotates each round
and a short pause precedes each call, so PyTorch's spinning OpenMP threads do not slow the next call),
with the 1-minute load average read before each round. PyTorch eager slows down far more than XLA on a shared CPU, so
ratios come from the *quiet* rounds (load below the core count) when there are any, else from all
rounds, and the output says which. A ratio is the median over rounds of the per-round ratio (both
steps timed in the same round). Also: a matmul calibrator (2048x512x1376) per framework timed in
the same rounds; the jaxpr dot FLOPs of the lorajax steps and the compute floor they imply (dot
FLOPs / calibrator rate); a check that the compiled LoRA step forms no weight gradient (a dot whose
output has a weight's shape and which contracts over the tokens); and a per-component breakdown
(forward + backward of each part of a layer at the step's shapes, the library path beside the
reference path it replaced).

Rows: PEFT eager; lorajax LoRA with the library's defaults (``attention="auto"``: the fused CPU
attention kernel, `lorajax.models.attention_cpu`; RoPE tables as constants); the same step with
``attention="blockwise"`` (the default before the kernel); the same step on the reference paths
(``attention="dense"``, RoPE from position ids at run time); lorajax full fine-tuning (library defaults);
``torch.compile`` of the PEFT model with ``--compile``. The dot FLOPs of every lorajax row are counted on
the blockwise form of its step (the kernel's matmuls are inside one custom call, invisible to the jaxpr;
it computes the same blocks, plus the score recomputation of its backward, which the floor does not count).

Command: ``python -m experiments.bench_lora_step [--rounds 9] [--compile]`` (~3-5 min). Writes
``experiments/results/bench_lora_step.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments.report import markdown_table
from experiments.stats import interval_text
from lorajax.hlo import count_weight_gradients as weight_gradient_dots

VOCAB, DIM, FFN, LAYERS, HEADS, BATCH, SEQ, RANK, ALPHA = 4096, 512, 1376, 4, 8, 8, 256, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = BATCH * SEQ


def dot_flops(jaxpr) -> float:
    """2 * prod(out) * prod(contracting) summed over every dot_general, sub-jaxprs included."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            k = np.prod([eqn.invars[0].aval.shape[d] for d in lc]) if lc else 1
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    total += dot_flops(inner if hasattr(inner, "eqns") else inner.jaxpr)
    return total


#: pause before each timed call: PyTorch's OpenMP threads keep spinning for a while after a torch op and
#: slowed the next XLA call here by ~25% (a 2048x512x1376 matmul: 174 GFLOP/s alone, 130 right after torch)
PAUSE_S = 0.3


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> tuple[dict[str, list[float]], list[float]]:
    """Time each fn once per round for ``rounds`` rounds, the order rotated every round and a `PAUSE_S` pause
    before each call: ({name: seconds per round}, 1-min load average per round)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    loads = []
    names = list(fns)
    for r in range(rounds):
        loads.append(os.getloadavg()[0])
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times, loads


def per_round(times: dict[str, list[float]], a: str, b: str, rows: list[int]) -> list[float]:
    """time[a] / time[b] in the same round, for each round index in ``rows``."""
    return [times[a][i] / times[b][i] for i in rows]


def ratio(times: dict[str, list[float]], a: str, b: str, rows: list[int]) -> float:
    """Median over ``rows`` (round indices) of time[a] / time[b] in the same round."""
    return statistics.median(per_round(times, a, b, rows))


def ratio_interval(times: dict[str, list[float]], a: str, b: str, rows: list[int]) -> str:
    """``"mean [low, high]"``: the 95% t-interval of the per-round ratios time[a] / time[b] over ``rows`` (how far
    a target is from the ratio given the round-to-round spread; rounds are consecutive, not independent runs)."""
    return interval_text(per_round(times, a, b, rows), sign="", digits=3)


def components(variables, spec, tx) -> dict[str, Callable[[], object]]:
    """Forward + backward of each part of one layer at the step's shapes: library path and its reference."""
    from lorajax.models import attention as att
    from lorajax.models import llama

    cfg = llama.Config(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=1, num_attention_heads=HEADS
    )
    d = DIM // HEADS
    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (BATCH, SEQ, HEADS, 1, d))
    k, v = (jax.random.normal(x, (BATCH, SEQ, HEADS, d)) for x in ks[1:3])
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((SEQ, SEQ), bool))[None], (BATCH, SEQ, SEQ))
    x = jax.random.normal(ks[3], (TOKENS, DIM))
    w = jax.random.normal(ks[4], (DIM, VOCAB)) * 0.02
    labels = jax.random.randint(ks[5], (TOKENS,), 0, VOCAB)
    pos = jnp.broadcast_to(jnp.arange(SEQ)[None], (BATCH, SEQ))

    def vjp_sum(f):  # value and gradient of a non-linear scalar of f's output (so nothing folds to a constant)
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=0))

    dense = vjp_sum(att.dense_attention)
    block = vjp_sum(lambda q, k, v, m: att.blockwise_attention(q, k, v, m))
    fused = vjp_sum(lambda q, k, v, m: att.self_attention(q, k, v, m, implementation="fused"))
    qr = q.reshape(BATCH, SEQ, HEADS, d)

    def rope_runtime(q):
        cos, sin = llama._rope_tables(cfg, pos, q.dtype)
        return llama._apply_rope(q, cos, sin)

    def rope_const(q):
        cos, sin = llama._rope_constants(cfg, SEQ, q.dtype)
        return llama._apply_rope(q, cos, sin)

    rr, rc = vjp_sum(rope_runtime), vjp_sum(rope_const)
    ce = jax.jit(jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()))
    out = {
        "attention core, dense (reference)": lambda: jax.block_until_ready(dense(q, k, v, mask)),
        "attention core, blockwise (library before)": lambda: jax.block_until_ready(block(q, k, v, mask)),
        "attention core, fused CPU kernel (library)": lambda: jax.block_until_ready(fused(q, k, v, mask)),
        "RoPE q, tables at run time (reference)": lambda: jax.block_until_ready(rr(qr)),
        "RoPE q, constant tables (library)": lambda: jax.block_until_ready(rc(qr)),
        "lm_head + cross-entropy": lambda: jax.block_until_ready(ce(x)),
    }
    for f in out.values():
        f()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=9, help="timed rounds (each times every implementation once)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the PEFT model")
    p.add_argument("--out", default="experiments/results/bench_lora_step.md", help="Markdown output")
    args = p.parse_args(argv)

    import peft
    import torch
    import transformers

    cores = os.cpu_count() or 1
    torch.set_num_threads(min(2, cores))
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=SEQ,
    )
    tokens = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        hf = transformers.LlamaForCausalLM(hf_cfg).float()
        hf.save_pretrained(tmp, safe_serialization=True)
        model, params = lorajax.models.from_pretrained(tmp)

    steps: dict[str, Callable[[], object]] = {}
    first: dict[str, float] = {}

    # --- PEFT eager (and compiled)
    pm = peft.get_peft_model(
        hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    ).train()
    opt = torch.optim.AdamW([q for q in pm.parameters() if q.requires_grad], lr=1e-4)
    ids_t = torch.from_numpy(tokens)

    def torch_step(net):
        def run():
            opt.zero_grad(set_to_none=True)
            net(input_ids=ids_t, labels=ids_t).loss.backward()
            opt.step()

        return run

    steps["PEFT LoRA, PyTorch eager"] = torch_step(pm)
    if args.compile:
        steps["PEFT LoRA, torch.compile"] = torch_step(torch.compile(pm))
    a_t, b_t = torch.randn(TOKENS, DIM), torch.randn(DIM, FFN)
    steps["calibrator, torch"] = lambda: a_t @ b_t

    # --- lorajax
    variables = {"params": params}
    ids = jnp.asarray(tokens, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32)[None], (BATCH, SEQ))
    spec = lorajax.Spec("lora", rank=RANK, alpha=ALPHA, targets=TARGETS)
    tx = optax.adamw(1e-4)

    def ce(logits, ids):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    def lora_step_of(net, reference: bool):
        fwd = lorajax.adapt(net.apply, spec, mode="factored")
        kw = {"position_ids": pos} if reference else {}
        return lorajax.train.make_lora_step(lambda v, ad, ids: ce(fwd(v, ad, ids, **kw), ids), tx, jit=False)

    def new_state():
        return lorajax.train.TrainState.create(tx, *lorajax.partition(spec, lorajax.init(spec, variables, 0)))

    lora_step = lora_step_of(model, reference=False)
    lora_block_step = lora_step_of(model.clone(attention="blockwise"), reference=False)
    lora_ref_step = lora_step_of(model.clone(attention="dense"), reference=True)
    holders = {}
    for name, fn in (
        ("lorajax LoRA (library defaults)", lora_step),
        ("lorajax LoRA (blockwise attention)", lora_block_step),
        ("lorajax LoRA (reference paths)", lora_ref_step),
    ):
        jitted = jax.jit(fn, donate_argnums=(1,))
        holders[name] = new_state()

        def run(name=name, jitted=jitted):
            holders[name], metrics = jitted(variables, holders[name], ids)
            jax.block_until_ready(metrics)

        steps[name] = run

    def full_loss(_, p, ids):
        return ce(model.apply({"params": p}, ids), ids)

    full_step = lorajax.train.make_lora_step(full_loss, tx, jit=False)
    full_jit = jax.jit(full_step, donate_argnums=(1,))
    holders["full"] = lorajax.train.TrainState.create(tx, jax.tree.map(jnp.copy, params))

    def run_full():
        holders["full"], metrics = full_jit(None, holders["full"], ids)
        jax.block_until_ready(metrics)

    steps["lorajax full fine-tuning"] = run_full
    xa, xb = jnp.ones((TOKENS, DIM)), jnp.ones((DIM, FFN))
    mm = jax.jit(lambda x, y: x @ y)
    steps["calibrator, XLA"] = lambda: jax.block_until_ready(mm(xa, xb))

    for name, fn in steps.items():  # compile + warm up (2 calls)
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
        fn()
    comp = components(variables, spec, tx)
    times, loads = interleaved({**steps, **comp}, args.rounds)
    quiet = [i for i, ld in enumerate(loads) if ld < cores]
    rows_used = quiet or list(range(args.rounds))
    which = (
        f"{len(quiet)} quiet rounds (1-min load < {cores} cores)"
        if quiet
        else f"all {args.rounds} rounds: NONE was quiet (load ≥ {cores}), so these ratios flatter lorajax"
    )

    # FLOPs, floors, structural check
    state0 = new_state()
    lora_gf = dot_flops(jax.make_jaxpr(lora_block_step)(variables, state0, ids).jaxpr) / 1e9
    blockwise = model.clone(attention="blockwise")
    full_block_step = lorajax.train.make_lora_step(
        lambda _, p, ids: ce(blockwise.apply({"params": p}, ids), ids), tx, jit=False
    )
    full_state0 = lorajax.train.TrainState.create(tx, params)
    full_gf = dot_flops(jax.make_jaxpr(full_block_step)(None, full_state0, ids).jaxpr) / 1e9
    hlo = jax.jit(lora_step).lower(variables, state0, ids).compile().as_text()
    if hlo is None:
        raise RuntimeError("this backend gives no HLO text of the compiled step (needed to count weight gradients)")
    weight_shapes = {tuple(w.shape) for w in jax.tree.leaves(params) if w.ndim == 2}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    dw, dw_shaped = weight_gradient_dots(hlo, weight_shapes, TOKENS)
    mm_gf = 2 * TOKENS * DIM * FFN / 1e9
    med = {k: statistics.median(times[k][i] for i in rows_used) for k in times}
    rate = {"XLA": mm_gf / med["calibrator, XLA"], "torch": mm_gf / med["calibrator, torch"]}
    peft_name = "PEFT LoRA, PyTorch eager"
    gflop = {
        "lorajax LoRA (library defaults)": lora_gf,
        "lorajax LoRA (blockwise attention)": lora_gf,
        "lorajax LoRA (reference paths)": lora_gf,
        "lorajax full fine-tuning": full_gf,
    }
    rows = []
    for name in steps:
        if name.startswith("calibrator"):
            continue
        gf = gflop.get(name)
        floor = (
            "—" if gf is None else f"{med[name] / (gf / rate['XLA']):.2f}x / {med[name] / (gf / rate['torch']):.2f}x"
        )
        rows.append(
            [
                name,
                f"{med[name]:.3f} s",
                f"{ratio(times, name, peft_name, rows_used):.2f}x",
                f"{first[name]:.1f} s",
                "—" if gf is None else f"{gf:.1f}",
                floor,
            ]
        )
    table = markdown_table(
        [
            "step",
            "median time",
            "vs PEFT eager (per-round)",
            "first call",
            "dot GFLOP",
            "vs compute floor (XLA / torch calibrator)",
        ],
        rows,
    )
    comp_rows = [[k, f"{1e3 * med[k]:.1f} ms"] for k in comp]
    comp_table = markdown_table(["component (one layer's worth, forward + backward)", "median time"], comp_rows)
    lora, ref, full = "lorajax LoRA (library defaults)", "lorajax LoRA (reference paths)", "lorajax full fine-tuning"
    blk = "lorajax LoRA (blockwise attention)"
    lines = [
        "# LoRA train step: lorajax vs PEFT (same model, same run, interleaved)",
        "",
        __doc__.split("\n\n")[1],
        "",
        f"Device: {jax.devices()[0].device_kind}, {cores} cores; {args.rounds} rounds;"
        f" ratios and medians from {which}.",
        f"Load average per round: {', '.join(f'{ld:.2f}' for ld in loads)}.",
        "",
        table,
        "",
        f"- lorajax LoRA vs PEFT eager: **{ratio(times, lora, peft_name, rows_used):.2f}x**"
        " (target ≤ 0.85x, aim 0.75x; per-round mean and 95% interval"
        f" {ratio_interval(times, lora, peft_name, rows_used)});"
        " with blockwise attention (the default before the fused kernel):"
        f" {ratio(times, blk, peft_name, rows_used):.2f}x;"
        f" reference paths: {ratio(times, ref, peft_name, rows_used):.2f}x.",
        f"- Fused kernel vs blockwise attention, same step: **{ratio(times, lora, blk, rows_used):.2f}x**.",
        f"- Library paths vs reference paths, same step: **{ratio(times, lora, ref, rows_used):.2f}x**.",
        f"- lorajax LoRA / full fine-tuning: **{ratio(times, lora, full, rows_used):.2f}** (target ≤ 0.75;"
        f" per-round mean and 95% interval {ratio_interval(times, lora, full, rows_used)};"
        f" FLOP ratio {lora_gf / full_gf:.3f}).",
        f"- Compute floor = dot FLOPs / calibrator rate; calibrator {TOKENS}x{DIM}x{FFN}:"
        f" XLA {rate['XLA']:.0f} GFLOP/s,"
        f" torch {rate['torch']:.0f} GFLOP/s. LoRA step vs floor target ≤ 1.25x.",
        f"- Weight gradients in the compiled LoRA step (weight-shaped dots contracting over the {TOKENS} tokens):"
        f" **{dw}** (must be 0); weight-shaped dots of any kind: {dw_shaped}.",
        "",
        "## Per component",
        "",
        comp_table,
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
