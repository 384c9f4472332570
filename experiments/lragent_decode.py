"""LRAgent decode at model level: how far the shared base prefill is from each agent's own prefill.

``python -m experiments.lragent_decode [--model FOLDER|scratch] [--new N] [--results DIR]`` (`lorajax.lragent_decode`;
LRAgent, arXiv 2602.01053, official hjeon2k/LRAgent; ``specs/performance.md`` §3).

Base: the effects harness's pre-trained character Llama (``--model``, default
``experiments/runs/effects/_base/base``, read only; ``scratch``: a random tiny Llama). Three agents, each a
**random** LoRA (``init_weights=False``: ``B`` not zero; r=8, scale ``α/r``), not trained adapters: the numbers
show the mechanism and how the approximation grows with the adapters' size, not a task's accuracy.
Contexts: a few fixed play-style prompts of ``--context`` characters; greedy, ``--new`` tokens per agent.

For each setting (which projections are adapted, ``α``) and context, `lorajax.lragent_decode.report`
compares the batched decomposed decode with the exact per-agent decode (adapter merged, its own prefill,
`lorajax.models.llama.generate`): token agreement position by position, agreement before the first
difference, first-token agreement and the largest first-step logit difference. "agent ≠ base" is the
fraction of the exact per-agent tokens that differ from the base model's (how much the adapters change
the output at all). Memory: the decomposed context cache's bytes against three full K/V caches.
Writes ``--results``/``lragent_decode.md`` and ``.json``. About half a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lorajax
from experiments.report import markdown_table, strict_json
from lorajax import atomic, lragent, lragent_decode
from lorajax.models import llama

DEFAULT_MODEL = "experiments/runs/effects/_base/base"
PROMPTS = (
    "HAMLET: To be, or not to be, that is the question: whether",
    "KING LEAR: Blow, winds, and crack your cheeks! rage! blow!",
    "PORTIA: The quality of mercy is not strain'd, it droppeth",
    "MACBETH: Tomorrow, and tomorrow, and tomorrow, creeps in",
)
AGENTS = [0, 1, 2]
RANK = 8
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EVERY = ATTN + ["gate_proj", "up_proj", "down_proj"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.lragent_decode", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF model folder with a char tokenizer, or 'scratch'")
    ap.add_argument("--context", type=int, default=48, help="context length in characters")
    ap.add_argument("--new", type=int, default=24, help="new tokens per agent")
    ap.add_argument("--results", default="experiments/results", help="where lragent_decode.md / .json go")
    return ap.parse_args(argv)


def load(args: argparse.Namespace):
    """``(model, params, contexts [C, S])``."""
    if args.model == "scratch":
        cfg = llama.Config(vocab_size=78, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model = llama.build(cfg)
        params = model.init(jax.random.key(0), *llama.example_inputs(cfg))["params"]
        ctx = np.asarray(jax.random.randint(jax.random.key(1), (len(PROMPTS), args.context), 0, cfg.vocab_size))
        return model, params, ctx.astype(np.int32)
    from experiments.tasks import lm

    folder = Path(args.model)
    tok = lm.load_tokenizer(folder)
    model, params = lorajax.models.from_pretrained(folder)
    ctx = np.stack([tok.encode(p)[: args.context] for p in PROMPTS]).astype(np.int32)
    if ctx.shape[1] != args.context:
        raise ValueError(f"--context {args.context}: the prompts are shorter ({ctx.shape[1]} tokens)")
    return model, params, ctx


def settings(n_layers: int) -> list[tuple[str, str, str | list[str], float]]:
    """``(mode, label, targets, alpha)``."""
    last = rf".*layers\.{n_layers - 1}\.self_attn\.(k|v)_proj"
    out: list[tuple[str, str, str | list[str], float]] = [("exact", "last layer k, v", last, a) for a in (8.0, 32.0)]
    out += [("approximate", "every layer k, v", ["k_proj", "v_proj"], a) for a in (2.0, 8.0, 32.0)]
    out += [("approximate", "every layer q, k, v, o", ATTN, a) for a in (2.0, 8.0, 32.0)]
    out += [("approximate", "every layer, all linear", EVERY, a) for a in (2.0, 8.0, 32.0)]
    return out


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    model, params, contexts = load(args)
    base_toks = [np.asarray(llama.generate(model, params, jnp.asarray(c)[None], args.new)[0]) for c in contexts]
    rows = []
    for mode, label, targets, alpha in settings(model.cfg.num_hidden_layers):
        spec = lorajax.Spec("lora", rank=RANK, alpha=alpha, targets=targets, init_weights=False)
        pool = lorajax.stack_adapters(spec, [lorajax.init(spec, {"params": params}, s) for s in AGENTS])
        reps, changed = [], []
        for c, b in zip(contexts, base_toks):
            reps.append(lragent_decode.report(model, params, pool, AGENTS, c, args.new, mode=mode))
            ref, _ = lragent_decode.reference(model, params, pool, AGENTS, c, args.new)
            changed.append(float(np.mean(np.asarray(ref)[:, c.size :] != b[None, c.size :])))
        row = {"mode": mode, "adapted": label, "alpha": alpha, "scale": alpha / RANK}
        for k in reps[0]:
            row[k] = (
                float(np.mean([r[k] for r in reps])) if k != "first_step_max_logit_diff" else max(r[k] for r in reps)
            )
        row["agent_vs_base_changed"] = float(np.mean(changed))
        rows.append(row)
    # memory: k and v adapted at every layer (per-agent keys), and v only (shared keys)
    mem = []
    cfg, n, width = model.cfg, len(AGENTS), model.cfg.num_key_value_heads * model.cfg.head_dim
    for targets, shared_k in ((["k_proj", "v_proj"], False), (["v_proj"], True)):
        spec = lorajax.Spec("lora", rank=RANK, alpha=8.0, targets=targets, init_weights=False)
        pool = lorajax.stack_adapters(spec, [lorajax.init(spec, {"params": params}, s) for s in AGENTS])
        caches = lragent_decode.build_caches(model, params, pool, AGENTS, contexts[0])
        m = lragent_decode.memory(model, caches, n)
        m.update(adapted=", ".join(targets), formula=lragent.memory_ratio(n, RANK, width, shared_k=shared_k))
        mem.append(m)
    return {
        "model": args.model,
        "config": {
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "kv_width": width,
            "vocab": cfg.vocab_size,
        },  # fmt: skip
        "agents": n,
        "rank": RANK,
        "contexts": len(contexts),
        "context_len": int(contexts.shape[1]),
        "new_tokens": args.new,
        "rows": rows,
        "memory": mem,
        "seconds": time.perf_counter() - t0,
    }


def write(res: dict, folder: Path) -> None:
    head = ["mode", "adapted", "α (scale)", "agent ≠ base", "token agreement", "agreement before 1st diff",
            "1st token agreement", "max 1st-step |Δlogit|"]  # fmt: skip
    table = markdown_table(
        head,
        [
            [
                r["mode"],
                r["adapted"],
                f"{r['alpha']:g} ({r['scale']:g})",
                f"{r['agent_vs_base_changed']:.3f}",
                f"{r['token_agreement']:.3f}",
                f"{r['prefix_agreement']:.3f}",
                f"{r['first_token_agreement']:.3f}",
                f"{r['first_step_max_logit_diff']:.2e}",
            ]  # fmt: skip
            for r in res["rows"]
        ],
    )
    mtable = markdown_table(
        ["adapted", "decomposed bytes", "3 full caches", "ratio", "formula"],
        [
            [m["adapted"], m["decomposed_bytes"], m["full_bytes"], f"{m['ratio']:.4f}", f"{m['formula']:.4f}"]
            for m in res["memory"]
        ],  # fmt: skip
    )
    c = res["config"]
    text = f"""# LRAgent decode at model level (`lorajax.lragent_decode`)

`python -m experiments.lragent_decode` ({res["seconds"]:.0f} s on 2 shared CPU cores). Model: `{res["model"]}`
({c["layers"]} layers, hidden {c["hidden"]}, KV width {c["kv_width"]}, vocab {c["vocab"]}). {res["agents"]} agents,
each a **random** LoRA (r={res["rank"]}, `init_weights=False`), not trained; {res["contexts"]} contexts of
{res["context_len"]} characters, greedy, {res["new_tokens"]} new tokens per agent. The agents decode in one batch
from one base prefill of the context (decomposed cache: shared base K/V, per-agent `X A` columns, per-agent keys
where `k_proj` is adapted); the exact reference prefills each agent with its own merged adapter
(`llama.generate`). Agreement columns: mean over agents and contexts; `max 1st-step |Δlogit|`: max over them;
`agent ≠ base`: fraction of the exact per-agent tokens that differ from the base model's.

{table}

Exact mode (adapters only in the last layer) agrees token for token, its logits differ by float rounding only.
With adapters upstream (LRAgent's setting) every agent reads the base hidden states; the first-step logit error
and the token disagreement broadly grow with the adapters' size (not monotonically: {res["contexts"]} contexts,
random adapters). Random adapters are not the paper's trained agents, whose base activations the paper reports
to be highly similar across agents.

Memory of the context cache (both layers, {res["context_len"] - 1} context tokens, float32), against
{res["agents"]} full K/V caches; the formula is `lorajax.lragent.memory_ratio`: `(n+1)/(2n) + r/(2W)`, or
`1/n + r/(2W)` with shared keys:

{mtable}
"""
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text(folder / "lragent_decode.md", text)
    atomic.write_text(folder / "lragent_decode.json", json.dumps(strict_json(res), indent=2, allow_nan=False) + "\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    res = run(args)
    write(res, Path(args.results))
    print((Path(args.results) / "lragent_decode.md").read_text())
    return res


if __name__ == "__main__":
    main()
