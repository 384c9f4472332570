"""LM task: pre-train a small Llama on histories/tragedies/romances, adapt with LoRA to comedies.

Command: ``python -m experiments.run --config experiments/configs/lm_llama.py``
Expected: ~4 min on 2 CPU cores (600 pre-train + 300 LoRA steps); held-out comedy loss drops
after adapting (numbers in experiments/results/lm_llama.md).
"""

from experiments.config import OptimConfig, RunConfig, SpecConfig


def get_config() -> RunConfig:
    return RunConfig(
        task="lm",
        spec=SpecConfig(variant="lora", rank=8, alpha=16.0, targets="all-linear"),
        optim=OptimConfig(name="adamw", lr=3e-3, warmup=20),
        steps=300,
        batch_size=32,
        max_length=128,
        max_test=256,  # held-out windows of max_length + 1 characters
        eval_every=300,
        ckpt_every=100,
        baseline=False,
        out_dir="experiments/runs/lm_llama",
    )
