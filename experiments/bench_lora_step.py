"""LoRA train-step time: lorajax vs PEFT on the same tiny Llama, side by side in one run (CPU).

Protocol of shared/specs/performance.md §7: HF LlamaConfig(vocab 4096, d 512, ffn 1376, 4 layers,
8 heads), 8x256 tokens, f32, mean shifted cross-entropy, LoRA r=16 alpha=32 on all linear layers
but lm_head, AdamW lr 1e-4; torch on 2 threads; 2 warm-up steps then the median of N; timings run
one after the other, never concurrently. Also: the lorajax full fine-tuning step (same code), a
matmul calibrator (2048x512x1376) for each framework, the jaxpr dot FLOPs of the lorajax steps,
and a check that the compiled lorajax LoRA step has no weight-gradient-shaped dot.

Command: ``python -m experiments.bench_lora_step [--steps 5]`` (~2 min). Writes
``experiments/results/bench_lora_step.md``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments.report import markdown_table

VOCAB, DIM, FFN, LAYERS, HEADS, BATCH, SEQ, RANK, ALPHA = 4096, 512, 1376, 4, 8, 8, 256, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def median_time(fn, steps: int, warmup: int = 2) -> tuple[float, float]:
    """(first call seconds, median seconds of ``steps`` calls after ``warmup``)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation (after 2 warm-up)")
    p.add_argument("--out", default="experiments/results/bench_lora_step.md", help="Markdown output")
    args = p.parse_args(argv)

    import peft
    import torch
    import transformers

    torch.set_num_threads(2)
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

    # --- PEFT eager
    pm = peft.get_peft_model(
        hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
    ).train()
    opt = torch.optim.AdamW([q for q in pm.parameters() if q.requires_grad], lr=1e-4)
    ids_t = torch.from_numpy(tokens)

    def peft_step():
        opt.zero_grad(set_to_none=True)
        loss = pm(input_ids=ids_t, labels=ids_t).loss
        loss.backward()
        opt.step()

    peft_first, peft_s = median_time(peft_step, args.steps)
    a, b = torch.randn(2048, 512), torch.randn(512, 1376)
    _, torch_mm = median_time(lambda: a @ b, 10)

    # --- lorajax
    variables = {"params": params}
    ids = jnp.asarray(tokens, jnp.int32)
    spec = lorajax.Spec("lora", rank=RANK, alpha=ALPHA, targets=TARGETS)
    trainable, frozen = lorajax.partition(spec, lorajax.init(spec, variables, 0))
    fwd = lorajax.adapt(model.apply, spec, mode="factored")

    def ce(logits, ids):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    def lora_loss(v, adapters, ids):
        return ce(fwd(v, adapters, ids), ids)

    tx = optax.adamw(1e-4)
    lora_step = lorajax.train.make_lora_step(lora_loss, tx, jit=False)
    lora_jit = jax.jit(lora_step, donate_argnums=(1,))
    state = {"lora": lorajax.train.TrainState.create(tx, trainable, frozen)}

    def run_lora():
        state["lora"], metrics = lora_jit(variables, state["lora"], ids)
        jax.block_until_ready(metrics)

    lora_first, lora_s = median_time(run_lora, args.steps)

    def full_loss(_, p, ids):
        return ce(model.apply({"params": p}, ids), ids)

    full_step = lorajax.train.make_lora_step(full_loss, tx, jit=False)
    full_jit = jax.jit(full_step, donate_argnums=(1,))
    fstate = {"full": lorajax.train.TrainState.create(tx, jax.tree.map(jnp.copy, params))}

    def run_full():
        fstate["full"], metrics = full_jit(None, fstate["full"], ids)
        jax.block_until_ready(metrics)

    full_first, full_s = median_time(run_full, args.steps)
    xa, xb = jnp.ones((2048, 512)), jnp.ones((512, 1376))
    mm = jax.jit(lambda x, y: x @ y)
    _, jax_mm = median_time(lambda: jax.block_until_ready(mm(xa, xb)), 10)

    # structural checks
    state0 = lorajax.train.TrainState.create(tx, *lorajax.partition(spec, lorajax.init(spec, variables, 0)))
    lora_gf = dot_flops(jax.make_jaxpr(lora_step)(variables, state0, ids).jaxpr) / 1e9
    full_gf = dot_flops(jax.make_jaxpr(full_step)(None, lorajax.train.TrainState.create(tx, params), ids).jaxpr) / 1e9
    hlo = jax.jit(lora_step).lower(variables, state0, ids).compile().as_text()
    if hlo is None:
        raise RuntimeError("this backend gives no HLO text of the compiled step (needed to count the dW dots)")
    weight_shapes = {f"{w.shape[0]},{w.shape[1]}" for w in jax.tree.leaves(params) if w.ndim == 2}
    weight_shapes |= {f"{s.split(',')[1]},{s.split(',')[0]}" for s in weight_shapes}
    dw_dots = [d for d in re.findall(r"f32\[([0-9,]+)\]\{[0-9,]*\} dot\(", hlo) if d in weight_shapes]
    mm_gflops = 2 * 2048 * 512 * 1376 / 1e9

    rows = [
        ["PEFT LoRA, PyTorch eager", f"{peft_s:.3f} s", "1.00x", f"{peft_first:.1f} s", "—", "—"],
        [
            "lorajax LoRA (factored, jit)",
            f"{lora_s:.3f} s",
            f"{lora_s / peft_s:.2f}x",
            f"{lora_first:.1f} s",
            f"{lora_gf:.1f}",
            f"{100 * lora_gf / lora_s / (mm_gflops / jax_mm):.0f}%",
        ],
        [
            "lorajax full fine-tuning (jit)",
            f"{full_s:.3f} s",
            f"{full_s / peft_s:.2f}x",
            f"{full_first:.1f} s",
            f"{full_gf:.1f}",
            f"{100 * full_gf / full_s / (mm_gflops / jax_mm):.0f}%",
        ],
    ]
    table = markdown_table(
        ["step", "median time", "vs PEFT eager", "first step (compile)", "dot GFLOP", "CPU-MFU vs calibrator"], rows
    )
    text = (
        f"# LoRA train step: lorajax vs PEFT (same model, same run)\n\n{__doc__.split(chr(10) + chr(10))[1]}\n\n"
        f"Device: {jax.devices()[0].device_kind}, {args.steps} timed steps each.\n\n{table}\n\n"
        f"- lorajax LoRA / full step: **{lora_s / full_s:.2f}** (performance.md P2: must <= 0.80).\n"
        f"- lorajax LoRA vs PEFT eager: **{lora_s / peft_s:.2f}x** (P1: must <= 0.80x, floor 0.49x).\n"
        f"- Weight-gradient-shaped dots in the compiled LoRA step: **{len(dw_dots)}** (P3: 0).\n"
        f"- Calibrator 2048x512x1376 matmul: XLA {mm_gflops / jax_mm:.0f} GFLOP/s, torch "
        f"{mm_gflops / torch_mm:.0f} GFLOP/s.\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
