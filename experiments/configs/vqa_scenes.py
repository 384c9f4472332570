"""VQA task on SYNTHETIC shape scenes: CDDM's recipe (LoRA on vision encoder + projector + LM at once).

Command: ``python -m experiments.run --config experiments/configs/vqa_scenes.py`` (the ``cddm`` arm).
Arms and seeds, lr chosen on the validation split: ``python -m experiments.vqa_scenes``
(experiments/results/vqa_scenes.md).

1. stage 1: the whole small VLM (ViT -> MLP projector -> Llama, width 64, 2+2 layers) trained from
   scratch on colour / shape questions (``PRETRAIN_MULT x steps`` steps), saved in ``out_dir/base``;
2. stage 2: LoRA r=64, alpha=16 (CDDM's values) on every linear layer of the vision encoder, the
   projector and the LM's decoder layers at once, one lr for all groups (as CDDM), on the held-out
   count / exist questions;
3. exact-match answer accuracy on the test split, with the frozen stage-1 model beside it.

``--spec.targets lm`` is the ``lm_only`` arm; ``--spec.targets vision:0.1 projector lm`` gives the
vision group a tenth of the lr; ``--model <out_dir>/base`` reuses a stage-1 base.
"""

from experiments.config import OptimConfig, RunConfig, SpecConfig


def get_config() -> RunConfig:
    return RunConfig(
        task="vqa",
        model="tiny",
        spec=SpecConfig(variant="lora", rank=64, alpha=16.0, targets=("vision", "projector", "lm")),
        optim=OptimConfig(name="adamw", lr=1e-3, warmup=20, weight_decay=0.1),
        steps=300,
        batch_size=32,
        eval_every=100,
        ckpt_every=100,
        baseline=False,
        out_dir="experiments/runs/vqa_scenes",
    )
