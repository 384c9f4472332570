"""Task "lm": a Llama-family decoder adapted to Shakespeare's comedies, evaluated on two unseen ones.

Data: `lorajax.data.speeches.lm_corpus` ("SPEAKER: text" lines): ``pretrain``
(histories, tragedies, romances), ``adapt_train`` (comedies) and ``adapt_test``
(two unseen comedies, Twelfth Night and Much Ado: the test split). The last
`VAL_FRACTION` of ``adapt_train``'s tokens is held out from training as the
validation split (for picking learning rates; never the test plays).

The base (``--model``):

* ``tiny`` (also ``minilm``, the launcher's default): a small `lorajax.models.llama`
  pre-trained from scratch (full fine-tuning, ``2 * --steps`` steps) on
  ``pretrain``, characters as tokens; saved as a HF checkpoint in
  ``out_dir/base`` with its `CHAR_TOKENIZER` beside it (re-runs load it; an
  incomplete ``base/`` is pre-trained again, resuming from ``pretrain/``);
* ``scratch``: that tiny config randomly initialised (no pre-training), e.g. to
  train from scratch with ``--spec.variant full``;
* a local HF Llama-family folder (`lorajax.models.from_pretrained`); its
  ``tokenizer.json`` or `CHAR_TOKENIZER` is the tokenizer, so ``--model
  <an earlier out_dir>/base`` shares one pre-trained base across runs.

Then either adapters (any variant; ``--init`` pissa | olora | lora_ga shift the
base, and the run trains and evaluates on the residual base) are trained on
``adapt_train`` with the base frozen, or with ``--spec.variant full`` every
weight is trained (``make_tx(full=...)``: adamw | adam | sgd | galore). After
training, optionally: ``--eval-ranks`` (`lorajax.truncate` to each rank),
``--squeeze-to`` / ``--squeeze-steps`` (`lorajax.squeeze`, then more steps at the
new rank with a fresh optimiser state and its own warm-up + cosine schedule over
those steps, i.e. rank_tools' ``reset`` moment handling), SoRA pruning
(``--spec.variant sora``: `lorajax.optim.prune` to plain LoRA), each evaluated on
the validation and test splits. Losses are nats/token, averaged over every token
of non-overlapping windows.

Artefacts in ``out_dir``: ``run_config.json``, ``pretrain/``, ``lora/`` or
``full/`` and ``squeeze/`` (checkpoints, metrics), ``base/``,
``peft_adapter/`` or ``model/`` (``--no-export``: none), ``results.md``,
``results.json``, ``loss.png``; each export is written atomically. A re-run of
a finished run trains nothing: it restores the final checkpoints, recomputes the
(deterministic) init and evaluations and rewrites the results.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

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
from experiments.validate import ConfigError
from lorajax import atomic, diagnostics, sharding
from lorajax.data import speeches
from lorajax.data.shakespeare import CharTokenizer
from lorajax.models import llama
from lorajax.optim.sora import is_sora
from lorajax.plan import adapter_paths

#: fraction of ``adapt_train``'s tokens (its end) held out as the validation split
VAL_FRACTION = 0.1
#: the char tokenizer file the lm task writes beside the base it pre-trains (``{"kind": "char", "chars": ...}``)
CHAR_TOKENIZER = "char_tokenizer.json"
#: ``--model`` names of the built-in tiny base: pre-trained (``minilm`` is the launcher default's spelling)
PRETRAINED_TINY = ("tiny", "minilm")
#: inits that shift the base (they return ``(adapters, residual params)``)
BASE_SHIFTING = ("pissa", "olora", "lora_ga")


def window_batches(ids: np.ndarray, batch: int, seq: int, seed: int):
    """``batch(step) -> [batch, seq + 1]`` windows at offsets drawn from ``(seed, step)``."""

    def fn(step: int):
        starts = np.random.default_rng([seed, step]).integers(0, len(ids) - seq - 1, batch)
        return jnp.asarray(np.stack([ids[s : s + seq + 1] for s in starts]))

    return fn


def lm_loss(logits_BxSxV, tokens_BxS1):
    """Mean next-token cross-entropy, in float32 whatever the logits' dtype (``--compute-dtype bfloat16``)."""
    logits = logits_BxSxV.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxS1[:, 1:]).mean()


def chunked_lm_loss(llama_cfg: llama.Config, params: dict, h_BxSxD, tokens_BxS1, chunk: int):
    """`lm_loss` from the final hidden states ``h [B, S, D]`` without the whole logits: the output head and the
    float32 cross-entropy `chunk` tokens at a time (`lorajax.train.losses.chunked_cross_entropy`)."""
    h_TxD = h_BxSxD.reshape(-1, h_BxSxD.shape[-1])
    w_DxV = llama.output_kernel(llama_cfg, params)
    return lorajax.train.losses.chunked_cross_entropy(h_TxD, w_DxV, tokens_BxS1[:, 1:].reshape(-1), chunk=chunk)


def window_losses(logits_BxSxV, tokens_BxS1):
    """``[B]``: each window's mean next-token loss (their mean is `lm_loss`: every window has S tokens)."""
    logits = logits_BxSxV.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxS1[:, 1:]).mean(-1)


def per_window(loss_B: Callable, wins: np.ndarray, batch_size: int) -> np.ndarray:
    """``[N]``: ``loss_B(batch)`` (per-window losses) over ``wins`` in batches of ``batch_size``."""
    return np.concatenate(
        [np.asarray(loss_B(jnp.asarray(wins[i : i + batch_size]))) for i in range(0, len(wins), batch_size)]
    )


def loss_gain(base_N: np.ndarray, after_N: np.ndarray) -> dict[str, float]:
    """Loss before and after training on the same ``N`` test windows, each with its standard error, and the
    gain ``base - after`` with its paired standard error (the SE of the per-window differences' mean: both
    are scored on the same windows, so their errors are correlated)."""
    from experiments.stats import t_interval

    before, after, gain = (t_interval(x) for x in (base_N, after_N, np.asarray(base_N) - np.asarray(after_N)))
    return {
        "base_loss_se": before.se,
        "test_loss_se": after.se,
        "gain": gain.mean,
        "gain_se": gain.se,
        "gain_in_se": gain.mean / gain.se if gain.se > 0 else float("nan"),
        "test_windows": len(base_N),
    }


# ----------------------------------------------------------------------------- tokenizers


class HFTextTokenizer:
    """A HF ``tokenizer.json`` (`lorajax.models.tokenizer.Tokenizer`) as a text -> ids stream tokenizer."""

    def __init__(self, folder: Path):
        from lorajax.models.tokenizer import Tokenizer

        self.tok = Tokenizer.from_pretrained(folder)
        self.vocab_size = self.tok.vocab_size

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of ``text`` (special tokens as the tokenizer adds them to one sequence; no truncation)."""
        ids = self.tok.encode_batch([text], max_length=4 * len(text) + 16, padding=False)["input_ids"]
        return ids[0].astype(np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode(np.asarray(ids).tolist())


def save_char_tokenizer(folder: Path, tok: CharTokenizer) -> None:
    """Write `CHAR_TOKENIZER` into ``folder`` (atomically)."""
    if main_process():
        atomic.write_text(folder / CHAR_TOKENIZER, json.dumps({"kind": "char", "chars": tok.chars}) + "\n")


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer of a model folder: ``tokenizer.json``, else `CHAR_TOKENIZER`, else a ValueError."""
    if (folder / "tokenizer.json").is_file():
        return HFTextTokenizer(folder)
    path = folder / CHAR_TOKENIZER
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            ok = isinstance(data, dict) and data.get("kind") == "char" and isinstance(data.get("chars"), str)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{path} is not a char tokenizer file ({{'kind': 'char', 'chars': ...}})")
        return CharTokenizer(data["chars"])
    raise ValueError(
        f"--model {folder}: no tokenizer.json nor {CHAR_TOKENIZER} in the folder (the lm task needs one "
        "to tokenize the plays)"
    )


# ----------------------------------------------------------------------------- data


def windows(ids: np.ndarray, seq: int, cap: int | None = None) -> np.ndarray:
    """Non-overlapping ``[n, seq + 1]`` windows from the start of ``ids`` (at most ``cap``)."""
    n = (len(ids) - 1) // (seq + 1)
    n = n if cap is None else min(n, cap)
    return np.stack([ids[i * (seq + 1) : i * (seq + 1) + seq + 1] for i in range(n)])


def _check_lengths(ids: dict, seq: int) -> None:
    """Every split holds at least one window of ``seq + 1`` tokens (else a ValueError naming the split)."""
    for split, x in ids.items():
        if len(x) < seq + 2:
            raise ValueError(
                f"the lm corpus's {split} split has {len(x)} tokens, fewer than one window of "
                f"--max-length {seq} + 1; lower --max-length (or raise --max-test)"
            )


def split_ids(corpus: dict, tok: Any, cfg: RunConfig, pretrain: bool) -> dict[str, np.ndarray]:
    """Token ids of the splits: ``train`` / ``val`` (the end of ``adapt_train``), ``test``, and ``pretrain``."""
    adapt = tok.encode(corpus["adapt_train"])
    cut = int(round(len(adapt) * (1 - VAL_FRACTION)))
    ids = {"train": adapt[:cut], "val": adapt[cut:], "test": tok.encode(corpus["adapt_test"])}
    if cfg.max_test is not None:
        ids["test"] = ids["test"][: cfg.max_test * (cfg.max_length + 1) + 1]
    if cfg.max_val is not None:
        ids["val"] = ids["val"][: cfg.max_val * (cfg.max_length + 1) + 1]
    if pretrain:
        ids["pretrain"] = tok.encode(corpus["pretrain"])
    _check_lengths(ids, cfg.max_length)
    return ids


# ----------------------------------------------------------------------------- the base


def tiny_config(vocab_size: int, seq: int) -> Any:
    """The built-in base's `llama.Config` (2 layers, width 128)."""
    return llama.Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(seq, 128),
        architectures=("LlamaForCausalLM",),
    )


def init_params(model: Any, seed: int, seq: int) -> dict:
    """``model``'s random params (one compiled init, not one program per layer's initialiser)."""
    return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, seq), jnp.int32))["params"]


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


def pretrain_base(cfg: RunConfig, out: Path, pretrain_ids: np.ndarray, vocab_size: int) -> tuple[Any, dict]:
    """Pre-train the tiny base ``2 * cfg.steps`` steps (resumable in ``out/pretrain``); ``(model, params)``."""
    seq, steps = cfg.max_length, cfg.steps
    model = llama.build(tiny_config(vocab_size, seq))
    params = init_params(model, cfg.seed, seq)

    def full_loss(_, p, batch):
        return lm_loss(model.apply({"params": p}, batch[:, :-1]), batch)

    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(50, steps), max(2 * steps, 2)))
    state, _ = lorajax.train.fit(
        full_loss,
        tx,
        None,
        lorajax.train.TrainState.create(tx, params),
        window_batches(pretrain_ids, cfg.batch_size, seq, cfg.seed),
        2 * steps,
        out_dir=str(out / "pretrain"),
        **cfg.fit_options(),
        desc="pre-train base (full)",
    )
    return model, state.trainable


def load_model(cfg: RunConfig, out: Path, corpus: dict) -> tuple[Any, dict, Any, dict, str]:
    """``(model, params, tokenizer, ids, base name)`` of ``--model`` (see the module doc); pre-trains if needed."""
    if cfg.model in PRETRAINED_TINY or cfg.model == "scratch":
        tok: Any = CharTokenizer.fit("".join(corpus.values()))
        base_dir = out / "base"
        loaded = load_base(base_dir) if cfg.model != "scratch" else None
        ids = split_ids(corpus, tok, cfg, pretrain=cfg.model != "scratch" and loaded is None)
        run_identity.record(cfg)  # inputs loaded: out_dir is created with the run's config, then written
        if cfg.model == "scratch":
            model = llama.build(tiny_config(tok.vocab_size, cfg.max_length))
            params = init_params(model, cfg.seed, cfg.max_length)
            return model, params, tok, ids, "scratch (random init of the tiny config)"
        if loaded is None:
            model, params = pretrain_base(cfg, out, ids.pop("pretrain"), tok.vocab_size)
            if main_process():  # the other processes of a multi-host job keep the params they trained
                lorajax.models.save_pretrained(base_dir, model, params)
        else:
            model, params = loaded
        if not (base_dir / CHAR_TOKENIZER).is_file():  # written after the base (also by a re-run after a kill)
            save_char_tokenizer(base_dir, tok)
        return model, params, tok, ids, str(base_dir)
    folder = Path(cfg.model)
    tok = load_tokenizer(folder)
    ids = split_ids(corpus, tok, cfg, pretrain=False)
    model, params = lorajax.models.from_pretrained(folder)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"--model {folder}: the tokenizer has {tok.vocab_size} tokens, the model's embedding {model.cfg.vocab_size}"
        )
    run_identity.record(cfg)
    return model, params, tok, ids, str(folder)


# ----------------------------------------------------------------------------- evaluation


def mean_loss(loss: Callable, wins: np.ndarray, batch_size: int) -> float:
    """Token-weighted mean of ``loss(batch [b, seq + 1])`` over ``wins`` in batches of ``batch_size``."""
    total = sum(
        float(loss(jnp.asarray(wins[i : i + batch_size]))) * len(wins[i : i + batch_size])
        for i in range(0, len(wins), batch_size)
    )
    return total / len(wins)


def adapter_eval(model: Any, spec: lorajax.Spec) -> Callable:
    """``loss(variables, adapters, batch)`` of ``spec``'s adapters on the base (jitted, evaluation context)."""
    fwd = lorajax.adapt(model.apply, spec, mode="factored")
    return jax.jit(lambda v, a, batch: lm_loss(fwd(v, a, batch[:, :-1]), batch))


@dataclasses.dataclass
class Evaluator:
    """Validation and test losses of any model given as ``loss(batch)``."""

    val: np.ndarray
    test: np.ndarray
    batch_size: int

    def __call__(self, loss: Callable, test_N: np.ndarray | None = None) -> dict[str, float]:
        """Validation and test losses; ``test_N`` (per-window test losses already computed) spares a test pass."""
        out = {"val_loss": mean_loss(loss, self.val, self.batch_size)}
        out["test_loss"] = float(np.mean(test_N)) if test_N is not None else mean_loss(loss, self.test, self.batch_size)
        for k, v in out.items():
            if not np.isfinite(v):
                raise FloatingPointError(f"{k} is {v}: the model diverged; lower --optim.lr")
        return out

    def final(self, history: list[dict], steps: int, loss: Callable) -> dict[str, float]:
        """The losses after training: the last step's evaluation in ``history`` if there (finite), else computed."""
        last = history[-1] if history else {}
        val, test = last.get("eval/val_loss"), last.get("eval/held_out_loss")
        if last.get("step") == steps and val is not None and test is not None and np.isfinite([val, test]).all():
            return {"val_loss": float(val), "test_loss": float(test)}
        return self(loss)

    def metrics(self, loss: Callable) -> dict[str, float]:
        """The losses as training metrics: ``val_loss`` and ``held_out_loss`` (the test loss)."""
        out = self(loss)
        return {"val_loss": out["val_loss"], "held_out_loss": out["test_loss"]}


# ----------------------------------------------------------------------------- adapters


def init_adapters(cfg: RunConfig, spec: lorajax.Spec, model: Any, variables: dict, train: np.ndarray):
    """``(adapters, variables)`` of ``--init``: the base-shifting ones return the residual base."""
    key = jax.random.key(cfg.seed + 1)
    if cfg.init == "default":
        return lorajax.init(spec, variables, key), variables
    if cfg.init == "pissa":
        return lorajax.inits.pissa(spec, variables)
    if cfg.init == "olora":
        return lorajax.inits.olora(spec, variables)
    batches = window_batches(train, cfg.batch_size, cfg.max_length, cfg.seed + 3)

    def loss(v, batch):
        return lm_loss(model.apply(v, batch[:, :-1]), batch)

    grads = lorajax.inits.estimate_gradients(
        spec, loss, variables, (batches(i) for i in range(cfg.init_batches)), num_batches=cfg.init_batches
    )
    if cfg.init == "lora_ga":
        return lorajax.inits.lora_ga(spec, variables, grads, key)
    if cfg.init == "lora_sb":  # η: the first non-zero step of the warm-up (the schedule starts at 0)
        return lorajax.inits.lora_sb(spec, variables, grads, lr=cfg.optim.lr / max(cfg.optim.warmup, 1)), variables
    raise ValueError(f"--init {cfg.init!r} is unknown")


def with_diagnostic(eval_fn: Callable, model: Any, spec: lorajax.Spec, variables: dict, batch: Any) -> Callable:
    """``eval_fn`` plus `lorajax.diagnostics.lora_norm_regime` on ``batch[:, :-1]`` (``diag/layer<i>/<name>``).

    ``batch`` None: ``eval_fn`` itself (``--diagnose`` off).
    """
    if batch is None:
        return eval_fn
    regime = jax.jit(lambda v, a, ids: diagnostics.lora_norm_regime(model, v, ids, spec, a))
    ids = jnp.asarray(batch[:, :-1])
    return lambda st: {**eval_fn(st), **diagnostics.flat_metrics(regime(variables, st.combined, ids))}


def with_step(batch_fn: Callable, offset: int = 0) -> Callable:
    """``step -> {"tokens": batch_fn(step + offset), "step": step + offset}`` (the step seeds sampling variants)."""
    return lambda step: {"tokens": batch_fn(step + offset), "step": jnp.int32(step + offset)}


def train_adapters(
    cfg: RunConfig,
    model: Any,
    variables: dict,
    spec: lorajax.Spec,
    adapters: dict,
    batch_fn: Callable,
    folder: Path,
    *,
    eval_fn: Callable | None,
    mesh: Any,
    desc: str,
) -> tuple[Any, list[dict], optax.GradientTransformation]:
    """Train ``adapters`` ``cfg.steps`` steps (resumable in ``folder``); ``(state, history, tx)``.

    The loss gets the variant's training context (``adapter_rng`` from the
    step, ``adapter_train=True``: DyLoRA samples its rank) and optimiser-side
    terms (SoRA's L1 on the gates).
    """
    trainable, frozen = lorajax.partition(spec, adapters)
    fwd_aux = lorajax.adapt(model.apply, spec, mode="factored", aux=True)  # also gives routing statistics
    step_key = jax.random.key(cfg.seed + 5)
    if cfg.ce_chunk and any(keys[-2:-1] == ("lm_head",) for keys in adapter_paths(adapters)):
        raise ConfigError("--ce-chunk reads the output head's base weight; it cannot train an adapted lm_head")

    def train_loss(v, a, batch):  # aux: routing statistics (FlyLoRA, SMoRA) for refresh_state, else {}
        rng = jax.random.fold_in(step_key, batch["step"])
        tokens = batch["tokens"]
        if cfg.ce_chunk:  # final hidden states, then the head and the loss chunk by chunk
            h, aux = fwd_aux(v, a, tokens[:, :-1], adapter_rng=rng, adapter_train=True, return_hidden=True)
            loss = chunked_lm_loss(model.cfg, v["params"], h, tokens, cfg.ce_chunk)
        else:
            logits, aux = fwd_aux(v, a, tokens[:, :-1], adapter_rng=rng, adapter_train=True)
            loss = lm_loss(logits, tokens)
        return loss + extra_loss(cfg, a), aux

    tx = make_tx(cfg, cfg.optim.lr, spec=spec)
    state, hist = lorajax.train.fit(
        train_loss,
        tx,
        variables,
        lorajax.train.TrainState.create(tx, trainable, frozen),
        batch_fn,
        cfg.steps,
        out_dir=str(folder),
        **cfg.fit_options(),
        eval_fn=eval_fn,
        eval_every=cfg.eval_every,
        desc=desc,
        mesh=mesh,
        state_update=lorajax.train.refresh_state(spec),
    )
    return state, hist, tx


def rank_eval(cfg: RunConfig, model: Any, variables: dict, spec, adapters, evaluate: Evaluator) -> dict:
    """``{"<r>": {"val_loss", "test_loss"}}`` of the adapters truncated to each ``--eval-ranks`` rank."""
    out = {}
    for r in cfg.eval_ranks:
        spec_r, ad_r = lorajax.truncate(spec, adapters, r)
        loss = adapter_eval(model, spec_r)
        out[str(r)] = evaluate(lambda b, loss=loss, a=ad_r: loss(variables, a, b))
    return out


def squeezed(cfg, model, variables, spec, adapters, batch_fn, out: Path, evaluate: Evaluator, mesh) -> dict:
    """`lorajax.squeeze` to ``--squeeze-to``, then ``--squeeze-steps`` more steps (fresh optimiser state)."""
    spec_s, ad_s = lorajax.squeeze(spec, adapters, cfg.squeeze_to)
    if cfg.squeeze_steps:
        cfg_s = dataclasses.replace(cfg, steps=cfg.squeeze_steps)  # its own warm-up + cosine over those steps
        state, _, _ = train_adapters(
            cfg_s,
            model,
            variables,
            spec_s,
            ad_s,
            with_step(batch_fn, offset=cfg.steps),  # the training stream goes on where it stopped
            out / "squeeze",
            eval_fn=None,
            mesh=mesh,
            desc=f"squeezed to r={cfg.squeeze_to}",
        )
        ad_s = state.combined
    loss = adapter_eval(model, spec_s)
    losses = evaluate(lambda b: loss(variables, ad_s, b))
    trainable = lorajax.count_params(spec_s, variables, ad_s)["trainable"]
    return {"rank": cfg.squeeze_to, **losses, "trainable": trainable, "steps": cfg.squeeze_steps}


def sora_pruned(model, variables, spec, adapters, evaluate: Evaluator, base_loss: Callable) -> dict:
    """SoRA pruned to plain LoRA (`lorajax.optim.prune`): ranks kept of all, and the pruned model's losses."""
    total = sum(int(ad["gate"].shape[0]) for ad in adapter_paths(adapters).values())
    try:
        spec_p, pruned = lorajax.optim.prune(spec, variables, adapters)
    except ValueError:  # every gate entry is zero: the update is zero, the pruned model is the base
        return {"ranks_kept": 0, "ranks_total": total, **evaluate(base_loss)}
    kept = sum(int(ad["lora_A"].shape[-1]) for ad in adapter_paths(pruned).values())
    loss = adapter_eval(model, spec_p)
    return {"ranks_kept": kept, "ranks_total": total, **evaluate(lambda b: loss(variables, pruned, b))}


# ----------------------------------------------------------------------------- run


def _sample(cfg: RunConfig, model: Any, params: dict, tok: Any) -> str:
    prompt = jnp.asarray(np.asarray(tok.encode("Viola: "))[None, :])
    key = jax.random.key(cfg.seed)
    return tok.decode(np.asarray(llama.generate(model, params, prompt, 120, temperature=0.8, top_p=0.95, key=key))[0])


def run(cfg: RunConfig) -> dict:
    """Load or pre-train the base, train adapters (or every weight); the results dict (see the module doc)."""
    out = Path(cfg.out_dir)
    corpus = speeches.lm_corpus(cfg.data or None, encoding=cfg.encoding)
    model, params, tok, ids, base_name = load_model(cfg, out, corpus)
    model = model.clone(
        attention=cfg.attention,
        remat=cfg.remat,
        scan_layers=cfg.scan_layers,
        dtype=None if cfg.compute_dtype == "float32" else jnp.dtype(cfg.compute_dtype),
    )
    seq = cfg.max_length
    evaluate = Evaluator(windows(ids["val"], seq), windows(ids["test"], seq), cfg.batch_size)
    variables = {"params": params}
    base_apply = jax.jit(lambda v, batch: lm_loss(model.apply(v, batch[:, :-1]), batch))
    base_windows = jax.jit(lambda v, batch: window_losses(model.apply(v, batch[:, :-1]), batch))
    base_test = per_window(lambda b: base_windows(variables, b), evaluate.test, cfg.batch_size)
    base = evaluate(lambda b: base_apply(variables, b), base_test)  # the test mean from the windows above
    train_fn = window_batches(ids["train"], cfg.batch_size, seq, cfg.seed + 2)
    mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh else None
    if mesh is not None:  # FSDP gathers weights, not tokens
        model = model.clone(token_sharding=sharding.token_sharding(mesh))
    extra: dict[str, Any] = {}
    adapters = initial = None
    if cfg.spec.variant == "full":
        final, hist, counts, opt_bytes, params_after, train_dir = _train_full(
            cfg, model, variables, train_fn, out, evaluate, mesh
        )
        desc, export_spec = "full fine-tuning", None
        after_test = per_window(lambda b: base_windows({"params": params_after}, b), evaluate.test, cfg.batch_size)
    else:
        spec = cfg.spec.to_spec()
        adapters, variables = init_adapters(cfg, spec, model, variables, ids["train"])
        initial = adapters
        if cfg.base_dtype != "float32":  # QLoRA: the (residual) base frozen in its quantised form
            variables, extra["quantized_base"] = quantized_base(cfg, variables, base_apply, evaluate)
        if mesh is not None:  # weights split by lorajax.sharding's Llama rules, adapters follow
            adapters = sharding.shard(adapters, mesh, like=variables)
            variables = sharding.shard(variables, mesh)
        loss = adapter_eval(model, spec)
        train_dir = out / "lora"
        state, hist, tx = train_adapters(
            cfg,
            model,
            variables,
            spec,
            adapters,
            with_step(train_fn),
            train_dir,
            eval_fn=with_diagnostic(
                lambda st: evaluate.metrics(lambda b: loss(variables, st.combined, b)),
                model,
                spec,
                variables,
                evaluate.val[: cfg.batch_size] if cfg.diagnose else None,
            ),
            mesh=mesh,
            desc=f"{spec.variant} on comedies",
        )
        adapters = state.combined
        final = evaluate.final(hist, cfg.steps, lambda b: loss(variables, adapters, b))
        fwd = lorajax.adapt(model.apply, spec, mode="factored")
        adapted_windows = jax.jit(lambda v, a, batch: window_losses(fwd(v, a, batch[:, :-1]), batch))
        after_test = per_window(lambda b: adapted_windows(variables, adapters, b), evaluate.test, cfg.batch_size)
        counts = lorajax.count_params(spec, variables, adapters)
        opt_bytes = lorajax.optim.state_bytes(tx, state.trainable)
        if cfg.eval_ranks:
            extra["rank_eval"] = rank_eval(cfg, model, variables, spec, adapters, evaluate)
        if cfg.squeeze_to:
            extra["squeezed"] = squeezed(cfg, model, variables, spec, adapters, train_fn, out, evaluate, mesh)
        if is_sora(spec.variant):
            extra["sora"] = sora_pruned(model, variables, spec, adapters, evaluate, lambda b: base_apply(variables, b))
        mergeable = lorajax.registry.get(spec.variant).mergeable
        quantized = cfg.base_dtype != "float32"
        params_after = (
            lorajax.merge(spec, variables, adapters, dequantize=quantized)["params"]
            if mergeable and cfg.sample
            else None
        )
        desc, export_spec = f"{spec.variant} on comedies", spec
    step_ms = step_time_ms(hist, train_dir)

    sample = None
    if cfg.sample:
        sample = (
            _sample(cfg, model, params_after, tok)
            if params_after is not None
            else f"(no sample: variant {cfg.spec.variant} is not mergeable)"
        )
    if cfg.export and main_process():
        if export_spec is None:
            lorajax.models.save_pretrained(out / "model", model, params_after)
        else:
            # a quantised base is exported against the float params' names and shapes (a shifted base's adapters
            # are converted onto the original params inside _export_adapters either way)
            export_base = variables if cfg.base_dtype == "float32" else {"params": params}
            _export_adapters(cfg, out, export_spec, adapters, initial, export_base, params, base_name)

    gain = loss_gain(base_test, after_test)
    table = markdown_table(
        ["loss (nats/token)", "base", "after training"],
        [
            ["validation (end of the adaptation plays)", f"{base['val_loss']:.4f}", f"{final['val_loss']:.4f}"],
            [
                f"test (unseen comedies, {gain['test_windows']} windows) ± SE",
                f"{base['test_loss']:.4f} ± {gain['base_loss_se']:.4f}",
                f"{final['test_loss']:.4f} ± {gain['test_loss_se']:.4f}",
            ],
        ],
    )
    gain_line = (
        f"Gain on the unseen comedies: {gain['gain']:.4f} ± {gain['gain_se']:.4f} nats/token "
        f"(paired SE over the {gain['test_windows']} test windows scored by both) = {gain['gain_in_se']:.1f} SE."
    )
    print(
        f"test loss (unseen comedies): base {base['test_loss']:.4f} ± {gain['base_loss_se']:.4f}, "
        f"after {final['test_loss']:.4f} ± {gain['test_loss_se']:.4f}; {gain_line}",
        flush=True,
    )
    table += "\n\n" + gain_line
    table += "\n\n" + markdown_table(
        ["trainable", "total", "optimiser state", "step time"],
        [[f"{counts['trainable']:,}", f"{counts['total']:,}", f"{opt_bytes:,} B", format_ms(step_ms)]],
    )
    curve = loss_curve(train_dir)  # every call's steps (also when this call resumed after training ended)
    if curve:
        loss_plot({desc: curve}, out / "loss.png", title="lm task")
    what = (
        "every weight" if export_spec is None else f"adapters ({cfg.spec.variant} r={cfg.spec.rank}, init {cfg.init})"
    )
    text = (
        f"# LM on Shakespeare speeches\n\nBase: {base_name}; {what} trained {cfg.steps} steps on comedies "
        f"(lr {cfg.optim.lr}, {cfg.optim.name}); evaluated on the held-out end of the comedies (validation) "
        f"and on unseen comedies (test). Batch {cfg.batch_size} x {seq} tokens.\n\n{table}\n"
    )
    if extra:
        text += f"\n```\n{json.dumps(extra, indent=2)}\n```\n"
    if sample is not None:
        text += f"\nSample (T=0.8, top-p 0.95):\n\n```\n{sample}\n```\n"
    results = {
        "model": base_name,
        "init": cfg.init,
        "base_loss": base["test_loss"],
        "base_val_loss": base["val_loss"],
        "val_loss": final["val_loss"],
        "test_loss": final["test_loss"],
        "lora_loss": final["test_loss"],
        **gain,
        "steps": cfg.steps,
        "lr": cfg.optim.lr,
        "opt_state_bytes": opt_bytes,
        "step_ms": step_ms,
        **counts,
        **extra,
        "sample": sample,
    }
    write_results(out, text, {**results, "final_loss": curve[-1][1] if curve else None})
    return {**results, "loss_curve": curve, "table": table, "out_dir": str(out)}


def quantized_base(cfg: RunConfig, variables: dict, base_loss: Callable, evaluate: Evaluator) -> tuple[dict, dict]:
    """``variables`` with every linear kernel but the head in ``--base-dtype`` (`lorajax.quant`), and a record of
    the base's measured bytes before and after and the quantised base's own validation/test loss."""
    qvariables = lorajax.quant.quantize(variables, None, cfg.base_dtype)
    losses = evaluate(lambda b: base_loss(qvariables, b))
    record = {
        "dtype": cfg.base_dtype,
        "bytes": lorajax.quant.base_bytes(qvariables),
        "float32_bytes": lorajax.quant.base_bytes(variables),
        "val_loss": losses["val_loss"],
        "test_loss": losses["test_loss"],
    }
    print(
        f"base in {cfg.base_dtype}: {record['bytes']:,} B (float32 {record['float32_bytes']:,} B); "
        f"its test loss {record['test_loss']:.4f}",
        flush=True,
    )
    return qvariables, record


def _train_full(cfg: RunConfig, model, variables, train_fn, out: Path, evaluate: Evaluator, mesh):
    """Train every weight of the base (``make_tx(full=...)``); ``(losses, history, counts, bytes, params, dir)``."""
    if mesh is not None:
        variables = sharding.shard(variables, mesh)
    params = variables["params"]
    apply = jax.jit(lambda p, batch: lm_loss(model.apply({"params": p}, batch[:, :-1]), batch))

    def full_loss(_, p, batch):
        return lm_loss(model.apply({"params": p}, batch[:, :-1]), batch)

    tx = make_tx(cfg, cfg.optim.lr, adapters=False, full=params)
    train_dir = out / "full"
    state, hist = lorajax.train.fit(
        full_loss,
        tx,
        None,
        lorajax.train.TrainState.create(tx, params),
        train_fn,
        cfg.steps,
        out_dir=str(train_dir),
        **cfg.fit_options(),
        eval_fn=lambda st: evaluate.metrics(lambda b: apply(st.trainable, b)),
        eval_every=cfg.eval_every,
        desc="full fine-tuning on comedies",
        mesh=mesh,
    )
    trained = state.trainable
    final = evaluate.final(hist, cfg.steps, lambda b: apply(trained, b))
    n = sum(int(x.size) for x in jax.tree.leaves(trained))
    counts = {"trainable": n, "frozen_adapter": 0, "base": n, "total": n, "trainable_percent": 100.0}
    return final, hist, counts, lorajax.optim.state_bytes(tx, params), trained, train_dir


def _export_adapters(cfg, out: Path, spec, adapters, initial, variables, original_params, base_name: str) -> None:
    """PEFT export; adapters on a shifted base are written as the rank-2r LoRA on the original base."""
    try:
        if cfg.init in BASE_SHIFTING:
            original = {"params": original_params}
            spec, adapters = lorajax.inits.to_plain_lora(spec, adapters, original, initial_adapters=initial)
            variables = original
        lorajax.peft.save(out / "peft_adapter", spec, adapters, variables, base_model_name_or_path=base_name)
    except ValueError as e:  # a variant PEFT has no format for, or a rank 2r too large for a target
        print(f"no PEFT export: {e}", flush=True)
