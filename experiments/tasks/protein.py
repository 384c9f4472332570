"""Task "protein": a small protein LM made to honour property tags by LoRA (SYNTHETIC sequences).

The offline design of the project's spec for Shah & Jayaratnam, "Energy-Efficient
Protein Language Models: Leveraging Small Language Models with LoRA for
Controllable Protein Generation" (arXiv:2411.05966; no official code is public).
Data: `lorajax.data.proteins` (K = 4 property classes, each a Markov chain over
the 20 amino-acid letters plus a class motif; 48 letters; fresh sequences every
step, deterministic in ``(--seed, step)``; the grammar itself is fixed,
`GRAMMAR_SEED`), so an exact oracle can tell the class of any generated sequence.

1. Stage 1 (full pre-training, ``--steps`` Adam steps at `PRETRAIN_LR`) of a
   2-layer, d = 64 `lorajax.models.llama` on UNTAGGED records ``<bos> Seq=< x >``
   of all classes; saved as a HF folder in ``out_dir/base`` with
   `TOKENIZER_FILE` beside it (a re-run loads it; resumable in ``out_dir/pretrain``).
2. Stage 2: the base frozen, ``--spec`` adapters (the config: LoRA r=8, alpha=16,
   all-linear = q,k,v,o,gate,up,down) trained ``--steps`` steps (``--optim``) on
   tagged records ``<bos> [Gen] P<c> Seq=< x >`` with the launcher's LM loss over
   the whole record (`experiments.tasks.lm.train_adapters`; resumable in
   ``out_dir/lora``). With ``--baseline`` (default) also every weight trained the
   same way at `FULL_LR` (``out_dir/full``); ``--spec.variant full`` trains only that.

Arms, each prompted with the same ``<bos> [Gen] P<c> Seq=<``: ``base`` (stage 1:
it never saw a tag), the adapters (generated in factored mode through
``llama.generate(apply_fn=...)``), ``full``. Per arm: ``--max-test`` sequences per
tag (default `GEN_PER_TAG`) sampled at temperature 1 up to 49 tokens; the
oracle's tag accuracy; valid rate (letters only, ``>`` emitted), mean length, rate
of the requested tag's motif; perplexity per letter on `HELD_OUT_PER_CLASS` x K
held-out tagged sequences (the exact model's own perplexity is the floor);
FLOPs per generated sequence counted from the matrix products of the lowered
prefill and decode-step programs (`generation_flops`; all 49 steps counted,
the attention over every cache slot as the decoder runs it) and the measured
wall time and process CPU time (all threads) per generated sequence on this
machine (one batch of all tags, after a compile run). No energy number: power
was not measured.

Artefacts in ``out_dir``: ``run_config.json``, ``pretrain/``, ``base/``, ``lora/``,
``full/``, ``results.md``, ``results.json``, ``loss.png``. A re-run of a finished
run trains nothing: it restores the checkpoints and recomputes the evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax
from experiments import run_identity
from experiments.config import RunConfig
from experiments.report import loss_curve, loss_plot, main_process, markdown_table, write_results
from experiments.tasks.lm import lm_loss, train_adapters, with_step
from experiments.validate import ConfigError
from lorajax import atomic, hlo
from lorajax.data import proteins
from lorajax.models import llama

#: the grammar's seed (the same task for every ``--seed``; seeds change init, data order and sampling)
GRAMMAR_SEED = 0
#: sequences generated per tag (``--max-test`` overrides)
GEN_PER_TAG = 64
#: held-out tagged sequences per class for the perplexity
HELD_OUT_PER_CLASS = 64
#: stage-1 (pre-training) and full fine-tuning peak learning rates (Adam, warm-up + cosine)
PRETRAIN_LR, FULL_LR = 3e-3, 1e-3
#: the tokenizer file written beside the base (``{"kind": "protein", "num_classes": K}``)
TOKENIZER_FILE = "protein_tokenizer.json"
#: prompt tokens of a tagged record (``<bos> [Gen] P<c> Seq=<``) and the record's length
PROMPT_LEN = 4
TAGGED_LEN = PROMPT_LEN + proteins.LENGTH + 1
#: ``--model`` names of the built-in base (``minilm`` is the launcher default's spelling)
MODELS = ("tiny", "minilm")


def model_config(vocab_size: int, max_length: int) -> llama.Config:
    """The base: 2 layers, d = 64, 4 query / 2 key-value heads, SwiGLU width 176."""
    return llama.Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_length,
        architectures=("LlamaForCausalLM",),
    )


def check_config(cfg: RunConfig) -> None:
    """The protein task's own fields (the launcher's `validate` checked the shared ones)."""
    if cfg.model not in MODELS:
        raise ConfigError(f"--model: the protein task pre-trains its own small base (tiny), got {cfg.model!r}")
    if cfg.data:
        raise ConfigError(f"--data: the protein task's sequences are synthetic (none is read), got {cfg.data!r}")
    if cfg.max_train is not None:
        raise ConfigError("--max-train: the protein task draws fresh sequences every step; leave it out")
    if cfg.max_length < TAGGED_LEN:
        raise ConfigError(
            f"--max-length must be >= {TAGGED_LEN} (a tagged record: {PROMPT_LEN} prompt tokens, "
            f"{proteins.LENGTH} letters and '>'), got {cfg.max_length}"
        )
    if cfg.mesh or cfg.distributed:
        raise ConfigError("--mesh / --distributed: the protein task runs on one device")
    if cfg.spec.variant != "full":
        spec = cfg.spec.to_spec()
        tok = proteins.ProteinTokenizer(proteins.NUM_CLASSES)
        model = llama.build(model_config(tok.vocab_size, cfg.max_length))
        abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        try:
            chosen = spec.selection.resolve(abstract)
        except ValueError as e:  # a target naming nothing, with the weights there are
            raise ConfigError(f"--spec.targets (the protein model's Llama): {e}") from None
        if not chosen:
            raise ConfigError(f"--spec.targets {cfg.spec.targets!r} matches no weight of the protein model")


# ----------------------------------------------------------------------------- data


def _seed(*parts: int) -> int:
    return int(np.random.default_rng(list(parts)).integers(2**31))


def batch_fn(cfg: RunConfig, grammar: proteins.Grammar, tok: proteins.ProteinTokenizer, tagged: bool) -> Callable:
    """``step -> [batch, record]`` int32 records of random classes, a pure function of ``(seed, stream, step)``."""
    stream = 2 if tagged else 1

    def fn(step: int):
        classes = np.random.default_rng([cfg.seed, stream, step]).integers(0, grammar.num_classes, cfg.batch_size)
        seqs = proteins.sample(grammar, classes, _seed(cfg.seed, stream, step))
        return jnp.asarray(tok.records(seqs, classes if tagged else None))

    return fn


def held_out(cfg: RunConfig, grammar: proteins.Grammar) -> tuple[list[str], np.ndarray]:
    """``(sequences, classes [N])``: `HELD_OUT_PER_CLASS` sequences per class from a stream training never draws."""
    classes = np.arange(HELD_OUT_PER_CLASS * grammar.num_classes) % grammar.num_classes
    return proteins.sample(grammar, classes, _seed(cfg.seed, 99)), classes


# ----------------------------------------------------------------------------- training


def adam(cfg: RunConfig, lr: float, steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, min(cfg.optim.warmup, steps // 2), max(steps, 2)))


def full_train(cfg: RunConfig, model, params: dict, batches: Callable, folder: Path, lr: float, desc: str):
    """Every weight trained ``cfg.steps`` Adam steps on ``batches`` (resumable in ``folder``): the params."""

    def loss(_, p, batch):
        return lm_loss(model.apply({"params": p}, batch[:, :-1]), batch)

    tx = adam(cfg, lr, cfg.steps)
    state, _ = lorajax.train.fit(
        loss,
        tx,
        None,
        lorajax.train.TrainState.create(tx, params),
        batches,
        cfg.steps,
        out_dir=str(folder),
        **cfg.fit_options(),
        desc=desc,
    )
    return state.trainable


def load_or_pretrain(cfg: RunConfig, out: Path, grammar, tok) -> tuple[Any, dict]:
    """The stage-1 base from ``out/base``, else pre-trained (resumable) and saved there."""
    base_dir = out / "base"
    if (base_dir / TOKENIZER_FILE).is_file():  # written last: the folder is complete
        return lorajax.models.from_pretrained(base_dir)
    model = llama.build(model_config(tok.vocab_size, cfg.max_length))
    init = jax.jit(model.init)(jax.random.key(cfg.seed), jnp.zeros((1, TAGGED_LEN), jnp.int32))["params"]
    params = full_train(cfg, model, init, batch_fn(cfg, grammar, tok, False), out / "pretrain", PRETRAIN_LR, "stage 1")
    if main_process():
        lorajax.models.save_pretrained(base_dir, model, params)
        info = {"kind": "protein", "num_classes": grammar.num_classes, "grammar_seed": GRAMMAR_SEED}
        atomic.write_text(base_dir / TOKENIZER_FILE, json.dumps(info) + "\n")
    return model, params


# ----------------------------------------------------------------------------- evaluation


def letter_nll(call: Callable, params: Any, records: np.ndarray, batch: int = 128) -> float:
    """Mean next-token NLL (nats) of the letters of tagged ``records [N, TAGGED_LEN]`` (prompt and ``>`` not scored)."""
    fn = jax.jit(
        lambda p, r: optax.softmax_cross_entropy_with_integer_labels(
            call(p, r[:, :-1]).astype(jnp.float32)[:, PROMPT_LEN - 1 : PROMPT_LEN - 1 + proteins.LENGTH],
            r[:, PROMPT_LEN : PROMPT_LEN + proteins.LENGTH],
        ).sum()
    )
    total = sum(float(fn(params, jnp.asarray(records[i : i + batch]))) for i in range(0, len(records), batch))
    return total / (len(records) * proteins.LENGTH)


def generation_flops(call: Callable, params: Any, cfg: llama.Config, prompt_len: int, new: int, batch: int = 8) -> int:
    """FLOPs per generated sequence: ``2·M·N·K`` of every matrix product in the lowered (unoptimised) HLO of the
    prefill (``prompt_len`` tokens) and of one decode step, the decode counted ``new - 1`` times (every step
    of `llama.generate` runs; each attends over all ``prompt_len + new`` cache slots)."""
    slots = prompt_len + new
    cache = llama.init_cache(cfg, batch, slots)
    mask = jnp.ones((batch, slots), jnp.int32)

    def count(ids, pos, index) -> int:
        fn = jax.jit(lambda p, c, i, q: call(p, i, attention_mask=mask, position_ids=q, cache=c, cache_index=index))
        text = fn.lower(params, cache, ids, pos).as_text(dialect="hlo")
        return sum(2 * int(np.prod(d.out_shape)) * d.contracted for d in hlo.dot_products(text))

    prefill = count(jnp.zeros((batch, prompt_len), jnp.int32), jnp.tile(jnp.arange(prompt_len)[None], (batch, 1)), 0)
    step = count(jnp.zeros((batch, 1), jnp.int32), jnp.full((batch, 1), prompt_len, jnp.int32), prompt_len)
    return (prefill + (new - 1) * step) // batch


def generate_arm(model, params, apply_fn, tok, grammar, n_per_tag: int, seed: int) -> dict:
    """Sample ``n_per_tag`` sequences per tag (T = 1); the oracle's verdicts, properties and the time per sequence."""
    k = grammar.num_classes
    tags = np.repeat(np.arange(k), n_per_tag)
    prompts = jnp.asarray(np.stack([tok.prompt(int(c)) for c in tags]))
    key = jax.random.key(seed)

    def gen():
        return llama.generate(
            model,
            params,
            prompts,
            proteins.LENGTH + 1,
            temperature=1.0,
            key=key,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            apply_fn=apply_fn,
        ).block_until_ready()

    gen()  # compile
    t0, c0 = time.perf_counter(), time.process_time()
    out = np.asarray(gen())
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    texts = [tok.sequence(row[PROMPT_LEN:]) for row in out]
    ended = [tok.eos_id in row[PROMPT_LEN:].tolist() for row in out]
    letters = [s.replace(proteins.UNKNOWN, "") for s in texts]
    predicted = proteins.classify(grammar, letters)
    props = [proteins.properties(grammar, s) for s in texts]
    correct = predicted == tags
    return {
        "tag_accuracy": float(correct.mean()),
        "per_tag_accuracy": [float(correct[tags == c].mean()) for c in range(k)],
        "valid_rate": float(np.mean([p["valid"] and e for p, e in zip(props, ended)])),
        "mean_length": float(np.mean([p["length"] for p in props])),
        "motif_rate": float(np.mean([p["motifs"][c] for p, c in zip(props, tags)])),
        "seconds_per_sequence": seconds / len(tags),
        "cpu_seconds_per_sequence": cpu_seconds / len(tags),
        "generated": len(tags),
        "samples": {f"P{c}": texts[c * n_per_tag] for c in range(k)},
    }


def evaluate(name: str, model, call, params, apply_fn, tok, grammar, cfg: RunConfig, held) -> dict:
    """One arm's generation results, held-out perplexity and FLOPs per generated sequence."""
    seqs, classes = held
    n = cfg.max_test or GEN_PER_TAG
    res = generate_arm(model, params, apply_fn, tok, grammar, n, cfg.seed + 7)
    nll = letter_nll(call, params, tok.records(seqs, classes))
    res["perplexity"] = float(np.exp(nll))
    res["flops_per_sequence"] = generation_flops(call, params, model.cfg, PROMPT_LEN, proteins.LENGTH + 1)
    print(
        f"{name}: tag accuracy {res['tag_accuracy']:.3f}, perplexity {res['perplexity']:.3f}, "
        f"{res['flops_per_sequence'] / 1e6:.2f} MFLOP and {1e3 * res['seconds_per_sequence']:.2f} ms per sequence",
        flush=True,
    )
    return res


# ----------------------------------------------------------------------------- run


def run(cfg: RunConfig) -> dict:
    """Pre-train (or load) the base, train the stage-2 arms, evaluate every arm; the results dict."""
    out = Path(cfg.out_dir)
    grammar = proteins.make_grammar(GRAMMAR_SEED)
    tok = proteins.ProteinTokenizer(grammar.num_classes)
    run_identity.record(cfg)
    model, params = load_or_pretrain(cfg, out, grammar, tok)
    model = model.clone(
        attention=cfg.attention,
        remat=cfg.remat,
        dtype=None if cfg.compute_dtype == "float32" else jnp.dtype(cfg.compute_dtype),
    )
    held = held_out(cfg, grammar)
    full_ll, _ = proteins.log_likelihoods(grammar, held[0])
    oracle = {
        "tag_accuracy_on_true_sequences": float((proteins.classify(grammar, held[0]) == held[1]).mean()),
        "perplexity": float(np.exp(-full_ll[np.arange(len(held[1])), held[1]].mean() / proteins.LENGTH)),
    }

    def plain(p, ids, **kw):
        return model.apply({"params": p}, ids, **kw)

    n_base = sum(int(x.size) for x in jax.tree.leaves(params))
    arms: dict[str, dict] = {}
    curves: dict[str, list] = {"stage 1 (untagged, full)": loss_curve(out / "pretrain")}
    arms["base"] = {**evaluate("base", model, plain, params, None, tok, grammar, cfg, held), "trainable": 0}
    tagged = batch_fn(cfg, grammar, tok, True)
    full_lr = cfg.optim.lr if cfg.spec.variant == "full" else FULL_LR
    if cfg.spec.variant != "full":
        spec = cfg.spec.to_spec()
        variables = {"params": params}
        adapters = lorajax.init(spec, variables, jax.random.key(cfg.seed + 1))
        state, _, _ = train_adapters(
            cfg,
            model,
            variables,
            spec,
            adapters,
            with_step(tagged),
            out / "lora",
            eval_fn=None,
            mesh=None,
            desc=f"stage 2: {spec.variant} on tagged records",
        )
        adapters = state.combined
        fwd = lorajax.adapt(model.apply, spec, mode="factored")

        def adapted(pa, ids, **kw):
            return fwd({"params": pa[0]}, pa[1], ids, **kw)

        res = evaluate(spec.variant, model, adapted, (params, adapters), adapted, tok, grammar, cfg, held)
        arms[spec.variant] = {**res, "trainable": lorajax.count_params(spec, variables, adapters)["trainable"]}
        curves[f"stage 2: {spec.variant}"] = loss_curve(out / "lora")
    if cfg.spec.variant == "full" or cfg.baseline:
        tuned = full_train(cfg, model, params, tagged, out / "full", full_lr, "stage 2: full fine-tuning")
        arms["full"] = {**evaluate("full", model, plain, tuned, None, tok, grammar, cfg, held), "trainable": n_base}
        curves["stage 2: full"] = loss_curve(out / "full")
    for arm in arms.values():
        arm["trainable_percent"] = 100.0 * arm["trainable"] / n_base
    results = {
        "seed": cfg.seed,
        "steps": cfg.steps,
        "lr": cfg.optim.lr,
        "full_lr": full_lr,
        "base_params": n_base,
        "oracle": oracle,
        "arms": arms,
    }
    if main_process() and any(curves.values()):
        loss_plot({k: v for k, v in curves.items() if v}, out / "loss.png", title="protein task (synthetic)")
    write_results(out, report(cfg, results), results)
    return {**results, "out_dir": str(out)}


def report(cfg: RunConfig, results: dict) -> str:
    """The run's results.md."""
    rows = [
        [
            name,
            f"{a['tag_accuracy']:.3f}",
            " / ".join(f"{x:.2f}" for x in a["per_tag_accuracy"]),
            f"{a['valid_rate']:.3f}",
            f"{a['mean_length']:.1f}",
            f"{a['motif_rate']:.3f}",
            f"{a['perplexity']:.3f}",
            f"{a['trainable']:,} ({a['trainable_percent']:.1f}%)",
            f"{a['flops_per_sequence'] / 1e6:.2f}",
            f"{1e3 * a['seconds_per_sequence']:.3f}",
            f"{1e3 * a['cpu_seconds_per_sequence']:.3f}",
        ]
        for name, a in results["arms"].items()
    ]
    table = markdown_table(
        [
            "arm",
            "tag accuracy",
            "per tag P0/P1/P2/P3",
            "valid",
            "mean length",
            "motif of tag",
            "perplexity/letter",
            "trainable",
            "MFLOP/seq",
            "ms/seq (wall)",
            "ms/seq (CPU)",
        ],
        rows,
    )
    o = results["oracle"]
    samples = "\n".join(f"{name} {tag}: {s}" for name, a in results["arms"].items() for tag, s in a["samples"].items())
    n = cfg.max_test or GEN_PER_TAG
    stage2 = (
        []
        if cfg.spec.variant == "full"
        else [f"{cfg.spec.variant} r={cfg.spec.rank} ({cfg.optim.name}, lr {cfg.optim.lr})"]
    )
    if "full" in results["arms"]:
        stage2.append(f"full fine-tuning (Adam, lr {results['full_lr']})")
    return (
        f"# Tag-conditioned protein generation (SYNTHETIC sequences), seed {cfg.seed}\n\n"
        f"Stage 1: {results['base_params']:,}-parameter Llama (2 layers, d=64) pre-trained {cfg.steps} steps on "
        f"untagged sequences; stage 2: {' and '.join(stage2)} {cfg.steps} steps on tagged ones, "
        f"batch {cfg.batch_size}. "
        f"{n} sequences generated per tag at temperature 1, classified by the exact oracle. Perplexity on "
        f"{HELD_OUT_PER_CLASS * proteins.NUM_CLASSES} held-out tagged sequences; the true model's own: "
        f"{o['perplexity']:.3f} (oracle accuracy on true sequences {o['tag_accuracy_on_true_sequences']:.3f}). "
        "MFLOP/seq: matrix products of the lowered prefill + 48 decode steps; ms/seq: wall and process CPU "
        f"time on this machine, one batch of {n * proteins.NUM_CLASSES}.\n\n{table}\n\n"
        f"One sample per tag:\n\n```\n{samples}\n```\n"
    )
