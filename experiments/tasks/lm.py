"""Task "lm": a small Llama-style decoder pre-trained on some plays, adapted with LoRA to held-out ones.

Data: `lorajax.data.speeches.lm_corpus` ("SPEAKER: text" lines): pre-train on
histories, tragedies and romances; adapt on comedies; evaluate on two unseen
comedies (Twelfth Night, Much Ado). Characters are the tokens.

1. pre-train (full fine-tuning) a `lorajax.models.llama` model from scratch; it is
   saved as a HF checkpoint in ``out_dir/base`` (re-runs load it instead; an
   incomplete ``base/`` is pre-trained again, resuming from ``pretrain/``);
2. freeze it; train adapters on the comedies (resumable, `lorajax.train.fit`);
3. report held-out loss (nats/char) before and after, and generate a sample.

Artefacts in ``out_dir``: ``run_config.json``, ``pretrain/`` and ``lora/``
(checkpoints, metrics), ``base/``, ``peft_adapter/``, ``results.md``,
``results.json``, ``loss.png``; each export is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments import run_identity
from experiments.config import RunConfig
from experiments.optimizers import extra_loss, make_tx
from experiments.report import (
    format_ms,
    loss_curve,
    loss_plot,
    main_process,
    markdown_table,
    step_time_ms,
    write_results,
)
from lorajax import sharding
from lorajax.data import speeches
from lorajax.data.shakespeare import CharTokenizer
from lorajax.models import llama


def window_batches(ids: np.ndarray, batch: int, seq: int, seed: int):
    """``batch(step) -> [batch, seq + 1]`` windows at offsets drawn from ``(seed, step)``."""

    def fn(step: int):
        starts = np.random.default_rng([seed, step]).integers(0, len(ids) - seq - 1, batch)
        return jnp.asarray(np.stack([ids[s : s + seq + 1] for s in starts]))

    return fn


def lm_loss(logits_BxSxV, tokens_BxS1):
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxSxV, tokens_BxS1[:, 1:]).mean()


def load_base(base_dir: Path) -> tuple[Any, dict] | None:
    """``(model, params)`` of a complete HF folder ``base_dir``, else None (said in one line if one is there).

    Complete: ``config.json`` and its weights load. A folder left half-written
    by an older launcher killed mid-export is reported and ignored (the caller
    pre-trains the base again, which resumes from its checkpoints).
    """
    if not base_dir.exists():
        return None
    try:
        return lorajax.models.from_pretrained(base_dir)
    except Exception as e:  # any damage (missing/truncated file, bad JSON): the checkpoints can rebuild it
        print(f"{base_dir} is incomplete ({type(e).__name__}: {e}); pre-training the base again", flush=True)
        return None


def _check_lengths(ids: dict, seq: int) -> None:
    """Every split holds at least one window of ``seq + 1`` characters (else a ValueError naming the split)."""
    for split, x in ids.items():
        if len(x) < seq + 2:
            raise ValueError(
                f"the lm corpus's {split} split has {len(x)} characters, fewer than one window of "
                f"--max-length {seq} + 1; lower --max-length (or raise --max-test)"
            )


def run(cfg: RunConfig) -> dict:
    """Pre-train (or load) the base, adapt it to the comedies; the results dict (see the module doc)."""
    out = Path(cfg.out_dir)
    corpus = speeches.lm_corpus(cfg.data or None, encoding=cfg.encoding)
    tok = CharTokenizer.fit("".join(corpus.values()))
    ids = {k: tok.encode(v) for k, v in corpus.items()}
    if cfg.max_test is not None:
        ids["adapt_test"] = ids["adapt_test"][: cfg.max_test * (cfg.max_length + 1) + 1]
    seq, steps = cfg.max_length, cfg.steps
    _check_lengths(ids, seq)
    run_identity.record(cfg)  # inputs loaded: out_dir is created with the run's config, then written

    base_dir = out / "base"
    loaded = load_base(base_dir)
    if loaded is not None:
        model, params = loaded
    else:
        mcfg = llama.Config(
            vocab_size=tok.vocab_size,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max(seq, 128),
            architectures=("LlamaForCausalLM",),
        )
        model = llama.build(mcfg)
        params = model.init(jax.random.key(cfg.seed), jnp.zeros((1, seq), jnp.int32))["params"]

        def full_loss(_, p, batch):
            return lm_loss(model.apply({"params": p}, batch[:, :-1]), batch)

        tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(50, steps), max(2 * steps, 2)))
        state, _ = lorajax.train.fit(
            full_loss,
            tx,
            None,
            lorajax.train.TrainState.create(tx, params),
            window_batches(ids["pretrain"], cfg.batch_size, seq, cfg.seed),
            2 * steps,
            out_dir=str(out / "pretrain"),
            ckpt_every=cfg.ckpt_every,
            keep=cfg.keep,
            progress=cfg.progress,
            desc="pre-train base (full)",
            on_nonfinite=cfg.on_nonfinite,
        )
        params = state.trainable
        if main_process():  # the other processes of a multi-host job keep the params they trained
            lorajax.models.save_pretrained(base_dir, model, params)
    variables = {"params": params}

    spec = cfg.spec.to_spec()
    adapters = lorajax.init(spec, variables, jax.random.key(cfg.seed + 1))
    mesh = None
    if cfg.mesh:  # weights split by lorajax.sharding's Llama rules, adapters follow, batches over data x fsdp
        mesh = sharding.make_mesh(cfg.mesh)
        model = model.clone(token_sharding=sharding.token_sharding(mesh))  # FSDP gathers weights, not tokens
        adapters = sharding.shard(adapters, mesh, like=variables)
        variables = sharding.shard(variables, mesh)
    trainable, frozen = lorajax.partition(spec, adapters)
    fwd = lorajax.adapt(model.apply, spec, mode="factored")
    fwd_aux = lorajax.adapt(model.apply, spec, mode="factored", aux=True)  # also gives routing statistics

    def loss_fn(v, a, batch):
        return lm_loss(fwd(v, a, batch[:, :-1]), batch)

    def train_loss(v, a, batch):  # aux: routing statistics (FlyLoRA, SMoRA) for refresh_state, else {}
        logits, aux = fwd_aux(v, a, batch[:, :-1])
        return lm_loss(logits, batch) + extra_loss(cfg, a), aux

    eval_loss = jax.jit(loss_fn)
    test = ids["adapt_test"]
    n = (len(test) - 1) // (seq + 1)
    windows = np.stack([test[i * (seq + 1) : i * (seq + 1) + seq + 1] for i in range(n)])

    def held_out(a) -> float:
        return float(
            np.mean(
                [
                    float(eval_loss(variables, a, jnp.asarray(windows[i : i + cfg.batch_size])))
                    for i in range(0, n, cfg.batch_size)
                ]
            )
        )

    before = held_out(adapters)
    tx = make_tx(cfg, cfg.optim.lr, spec=spec)
    state, hist = lorajax.train.fit(
        train_loss,
        tx,
        variables,
        lorajax.train.TrainState.create(tx, trainable, frozen),
        window_batches(ids["adapt_train"], cfg.batch_size, seq, cfg.seed + 2),
        steps,
        out_dir=str(out / "lora"),
        ckpt_every=cfg.ckpt_every,
        keep=cfg.keep,
        eval_fn=lambda st: {"held_out_loss": held_out(st.combined)},
        eval_every=cfg.eval_every,
        progress=cfg.progress,
        desc=f"{spec.variant} on comedies",
        mesh=mesh,
        state_update=lorajax.train.refresh_state(spec),
        on_nonfinite=cfg.on_nonfinite,
    )
    adapters = state.combined
    after = held_out(adapters)
    if not np.isfinite(after):
        raise FloatingPointError(f"held-out loss after adapting is {after}: the adapters diverged; lower --optim.lr")
    counts = lorajax.count_params(spec, variables, adapters)
    step_ms = step_time_ms(hist, out / "lora")

    prompt = jnp.asarray(tok.encode("Viola: ")[None, :])
    if lorajax.registry.get(spec.variant).mergeable:
        merged = lorajax.merge(spec, variables, adapters)["params"]
        sample = tok.decode(
            np.asarray(
                llama.generate(model, merged, prompt, 120, temperature=0.8, top_p=0.95, key=jax.random.key(cfg.seed))
            )[0]
        )
    else:  # input-dependent routing cannot be merged into the weights the KV-cache generator uses
        sample = f"(no sample: variant {spec.variant} is not mergeable)"
    try:
        if main_process():
            lorajax.peft.save(out / "peft_adapter", spec, adapters, variables, base_model_name_or_path=str(base_dir))
    except ValueError as e:  # a variant PEFT has no format for
        print(f"no PEFT export: {e}", flush=True)
    table = markdown_table(
        ["held-out comedies loss (nats/char), base", "after adapters", "trainable", "total", "step time"],
        [[f"{before:.4f}", f"{after:.4f}", f"{counts['trainable']:,}", f"{counts['total']:,}", format_ms(step_ms)]],
    )
    curve = loss_curve(out / "lora")  # every call's steps (also when this call resumed after training ended)
    if curve:
        loss_plot({f"{spec.variant} on comedies": curve}, out / "loss.png", title="lm task")
    text = (
        f"# LM on Shakespeare speeches\n\nBase: Llama-style, pre-trained {2 * steps} steps on histories, "
        f"tragedies and romances; adapters ({spec.variant} r={spec.rank}, targets {cfg.spec.targets}) {steps} steps on "
        f"comedies; evaluated on unseen comedies. Batch {cfg.batch_size} x {seq} chars.\n\n{table}\n\n"
        f"Sample (merged adapters, T=0.8, top-p 0.95):\n\n```\n{sample}\n```\n"
    )
    results = {"base_loss": before, "lora_loss": after, "step_ms": step_ms, **counts, "sample": sample}
    write_results(out, text, {**results, "final_loss": curve[-1][1] if curve else None})
    return {**results, "loss_curve": curve, "table": table, "out_dir": str(out)}
