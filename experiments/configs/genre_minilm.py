"""Genre classification of Shakespeare speeches with LoRA on all-MiniLM-L6-v2 (the `make demo` job).

Command: ``python -m experiments.run --config experiments/configs/genre_minilm.py``
Expected: ~5 min on 2 CPU cores; LoRA + head beats the frozen encoder + head on unseen plays
(numbers in experiments/results/genre_minilm.md).
"""

from experiments.config import OptimConfig, RunConfig, SpecConfig


def get_config() -> RunConfig:
    return RunConfig(
        task="genre",
        model="minilm",
        spec=SpecConfig(
            variant="lora", rank=8, alpha=16.0, targets=("query", "key", "value", "dense"), exclude=("pooler.dense",)
        ),
        optim=OptimConfig(name="adamw", lr=1e-3, head_lr=3e-3, warmup=20),
        steps=250,
        batch_size=16,
        max_length=64,
        max_train=4000,  # = steps x batch: one epoch, the same examples for both runs
        max_test=1200,  # a fixed random subset of the unseen plays' speeches
        eval_every=250,
        out_dir="experiments/runs/genre_minilm",
    )
