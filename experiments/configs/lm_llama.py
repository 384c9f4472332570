"""LM task: pre-train a small Llama on histories/tragedies/romances, adapt with LoRA to comedies.

Command: ``python -m experiments.run --config experiments/configs/lm_llama.py``
Expected: ~4 min on 2 CPU cores (600 pre-train + 300 LoRA steps); held-out comedy loss drops
after adapting (single-seed numbers from before the validation split: experiments/results/lm_llama.md;
the demo config lm_demo.py reports the gain with its SE).

``model`` is left at the launcher's default "minilm", which for the lm task means "tiny": the built-in
small Llama pre-trained into ``out_dir/base`` (with its ``char_tokenizer.json``). Other bases:
``--model scratch`` (that config, random init, e.g. with ``--spec.variant full``) or any local HF
Llama-family folder, e.g. ``--model experiments/runs/lm_llama/base`` to reuse this run's base.
The last 10% of the comedies' text is the validation split (``val_loss``; held out from training);
the unseen comedies are the test split (``test_loss`` = ``lora_loss``). Effects flags (lm only):
``--spec.options k=v``, ``--init pissa|olora|lora_ga|lora_sb``, ``--eval-ranks``, ``--squeeze-to``,
``--squeeze-steps``, ``--no-sample``, ``--no-export`` (see experiments/config.py).
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
