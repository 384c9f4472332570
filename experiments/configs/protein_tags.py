"""Tag-conditioned generation of SYNTHETIC protein sequences: a frozen small LM taught property tags by LoRA.

Command: ``python -m experiments.run --config experiments/configs/protein_tags.py --seed 0
--out-dir experiments/runs/protein_tags/seed0`` (one seed); ``python -m experiments.protein_tags`` runs
seeds 0, 1, 2 and writes experiments/results/protein_tags.{md,json,png}.

The spec's offline design for Shah & Jayaratnam (arXiv:2411.05966), see experiments/tasks/protein.py:
stage 1 pre-trains a 2-layer, d=64 Llama 300 steps on untagged sequences of 4 property classes; stage 2
freezes it and trains LoRA (r=8, alpha=16, all-linear: q,k,v,o,gate,up,down; Adam lr 3e-3, 300 steps)
on ``[Gen] P<c> Seq=<...>`` records, beside full fine-tuning (lr 1e-3). Expected (the spec): oracle
tag accuracy of 64 sampled sequences per tag ~ 1/4 for the base (it never saw a tag), >= 0.9 after LoRA.
Numbers and time: experiments/results/protein_tags.md.
"""

from experiments.config import OptimConfig, RunConfig, SpecConfig


def get_config() -> RunConfig:
    return RunConfig(
        task="protein",
        model="tiny",
        spec=SpecConfig(variant="lora", rank=8, alpha=16.0, targets="all-linear"),
        optim=OptimConfig(name="adam", lr=3e-3, warmup=20),
        steps=300,
        batch_size=32,
        max_length=64,
        max_test=None,  # 64 generated sequences per tag
        eval_every=300,
        ckpt_every=100,
        baseline=True,  # also full fine-tuning of stage 2
        out_dir="experiments/runs/protein_tags/seed0",
    )
