"""Task "segment": TopoLoRA-SAM's recipe on a small SAM-style model, SYNTHETIC thin curves (`lorajax.data.curves`).

Model: `lorajax.models.segmenter` (a ViT encoder + neck + ConvAdapter + light
mask decoder; a stand-in for SAM ViT-B, which is not available offline). The
arm is chosen by ``--spec.variant``:

* ``lora`` -> ``topolora``: LoRA (``--spec.rank`` 8, ``--spec.alpha`` 16,
  ``--spec.targets``; the config sets the encoder's MLP layers,
  `lorajax.models.segmenter.MLP_TARGETS`) + the ConvAdapter + the decoder trained,
  the encoder and neck frozen;
* ``none`` -> ``decoder``: the decoder only (no adapter, no LoRA);
* ``full`` -> ``full``: every weight (encoder, neck, decoder).

Other variants are refused (`check_config`). Every arm trains with one AdamW
group (``--optim.lr``, ``--optim.weight-decay``, linear warm-up + cosine over
``--steps``) and global-norm clipping at 1.0, as Seglab; loss BCE + soft Dice +
0.5·clDice (`lorajax.models.segmenter.seg_loss`).

The base (``--model``):

* ``tiny``: a small ViT (`tiny_vit_config`) with neck and decoder, randomly
  initialised and pre-trained in full (``2 * --steps`` steps) on a related
  SYNTHETIC task, thick-blob segmentation (`lorajax.data.curves.make_blobs`,
  same backgrounds and noise as the curves), so that adapting to thin curves
  is a transfer and not training from scratch. Saved in ``out_dir/base`` as a
  HF ViT folder (``config.json`` + ``model.safetensors``, loadable by
  transformers' ``ViTModel``) with `HEAD_FILE` (neck + decoder) beside it;
  a re-run loads it, an incomplete one is pre-trained again (resuming from
  ``out_dir/pretrain``). ``--model <out_dir>/base`` shares one base across runs.
* a local HF ViT folder (``model_type`` ``vit``): its encoder; the neck and
  decoder come from `HEAD_FILE` if the folder has one, else are initialised
  from ``--seed``. Images are rendered at the folder's ``image_size`` and
  ``num_channels``.

Data (SYNTHETIC, `lorajax.data.curves.make_curves`): ``--max-train`` (default
`N_TRAIN`) training images (data seed `TRAIN_SEED`) and ``--max-test`` (default
`N_TEST`) held-out test images (data seed `TEST_SEED`); both sets are the same
for every ``--seed``, which sets the initialisation (adapters, ConvAdapter) and
the batch order. Metrics on the test set, masks thresholded at 0.5
(`lorajax.cldice`): Dice, clDice (Zhang-Suen skeletons) and the Betti-0 error
``|#components(pred) − #components(truth)|`` (8-connectivity), each a mean over
test images with its standard error; also for the pre-trained base before
adaptation.

Artefacts in ``out_dir``: ``run_config.json``, ``base/`` and ``pretrain/``
(``--model tiny``), ``train/`` (checkpoints, metrics.jsonl), ``trained.safetensors``
(every trained leaf, names joined by ``/``), ``results.md``, ``results.json``,
``loss.png``. A re-run of a finished run trains nothing: it restores the final
checkpoint and recomputes the evaluation.
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
import safetensors.numpy

import lorajax
from experiments import run_identity
from experiments.config import RunConfig
from experiments.optimizers import schedule
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
from lorajax import atomic, cldice
from lorajax.data import curves
from lorajax.models import segmenter, vit

#: ``--spec.variant`` -> arm
ARM_OF = {"lora": "topolora", "none": "decoder", "full": "full"}
#: training / test images when ``--max-train`` / ``--max-test`` are not given
N_TRAIN, N_TEST = 512, 128
#: data seeds of the training set, the test set and the pre-training blobs (fixed: every --seed sees the same data)
TRAIN_SEED, TEST_SEED, PRETRAIN_SEED = 1, 2, 3
#: pre-training images (blobs)
N_PRETRAIN = 512
#: neck + decoder of a pre-trained base, beside its HF ViT files
HEAD_FILE = "seg_head.safetensors"
#: channels of the image embedding (SAM: 256)
EMBED_CHANNELS = 32
#: Seglab's gradient clipping (global norm)
CLIP = 1.0
#: the optimisers this task builds
OPTIMS = ("adamw", "adam")


def tiny_vit_config(image_size: int = 64) -> vit.Config:
    """The built-in base's encoder: 4 layers, width 64, 4 heads, MLP 256 (= 4d), 8-px patches, no pooler."""
    return vit.Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        add_pooling_layer=False,
    )


# ----------------------------------------------------------------------------- config


def check_config(cfg: RunConfig) -> None:
    """The segment task's own fields (nothing is loaded); raises `ConfigError` naming the flag."""
    if cfg.spec.variant not in ARM_OF:
        raise ConfigError(
            f"--spec.variant must be lora (TopoLoRA: LoRA + ConvAdapter + decoder) | none (decoder only) | "
            f"full (every weight) for --task segment, got {cfg.spec.variant!r}"
        )
    if cfg.optim.name not in OPTIMS:
        raise ConfigError(
            f"--optim.name must be one of {' | '.join(OPTIMS)} for --task segment, got {cfg.optim.name!r}"
        )
    if cfg.data:
        raise ConfigError("--data is not read by --task segment (its images are generated: lorajax.data.curves)")
    if cfg.mesh or cfg.distributed:
        raise ConfigError("--mesh / --distributed are not supported by --task segment (one device)")
    if cfg.model != "tiny":
        _check_model_folder(cfg.model)


def _check_model_folder(name: str) -> None:
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--model must be tiny or a HF ViT folder with config.json (segment task), got {name!r}")
    try:
        config = json.loads((folder / "config.json").read_text())
        model_type = config.get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"--model {name!r}: unreadable config.json ({e})") from None
    if model_type != "vit":
        raise ConfigError(
            f"--model {name!r}: the segment task takes a ViT (model_type vit), config.json says {model_type!r}"
        )


# ----------------------------------------------------------------------------- data


def check_images(images: np.ndarray, masks: np.ndarray, vit_cfg: vit.Config) -> None:
    """``images [n, S, S, C]`` and ``masks [n, S, S]`` with ``S``, ``C`` the encoder's, else a ValueError."""
    S, C = vit_cfg.image_size, vit_cfg.num_channels
    if images.ndim != 4 or images.shape[1:] != (S, S, C):
        raise ValueError(
            f"images must be [n, {S}, {S}, {C}] (the encoder's image_size and num_channels), got {images.shape}"
        )
    if masks.shape != images.shape[:3]:
        raise ValueError(f"masks must be [n, {S}, {S}] matching the images, got {masks.shape}")


def datasets(cfg: RunConfig, vit_cfg: vit.Config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """SYNTHETIC curves: ``{"train": (images, masks), "test": (images, masks)}`` at the encoder's size."""
    S, C = vit_cfg.image_size, vit_cfg.num_channels
    out = {
        "train": curves.make_curves(cfg.max_train or N_TRAIN, S, TRAIN_SEED, channels=C),
        "test": curves.make_curves(cfg.max_test or N_TEST, S, TEST_SEED, channels=C),
    }
    for images, masks in out.values():
        check_images(images, masks, vit_cfg)
    return out


def batches(images: np.ndarray, masks: np.ndarray, batch: int, seed: int) -> Callable[[int], dict]:
    """``batch_fn(step) -> {"pixels" [b, S, S, C], "masks" [b, S, S]}`` drawn from ``(seed, step)``."""

    def fn(step: int) -> dict:
        idx = np.random.default_rng([seed, step]).integers(0, len(images), batch)
        return {"pixels": jnp.asarray(images[idx]), "masks": jnp.asarray(masks[idx])}

    return fn


# ----------------------------------------------------------------------------- the base


def _flat(tree: dict) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in flat}


def _unflat(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for name, arr in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(arr)
    return out


def save_base(folder: Path, vit_model: Any, params: dict) -> None:
    """The encoder as a HF ViT folder and the neck + decoder as `HEAD_FILE` (each written atomically)."""
    lorajax.models.save_pretrained(folder, vit_model, params["image_encoder"])
    head = {k: params[k] for k in ("neck", "decoder")}
    atomic.write_bytes(folder / HEAD_FILE, safetensors.numpy.save(_flat(head)))


def read_base(folder: Path, seed: int) -> tuple[vit.Config, dict]:
    """``(vit_cfg, params without adapter)`` of a base folder: its ViT, and its `HEAD_FILE` if there (else the
    neck and decoder initialised from ``seed``). Raises what the loader raises."""
    enc_model, enc = lorajax.models.from_pretrained(folder)
    vit_cfg = enc_model.cfg
    model = segmenter.build(vit_cfg, "decoder", embed_channels=EMBED_CHANNELS)
    params = init_params(model, vit_cfg, seed)
    params["image_encoder"] = enc
    if (folder / HEAD_FILE).is_file():
        head = _unflat(safetensors.numpy.load((folder / HEAD_FILE).read_bytes()))
        for k in ("neck", "decoder"):
            if jax.tree.map(jnp.shape, head.get(k, {})) != jax.tree.map(jnp.shape, params[k]):
                raise ValueError(f"{folder / HEAD_FILE}: {k} does not match embed_channels={EMBED_CHANNELS}")
            params[k] = head[k]
    return vit_cfg, params


def load_base(folder: Path, seed: int) -> tuple[vit.Config, dict] | None:
    """`read_base` of the tiny base's folder, or None if it is missing or incomplete (said in one line)."""
    if not folder.exists():
        return None
    try:
        return read_base(folder, seed)
    except Exception as e:  # any damage: the pre-training checkpoints can rebuild it
        print(f"{folder} is incomplete ({type(e).__name__}: {e}); pre-training the base again", flush=True)
        return None


def init_params(model: segmenter.Segmenter, vit_cfg: vit.Config, seed: int) -> dict:
    """``model``'s random variables (one compiled init): ``{"params": ..., "batch_stats": ...}`` -> params only."""
    return dict(init_variables(model, vit_cfg, seed)["params"])


def init_variables(model: segmenter.Segmenter, vit_cfg: vit.Config, seed: int) -> dict:
    x = jnp.zeros((1, vit_cfg.image_size, vit_cfg.image_size, vit_cfg.num_channels), jnp.float32)
    return jax.tree.map(jnp.asarray, dict(jax.jit(model.init)(jax.random.key(seed), x)))


def pretrain_base(cfg: RunConfig, out: Path, vit_cfg: vit.Config) -> dict:
    """Pre-train encoder + neck + decoder ``2 * cfg.steps`` steps on SYNTHETIC blobs (resumable); the params."""
    model = segmenter.build(vit_cfg, "decoder", embed_channels=EMBED_CHANNELS)
    params = init_params(model, vit_cfg, cfg.seed)
    images, masks = curves.make_blobs(N_PRETRAIN, vit_cfg.image_size, PRETRAIN_SEED, channels=vit_cfg.num_channels)
    check_images(images, masks, vit_cfg)
    steps = 2 * cfg.steps
    loss = segmenter.loss_and_stats(model)

    def full_loss(_, p, batch):
        return loss({"params": p}, None, batch["pixels"], batch["masks"])[0]

    sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(50, steps // 4), max(steps, 2))
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(sched, weight_decay=1e-4))
    state, _ = lorajax.train.fit(
        full_loss,
        tx,
        None,
        lorajax.train.TrainState.create(tx, params),
        batches(images, masks, cfg.batch_size, cfg.seed + 7),
        steps,
        out_dir=str(out / "pretrain"),
        **cfg.fit_options(),
        desc="pre-train base on blobs (full)",
    )
    return state.trainable


def prepare_base(cfg: RunConfig, out: Path) -> tuple[vit.Config, dict, str]:
    """``(vit_cfg, params without adapter, base name)`` of ``--model`` (pre-trains ``tiny`` if needed)."""
    if cfg.model != "tiny":
        folder = Path(cfg.model)
        vit_cfg, params = read_base(folder, cfg.seed)
        run_identity.record(cfg)
        head = "its neck + decoder" if (folder / HEAD_FILE).is_file() else "a random neck + decoder"
        return vit_cfg, params, f"{folder} ({head})"
    base_dir = out / "base"
    run_identity.record(cfg)
    loaded = load_base(base_dir, cfg.seed)
    if loaded is not None:
        return loaded[0], loaded[1], str(base_dir)
    vit_cfg = tiny_vit_config()
    params = pretrain_base(cfg, out, vit_cfg)
    if main_process():
        save_base(base_dir, vit.build(vit_cfg), params)
    return vit_cfg, params, f"{base_dir} (tiny ViT pre-trained on synthetic blobs)"


# ----------------------------------------------------------------------------- training


def _nones(tree: Any) -> Any:
    return jax.tree.map(lambda _: None, tree)


def arm_state(arm: str, spec: lorajax.Spec | None, variables: dict, key: jax.Array) -> tuple[dict, dict, dict]:
    """``(base, trainable, frozen)`` of ``arm``: ``base`` = ``{"params": frozen groups}`` (the step's argument,
    never differentiated); ``trainable`` / ``frozen`` = `lorajax.partition`-style halves of
    ``{"lora": adapters, "train": trained groups, "batch_stats": BatchNorm running statistics}``."""
    trained, frozen_params = segmenter.groups(arm, dict(variables["params"]))
    stats = dict(variables.get("batch_stats", {}))
    lora_tr: Any = {}
    lora_fr: Any = {}
    if spec is not None:
        adapters = lorajax.init(spec, {"params": variables["params"]}, key)
        lora_tr, lora_fr = lorajax.partition(spec, adapters)
    trainable = {"lora": lora_tr, "train": trained, "batch_stats": _nones(stats)}
    frozen = {"lora": lora_fr, "train": _nones(trained), "batch_stats": stats}
    return {"params": frozen_params}, trainable, frozen


def _variables(base: dict, combined: dict) -> dict:
    out = {"params": {**base["params"], **combined["train"]}}
    if combined["batch_stats"]:
        out["batch_stats"] = combined["batch_stats"]
    return out


def forward(model: segmenter.Segmenter, spec: lorajax.Spec | None) -> Callable:
    """``fn(base, combined, pixels, **kw)``: the segmenter with the arm's trees (factored LoRA if ``spec``)."""
    fwd = lorajax.adapt(model.apply, spec, mode="factored") if spec is not None else None

    def fn(base, combined, pixels, **kw):
        v = _variables(base, combined)
        return model.apply(v, pixels, **kw) if fwd is None else fwd(v, combined["lora"], pixels, **kw)

    return fn


def train_loss(model: segmenter.Segmenter, spec: lorajax.Spec | None) -> Callable:
    """``loss(base, combined, batch) -> (loss, new running statistics)`` (training mode)."""
    fwd = forward(model, spec)

    def loss(base, combined, batch):
        kw: dict[str, Any] = {"train": True}
        if model.use_adapter:
            kw["mutable"] = ["batch_stats"]
        out = fwd(base, combined, batch["pixels"], **kw)
        logits, new = out if model.use_adapter else (out, {})
        return segmenter.seg_loss(logits, batch["masks"]), dict(new).get("batch_stats", {})

    return loss


def refresh_stats(_, combined: dict, stats: dict) -> dict:
    """`lorajax.train.fit`'s ``state_update``: the new running statistics (frozen leaves) after a step."""
    return {**combined, "batch_stats": stats}


def make_tx(cfg: RunConfig) -> optax.GradientTransformation:
    """One group for every trained leaf (Seglab): clip at `CLIP`, then AdamW / Adam on the warm-up + cosine."""
    sched = schedule(cfg, cfg.optim.lr)
    opt = optax.adamw(sched, weight_decay=cfg.optim.weight_decay) if cfg.optim.name == "adamw" else optax.adam(sched)
    return optax.chain(optax.clip_by_global_norm(CLIP), opt)


# ----------------------------------------------------------------------------- evaluation


def predict(logits_fn: Callable, images: np.ndarray, batch: int) -> np.ndarray:
    """``[n, S, S]`` probabilities of ``logits_fn(pixels)`` over ``images`` in batches."""
    out = [
        np.asarray(jax.nn.sigmoid(logits_fn(jnp.asarray(images[i : i + batch])))) for i in range(0, len(images), batch)
    ]
    return np.concatenate(out)


def metrics(prob: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per test image: Dice, clDice and the Betti-0 error of ``prob > 0.5`` against ``masks``."""
    return {
        "dice": np.asarray(cldice.dice_score(prob, masks, reduction="none")),
        "cldice": np.asarray(cldice.cldice_score(prob, masks, reduction="none")),
        "betti0_error": np.asarray(cldice.betti0_error(prob, masks, reduction="none")),
    }


def summary(per_image: dict[str, np.ndarray]) -> dict[str, float]:
    """``{name: mean, name_se: standard error over test images}``."""
    out = {}
    for k, v in per_image.items():
        out[k] = float(np.mean(v))
        out[f"{k}_se"] = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return out


# ----------------------------------------------------------------------------- run


def run(cfg: RunConfig) -> dict:
    """Load or pre-train the base, train the arm's groups on SYNTHETIC curves, evaluate; the results dict."""
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    arm = ARM_OF[cfg.spec.variant]
    vit_cfg, base_params, base_name = prepare_base(cfg, out)
    data = datasets(cfg, vit_cfg)
    dtype = None if cfg.compute_dtype == "float32" else jnp.dtype(cfg.compute_dtype)
    remat = False if cfg.remat == "none" else cfg.remat
    kw = dict(embed_channels=EMBED_CHANNELS, remat=remat, attention=cfg.attention, dtype=dtype)
    model = segmenter.build(vit_cfg, arm, **kw)
    variables = init_variables(model, vit_cfg, cfg.seed)  # the ConvAdapter's init (topolora) from --seed
    variables["params"] = {**variables["params"], **base_params}
    spec = cfg.spec.to_spec() if arm == "topolora" else None
    base, trainable, frozen = arm_state(arm, spec, variables, jax.random.key(cfg.seed + 1))
    n_trainable = sum(int(x.size) for x in jax.tree.leaves(trainable))
    n_total = (
        n_trainable
        + sum(int(x.size) for x in jax.tree.leaves(frozen["lora"]))
        + segmenter.param_count(base)
        + segmenter.param_count(frozen["batch_stats"])
    )

    # the pre-trained base before adaptation (no adapter, no LoRA)
    test_images, test_masks = data["test"]
    plain = segmenter.build(vit_cfg, "decoder", **kw)
    plain_fn = jax.jit(lambda p, x: plain.apply({"params": p}, x))
    base_params_plain = {k: base_params[k] for k in ("image_encoder", "neck", "decoder")}
    before = metrics(predict(lambda x: plain_fn(base_params_plain, x), test_images, cfg.batch_size), test_masks)

    tx = make_tx(cfg)
    train_dir = out / "train"
    state, hist = lorajax.train.fit(
        train_loss(model, spec),
        tx,
        base,
        lorajax.train.TrainState.create(tx, trainable, frozen),
        batches(*data["train"], cfg.batch_size, cfg.seed + 2),
        cfg.steps,
        out_dir=str(train_dir),
        **cfg.fit_options(),
        desc=f"{arm} on synthetic curves",
        state_update=refresh_stats if model.use_adapter else None,
    )
    combined = state.combined
    fwd = forward(model, spec)
    eval_fn = jax.jit(lambda b, c, x: fwd(b, c, x, train=False))
    after = metrics(predict(lambda x: eval_fn(base, combined, x), test_images, cfg.batch_size), test_masks)
    step_ms = step_time_ms(hist, train_dir)
    if main_process():
        atomic.write_bytes(out / "trained.safetensors", safetensors.numpy.save(_flat(state.trainable)))

    s_before, s_after = summary(before), summary(after)
    wall = time.perf_counter() - t0

    def cells(s: dict) -> list[str]:
        return [f"{s[m]:.4f} ± {s[m + '_se']:.4f}" for m in ("dice", "cldice")] + [
            f"{s['betti0_error']:.3f} ± {s['betti0_error_se']:.3f}"
        ]

    table = markdown_table(
        ["model", "Dice", "clDice", "Betti-0 error"],
        [["pre-trained base (no adaptation)", *cells(s_before)], [f"after {arm}", *cells(s_after)]],
    )
    table += "\n\n" + markdown_table(
        ["trainable", "total", "step time", "wall (this call)"],
        [[f"{n_trainable:,}", f"{n_total:,}", format_ms(step_ms), f"{wall:.0f} s"]],
    )
    curve = loss_curve(train_dir)
    if curve:
        loss_plot({arm: curve}, out / "loss.png", title="segment task (synthetic curves)")
    what = {
        "topolora": f"LoRA ({cfg.spec.variant} r={cfg.spec.rank}, alpha={cfg.spec.alpha}) + ConvAdapter + decoder",
        "decoder": "the decoder only",
        "full": "every weight (encoder, neck, decoder)",
    }[arm]
    text = (
        f"# Segmentation of SYNTHETIC thin curves (lorajax.data.curves)\n\nBase: {base_name}; {what} trained "
        f"{cfg.steps} steps (lr {cfg.optim.lr}, {cfg.optim.name}, batch {cfg.batch_size}) on "
        f"{len(data['train'][0])} synthetic images; test: {len(test_images)} held-out synthetic images "
        f"({vit_cfg.image_size}x{vit_cfg.image_size}), masks thresholded at 0.5; mean ± SE over test images.\n\n"
        f"{table}\n"
    )
    results = {
        "arm": arm,
        "model": base_name,
        "seed": cfg.seed,
        "steps": cfg.steps,
        "lr": cfg.optim.lr,
        **{f"base_{k}": v for k, v in s_before.items()},
        **s_after,
        "trainable": n_trainable,
        "total": n_total,
        "step_ms": step_ms,
        "wall_s": wall,
        "test_images": len(test_images),
    }
    write_results(out, text, {**results, "final_loss": curve[-1][1] if curve else None})
    return {**results, "loss_curve": curve, "table": table, "out_dir": str(out)}
