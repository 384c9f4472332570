"""Every registered variant: trainable parameters on real model shapes, and train-step time on CPU.

Table 1 (parameter counts, no weights allocated). For every registered variant (aliases such as
"bone" -> "miss" skipped), `lorajax.init` runs under ``jax.eval_shape`` on the parameter shapes of
Llama-2-7B (hidden 4096, ffn 11008, 32 layers, 32 heads, vocab 32000; targets q_proj, v_proj and
all seven linear projections) and RoBERTa-base (hidden 768, ffn 3072, 12 layers, 12 heads, vocab
50265; targets query, value), and `lorajax.count_params` counts the trainable leaves. The "formula"
column is the per-adapted-weight count of shared/specs/adapters.md's Summary table (or the variant
docstring where the table has no row), summed over the targets from the configs' layer sizes alone.
Rows: a common rank r = 8, plus each method's own default where the spec or docstring gives one.

Table 2 (step time). The CPU tiny Llama of shared/specs/performance.md §7 (vocab 4096, d 512, ffn
1376, 8 heads, f32, mean shifted cross-entropy, rank 16, alpha 32 on all seven linear projections,
AdamW lr 1e-4), shrunk to fit ~6 minutes on 2 shared cores: fewer layers and tokens (see the
header of the results file). For each variant: `lorajax.adapt(..., mode="factored")`,
`lorajax.train.make_lora_step` (adapters only differentiated; FlyLoRA and SMoRA with
``aux=True`` and ``state_update=lorajax.train.refresh_state(spec)``), the first call
(trace + compile + one step) timed on its own, one more warm-up call, then ``--steps`` rounds that
alternate one plain-LoRA step and one variant step; the ratio is median(variant) / median(LoRA)
over those rounds. A second plain-LoRA instance gives the noise floor (its ratio should be ~1).

Command: ``python -m experiments.bench_variants [--steps 5 --layers 2 --batch 4 --seq 128]``.
Writes ``experiments/results/variants.md`` and ``variants_step_time.png``. ``--only lora shira
shira:backward=dense`` times only those rows (``name:key=value,...`` sets Spec options) and prints the
step table. The 1-minute load average is read once per round (its range is a table column).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lorajax
from experiments.bench_lora_step import ALPHA, DIM, FFN, HEADS, RANK, TARGETS, VOCAB
from experiments.report import markdown_table
from lorajax import registry
from lorajax.models import bert, llama

VARIANTS = [v for v in lorajax.list_variants() if registry.get(v).name == v]
ALIASES = {v: registry.get(v).name for v in lorajax.list_variants() if registry.get(v).name != v}
RESULTS = Path(__file__).resolve().parent / "results"
#: extra step-time rows with non-default options (the faster paths that form one [in, out] product per layer)
EXTRA_ROWS = ["shira:backward=dense", "tera:compute=dense"]

LLAMA_7B = llama.Config(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)
ROBERTA_BASE = bert.Config(
    vocab_size=50265,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    model_type="roberta",
)
SETTINGS = [
    ("Llama-2-7B q,v", LLAMA_7B, ["q_proj", "v_proj"]),
    ("Llama-2-7B all 7", LLAMA_7B, TARGETS),
    ("RoBERTa-base q,v", ROBERTA_BASE, ["query", "value"]),
]

# the trainable count per adapted weight, as text, and where the formula comes from; the count itself is
# each variant's declared `Variant.trainable_count`, checked here against what `lorajax.init` makes
FORMULAS = {
    "lora": ("r(in+out)", "spec"),
    "dora": ("r(in+out)+out", "spec"),
    "vera": ("out+r", "spec"),
    "miss": ("r·out", "spec"),
    "shira": ("r(in+out)", "spec"),
    "randlora": ("⌈d_min/r⌉(r+d_min)", "spec"),
    "flylora": ("r·out", "spec"),
    "loldu": ("r", "spec"),
    "tera": ("N·R (N = n_modes)", "spec"),
    "hydra": ("r(in+out)+2·r_s·out", "spec"),
    "unilora": ("d (one vector per model)", "spec"),
    "smora": ("r(in+out)+(r/p)·in", "spec"),
    "paca": ("r·out", "spec"),
    "comp_lora": ("r(in+out)", "spec"),
    "dylora": ("r(in+out)", "docstring"),
    "sora": ("r(in+out)+r", "docstring"),
    "lora_xs": ("r²", "docstring"),
}

# each method's own default (Spec kwargs, source) where the spec or the variant docstring gives one
PAPER_DEFAULTS = {
    "vera": (dict(rank=256), "PEFT default, adapters.md §1e"),
    "miss": (dict(rank=64), "PEFT default, adapters.md §2"),
    "shira": (dict(rank=32), "PEFT default, adapters.md §3"),
    "randlora": (dict(rank=32, alpha=640), "PEFT default, adapters.md §4"),
    "flylora": (dict(rank=32, alpha=64, top_k=8), "official MMLU script, adapters.md §5"),
    "loldu": (dict(rank=4, alpha=1), "official from_linear, adapters.md §6"),
    "hydra": (dict(rank=4, seq_rank=8), "official NLU scripts, adapters.md §8"),
    "unilora": (dict(rank=4, theta_d_length=23040), "official RoBERTa-base GLUE q,v, adapters.md §9"),
    "smora": (dict(rank=64, alpha=16, activate_r=8), "official Llama-2-7B config, adapters.md §10a"),
    "paca": (dict(rank=16, alpha=64), "official MMLU script, adapters.md §11"),
    "sora": (dict(rank=16, alpha=16), "official --lora_r default, optim.md §8.1"),
    "lora_xs": (dict(rank=64, alpha=64), "official math script, optim.md §6.1"),
}
COMMON_IS_DEFAULT = {"lora": "PEFT default; LoRA paper GLUE", "dylora": "official RoBERTa-base scripts r_max 8"}

# counts read in a source, {(variant, rank, setting name): text}; see the footnotes in `report`
PAPER_REPORTS = {("lora", 8, "RoBERTa-base q,v"): "0.3M [a]", ("vera", 256, "RoBERTa-base q,v"): "24.5K [b]"}
FOOTNOTES = """\
[a] LoRA paper (Hu et al., arXiv:2106.09685) Table 2, RoBERTa-base LoRA (r = 8 on query, value): 0.3M.
    Read as reproduced in the VeRA paper's GLUE table by a third-party lecture summary found with the
    code search, not in the PDF itself. The official README (github.com/microsoft/LoRA, README.md)
    lists 0.8M for "RoBERTa base LoRA", which is RoBERTa-large's q,v count at r = 8
    (24 layers · 2 · 8 · 2048 = 786,432), not base's 294,912.
[b] VeRA paper (Kopiczko et al., arXiv:2310.11454) Table 1, RoBERTa-base at rank 256: VeRA 24.5K (LoRA
    9437.1K), adapting query and key (the same 768x768 shapes as query and value). Read in the same
    third-party reproduction, not in the PDF. The paper's GLUE table gives VeRA 0.043M on RoBERTa-base,
    which is 24·(768 + r) at r = 1024; that rank is not sourced here, so no row claims it.
No other paper's count for these exact shapes, targets and ranks could be sourced: "—"."""


def param_shapes(cfg):
    """The model's params as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    family = llama if isinstance(cfg, llama.Config) else bert
    return jax.eval_shape(family.build(cfg).init, jax.random.key(0), *family.example_inputs(cfg))["params"]


def linear_sizes(cfg) -> dict[str, tuple[int, int]]:
    """``{module suffix: (in, out)}`` of one layer's adaptable linears, from the config alone."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    if isinstance(cfg, llama.Config):
        assert cfg.head_dim is not None and cfg.num_key_value_heads is not None  # filled in by Config.__post_init__
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, f),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }
    return {"query": (h, h), "key": (h, h), "value": (h, h)}


def formula_count(spec: lorajax.Spec, cfg, params=None) -> int:
    """The spec's trainable count by its variant's declared formula (`Variant.trainable_count`) on ``cfg``'s shapes."""
    params = param_shapes(cfg) if params is None else params
    count = registry.get(spec.variant).trainable_count
    if count is None:
        raise ValueError(f"variant {spec.variant!r} declares no trainable_count formula")
    return count(lorajax.select(spec, params))


def param_counts(spec: lorajax.Spec, cfg, params=None) -> tuple[int, int]:
    """``(lorajax count, formula count)`` of the trainable parameters of ``spec`` on ``cfg``'s shapes."""
    params = param_shapes(cfg) if params is None else params
    adapters = jax.eval_shape(lambda p: lorajax.init(spec, p, 0), params)
    return int(lorajax.count_params(spec, params, adapters)["trainable"]), formula_count(spec, cfg, params)


def count_table() -> tuple[str, bool]:
    shapes = {name: param_shapes(cfg) for name, cfg, _ in SETTINGS}
    rows, ok = [], True
    for v in VARIANTS:
        settings: list[tuple[dict[str, Any], str]] = [(dict(rank=8), COMMON_IS_DEFAULT.get(v, "common"))]
        if v in PAPER_DEFAULTS:
            settings.append(PAPER_DEFAULTS[v])
        for kw, source in settings:
            counts, reports = [], []
            for name, cfg, targets in SETTINGS:
                got, want = param_counts(lorajax.Spec(v, targets=targets, **kw), cfg, shapes[name])
                counts.append((got, want))
                if (v, kw["rank"], name) in PAPER_REPORTS:
                    reports.append(f"{PAPER_REPORTS[v, kw['rank'], name]} ({name.split()[0]})")
            match = all(g == w for g, w in counts)
            ok &= match
            setting = ", ".join(f"{k}={x}" for k, x in kw.items() if k != "alpha")
            text, where = FORMULAS[v]
            rows.append(
                [
                    v,
                    f"{setting} ({source})",
                    f"{text} [{where}]",
                    *(f"{g:,}" for g, _ in counts),
                    "yes" if match else f"NO (formula {', '.join(f'{w:,}' for _, w in counts)})",
                    "; ".join(reports) or "—",
                ]
            )
    table = markdown_table(
        ["variant", "setting", "formula per adapted W", *(n for n, _, _ in SETTINGS), "match", "paper reports"], rows
    )
    return table, ok


# ----------------------------------------------------------------------------- step time
def ce(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def parse_row(row: str) -> tuple[str, dict[str, Any]]:
    """``"shira:backward=dense,scale=1.0"`` -> ``("shira", {"backward": "dense", "scale": 1.0})``."""
    import ast

    variant, _, rest = row.partition(":")
    opts: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            opts[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            opts[key] = value
    return variant, opts


def make_runner(variant: str, model, variables, batch):
    """``(run, trainable count)``: ``run()`` does one jitted train step of ``variant`` and blocks on the state.

    ``variant`` may carry options, ``"name:key=value,..."`` (see `parse_row`).
    """
    name, opts = parse_row(variant)
    spec = lorajax.Spec(name, rank=RANK, alpha=ALPHA, targets=TARGETS, **opts)
    adapters = lorajax.init(spec, variables, 0)
    trainable, frozen = lorajax.partition(spec, adapters)
    fwd = lorajax.adapt(model.apply, spec, mode="factored", aux=True)

    def loss_fn(v, adapters, batch):  # aux: routing statistics (FlyLoRA, SMoRA), {} for the others
        ids, rng = batch  # the rng only matters to sampling variants (DyLoRA's rank)
        logits, aux = fwd(v, adapters, ids, adapter_rng=rng, adapter_train=True)
        return ce(logits, ids), aux

    tx = optax.adamw(1e-4)
    step = lorajax.train.make_lora_step(loss_fn, tx, state_update=lorajax.train.refresh_state(spec))
    state = {"now": lorajax.train.TrainState.create(tx, trainable, frozen)}

    def run():
        state["now"], metrics = step(variables, state["now"], batch)
        jax.block_until_ready((state, metrics))

    return run, lorajax.count_params(spec, variables, adapters)["trainable"]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_table(args) -> tuple[str, list[tuple[str, float]], str]:
    cfg = llama.Config(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=FFN,
        num_hidden_layers=args.layers,
        num_attention_heads=HEADS,
        max_position_embeddings=args.seq,
    )
    model = llama.build(cfg)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, VOCAB, jnp.int32)
    variables = {"params": model.init(jax.random.key(0), ids[:1, :4])["params"]}
    batch = (ids, jax.random.key(2))
    lora, _ = make_runner("lora", model, variables, batch)
    lora_first = timed(lora)
    lora()
    rows, ratios, lora_medians = [], [], []
    variants = args.only or VARIANTS + EXTRA_ROWS
    for v in variants:
        run, n_train = make_runner(v, model, variables, batch)
        first = timed(run)
        run()  # second warm-up step
        lt, vt, loads = [], [], []
        for _ in range(args.steps):
            lt.append(timed(lora))
            vt.append(timed(run))
            loads.append(os.getloadavg()[0])  # the 1-minute load average, once per round
        lm, vm = statistics.median(lt), statistics.median(vt)
        lora_medians.append(lm)
        ratios.append((v, vm / lm))
        rows.append(
            [
                v,
                "yes" if registry.get(parse_row(v)[0]).mergeable else "no",
                f"{n_train:,}",
                f"{first:.1f} s",
                f"{1e3 * vm:.0f} ms",
                f"{1e3 * lm:.0f} ms",
                f"**{vm / lm:.2f}**",
                f"{min(loads):.1f}–{max(loads):.1f}",
            ]
        )
        print(v, rows[-1][3:], flush=True)
        del run
    table = markdown_table(
        [
            "variant",
            "mergeable",
            "trainable (tiny)",
            "first call (compile)",
            "median step",
            "LoRA median, same rounds",
            "ratio vs LoRA",
            "load (1 min) over the rounds",
        ],
        rows,
    )
    spread = (
        f"Plain-LoRA reference: first call {lora_first:.1f} s; its median over each variant's rounds "
        f"ranged {1e3 * min(lora_medians):.0f}–{1e3 * max(lora_medians):.0f} ms "
        f"(median {1e3 * statistics.median(lora_medians):.0f} ms) across the {len(variants)} blocks."
    )
    return table, ratios, spread


def plot(ratios: list[tuple[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted(ratios, key=lambda x: x[1])
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    ax.barh([n for n, _ in ratios], [r for _, r in ratios], color=["C2" if n == "lora" else "C0" for n, _ in ratios])
    ax.axvline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("log")
    for i, (_, r) in enumerate(ratios):
        ax.text(r, i, f" {r:.2f}", va="center", fontsize=8)
    ax.set_xlabel("train-step time / plain-LoRA step time (same rounds, log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


#: the floor arithmetic of SHiRA's and TeRA's steps (session 9; fixed text, not measured by this run)
FLOORS = """\
### 2a. SHiRA and TeRA: the fused factored path, its options, and the floors

The table above has the default paths and the dense options side by side (`shira` / `shira:backward=dense`,
`tera` / `tera:compute=dense`); the arithmetic below says why the defaults sit at ~5-12x and the dense options at
~1.2-1.4x of a LoRA step on this CPU (measured over sessions 9-11).

What changed (`lorajax/variants/shira.py`, `lorajax/variants/tera.py`): SHiRA's factored `apply`
runs one product `x (W + c·S)` under a custom VJP (`∂x = g (W + c·S)ᵀ`, skipped where `x` needs
no gradient; `∂W` only if the base is differentiated), as PEFT does, without keeping `W'`; the
`v`-gradient is still chosen by `backward`. TeRA has a new option `compute="dense"`: form `ΔK`,
one product `x (K + ΔK)`, `∂ΔK = xᵀ g`, `∂λ` through the VJP of the contraction. The previous
formulas stay as `apply_reference` (and are used when `x`, `W` and the adapter differ in dtype);
`tests/variants/test_shira_tera_fast.py` checks both paths equal, values and gradients.

Why the dense options are at ~1.25x, and not lower (FLOPs per step; T = 512 tokens, 2 layers,
Σ in·out = 6,324,224 and Σ (in+out) = 19,520 over the 14 adapted linears, r = 16, so
K = r·Σ(in+out) = 312,320 = LoRA's trainable count):

* LoRA step ≈ 17.8 GFLOP: linear forward 2·T·Σ in·out = 6.48, linear `∂x` 5.68 (the first
  layer's q, k, v inputs need none), LM head forward + `∂x` 4.30, attention ≈ 0.4, adapter
  6·T·K = 0.96.
* SHiRA/TeRA dense ≈ 17.8 − 0.96 + 6.48 = 23.3 GFLOP: the same fused forward and `∂x`, plus one
  `xᵀ g` per linear (2·T·in·out; the `v`/`λ` gradients are then a gather of K entries or a
  contraction of ~2·R·in·out FLOPs). 23.3 / 17.8 = **1.31**, as the dense rows measure (1.18–1.38 over runs). Below this
  needs the `v`/`λ` gradient without the `[in, out]` product, which is the default paths' problem:
* SHiRA `backward="sampled"` (default): the same fused products, plus `∂v_k = Σ_t x[t,i_k]·g[t,o_k]`
  = 2·T·K = 0.32 GFLOP, as cheap as LoRA's adapter FLOPs, but every one of its 2·T·K = 320 M
  operands is a gathered element, and XLA-CPU's gather costs ~10 ns per element here (one
  512x512 layer, 16.8 M gathered elements: 173 ms, against ~20 ms for the dense `(xᵀ g)[idx]` with
  16x the FLOPs). 320 M x 10 ns ≈ 3.2 s on top of a ~0.7 s step: ~5–7x, as measured. ≤ 1.5x would
  need a gather (sampled dense-dense product) at ≲ 1 ns per element, i.e. a kernel, not XLA-CPU's
  gather. The dense product is 16x (512x512) to 23x (512x1376) more FLOPs and still ~8x faster.
* TeRA `compute="factored"` (default): for a 512x512 target (8·8·8 each way, R = 16) the pairwise
  chain costs 2·T·in·o₁·R = 67 M + 2·T·i₂o₁o₃R·(R·i₃) = 1.07 G + 67 M ≈ 1.21 GFLOP forward, 4.5x
  `x ΔK` (0.27 G), and about twice that again backward. `opt_einsum` ("optimal") on the whole
  network `x·G·F₁F₂F₃·g` finds the cheapest order (0.28 GFLOP) goes through `xᵀ g` or `ΔK`: the
  update has rank up to min(in, out), so it has no cheaper factored form. Without an `[in, out]`
  intermediate the cheapest order found costs ≥ 0.6 GFLOP for `λ₂, λ₃` (x by F₁, then with g over
  (T, o₁)) and ~1.1 GFLOP more for `λ₁`: about 3x the 0.59 GFLOP of a LoRA step on that linear.

The defaults stay the paths without an `[in, out]` gradient product, because
`tests/test_conformance.py` checks, for every variant's default factored step, that no dot of a
kernel's shape is formed (`test_no_base_gradient_in_jaxpr` / `_in_hlo`); `xᵀ g` is exactly such a
dot. Making `backward="dense"` / `compute="dense"` the defaults needs that check to exempt these
two (as it does DoRA's forward product); that is a decision for the test's owner.
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="alternating LoRA/variant rounds per variant (after 2 warm-up)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny Llama (§7: 4)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (§7: 8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (§7: 256)")
    p.add_argument("--out", default=str(RESULTS / "variants.md"), help="Markdown output (the PNG goes beside it)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="ROW",
        help="time only these rows, e.g. lora shira shira:backward=dense tera:compute=dense (name:key=value,... "
        "sets Spec options); skips Table 1 and prints the step table instead of writing --out",
    )
    args = p.parse_args(argv)
    if args.only:
        load0 = os.getloadavg()[0]
        steps, _, spread = step_table(args)
        print(steps)
        print(f"{spread} Load average (1 min) before / after: {load0:.2f} / {os.getloadavg()[0]:.2f}.")
        return

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    counts, all_match = count_table()
    count_s = time.perf_counter() - t0
    steps, ratios, spread = step_table(args)
    total_s = time.perf_counter() - t0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name("variants_step_time.png")
    tiny = (
        f"tiny Llama d {DIM}, ffn {FFN}, {args.layers} layers, {HEADS} heads, vocab {VOCAB}, "
        f"{args.batch}x{args.seq} tokens"
    )
    plot(ratios, png, f"Train step vs plain LoRA (factored, r {RANK}, all linear; CPU)\n{tiny}")
    cmd = " ".join(["python -m experiments.bench_variants", *(sys.argv[1:] if argv is None else argv)])
    aliases = ", ".join(f'"{a}" (alias of "{t}")' for a, t in ALIASES.items())
    text = f"""# LoRA variants: parameter counts and train-step time

Produced by `PYTHONPATH=. {cmd}` ({total_s / 60:.1f} min in all, {count_s:.0f} s of it for Table 1) on
a machine with {os.cpu_count()} CPU cores shared with other jobs (no GPU; jax {jax.__version__},
{platform.python_implementation()} {platform.python_version()}). Protocol: the module docstring of
`experiments/bench_variants.py`. Skipped: {aliases}.

## 1. Trainable parameters (shapes only)

Counts are `lorajax.count_params(...)["trainable"]` after `lorajax.init` under `jax.eval_shape`
(every variant's init traced, SVD/LU-based ones included, so no count comes from a smaller model).
"formula" is summed from the layer sizes alone; [spec] = shared/specs/adapters.md Summary table,
[docstring] = the variant module's docstring (no Summary-table row). The rank shown is the
adapter rank; alpha does not change any count. Frozen adapter buffers (VeRA/RandLoRA/TeRA bases,
SVD/LU factors, indices) are not counted. Every row matches its formula: **{"yes" if all_match else "NO"}**.

{counts}

{FOOTNOTES}

## 2. Train-step time on CPU, ratio to plain LoRA in the same run

{tiny}, f32, rank {RANK}, alpha {ALPHA}, all seven linear projections, AdamW lr 1e-4, mode
`factored` for every variant, adapters only differentiated. Shrunk from performance.md §7 (4 layers,
8x256 tokens) to keep the whole run near 6 minutes on 2 busy cores. {args.steps} rounds per variant, each
one plain-LoRA step then one variant step, after two warm-up calls; "first call" is trace + compile +
one step. Options are each variant's defaults (e.g. SHiRA's `backward="sampled"`, SMoRA's dense
compute, FlyLoRA k = r/4 = 4, TeRA 3 modes, Uni-LoRA d = 256), plus the rows
{", ".join(f"`{r}`" for r in EXTRA_ROWS)} (`name:option=value`); FlyLoRA and SMoRA run with
`aux=True` and `state_update=lorajax.train.refresh_state(spec)`; DyLoRA samples its rank
(`adapter_train=True`).

{steps}

{spread} Load average (1 min) before / after the run: {load0:.2f} / {os.getloadavg()[0]:.2f}.
The "lora" row is a second, independently compiled LoRA step: its ratio is the noise floor.
Plot: `{png.name}`.

{FLOORS}

Caveats: 2 CPU cores shared with other workers, so single numbers move by several percent
between runs; ratios from alternating rounds are the robust part. CPU timings say nothing about
accelerators (e.g. SHiRA's gather backward, TeRA's contractions). Tiny-model ratios overstate the
adapter share of the step relative to a 7B model.
"""
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
