"""The `make demo` job: LoRA adapts a small pre-trained Llama to Shakespeare's comedies, beyond noise.

Command: ``python -m experiments.run --config experiments/configs/lm_demo.py``

1. pre-train a character-level Llama-style decoder (2 layers, width 128) from scratch on the
   histories, tragedies and romances (600 steps x 32 windows of 128 characters), saved as a HF
   folder in ``out_dir/base``;
2. freeze it and train LoRA (r=8, alpha=16, every linear layer; 300 AdamW steps) on the comedies;
3. score the base and the adapted model on **every** window of the two unseen comedies (Twelfth
   Night, Much Ado About Nothing): each loss with its standard error over windows, and the gain with
   its paired standard error (both models score the same windows).

Why this task and not the genre classifier (``genre_minilm.py``): on the genre of unseen plays
LoRA on MiniLM does not beat a frozen encoder + head (experiments/results/genre_minilm.md), so a
demo on it could only show noise. Numbers and time: experiments/results/lm_demo.md.
"""

from experiments.config import OptimConfig, RunConfig, SpecConfig


def get_config() -> RunConfig:
    return RunConfig(
        task="lm",
        model="tiny",
        spec=SpecConfig(variant="lora", rank=8, alpha=16.0, targets="all-linear"),
        optim=OptimConfig(name="adamw", lr=3e-3, warmup=20),
        steps=300,
        batch_size=32,
        max_length=128,
        max_test=None,  # every window of the unseen comedies
        max_val=256,
        eval_every=300,
        ckpt_every=100,
        baseline=False,
        out_dir="experiments/runs/lm_demo",
    )
