"""TopoLoRA-SAM's recipe on SYNTHETIC thin curves: a small SAM-style segmenter (`lorajax.models.segmenter`).

Command: ``python -m experiments.run --config experiments/configs/segment_curves.py``
(``--spec.variant none`` for the decoder-only arm, ``full`` for full fine-tuning).

1. pre-train a tiny ViT (4 layers, width 64, 8-px patches on 64x64 images) + neck + decoder in full
   on synthetic blob segmentation (``2 * steps`` steps), saved in ``out_dir/base`` (HF ViT folder +
   ``seg_head.safetensors``); no SAM checkpoint is available offline, so this stands in for SAM's
   pre-training;
2. adapt it to synthetic branching thin curves (`lorajax.data.curves.make_curves`): LoRA r=8,
   alpha=16 on the encoder's MLP layers (intermediate/output dense, not attention) + the ConvAdapter
   + the decoder, one AdamW group (lr 1e-3, wd 1e-4, warm-up + cosine, clip 1.0), loss BCE + Dice +
   0.5 clDice (Seglab's 10 skeleton iterations);
3. score Dice, clDice and the Betti-0 error on 128 held-out synthetic images, before and after.

Every arm x seed: ``python -m experiments.segment_curves`` (experiments/results/segment_curves.md).
"""

from experiments.config import OptimConfig, RunConfig, SpecConfig
from lorajax.models.segmenter import MLP_TARGETS


def get_config() -> RunConfig:
    return RunConfig(
        task="segment",
        model="tiny",  # pre-trained on synthetic blobs into out_dir/base; or a HF ViT folder
        spec=SpecConfig(variant="lora", rank=8, alpha=16.0, targets=MLP_TARGETS),  # TopoLoRA-SAM's LoRA
        optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4, warmup=20),  # one group, as Seglab
        steps=200,  # fine-tuning steps (the tiny base is pre-trained 2 x steps)
        batch_size=8,  # images per step
        max_train=512,  # synthetic training images
        max_test=128,  # held-out synthetic test images
        eval_every=1000,  # no evaluation during training: the test set is scored once at the end
        ckpt_every=50,
        baseline=False,
        out_dir="experiments/runs/segment_curves",
    )
