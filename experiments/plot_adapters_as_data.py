"""Plots of issue 20's results, read from their JSON files (no re-run): ``perk.png``,
``federated.png`` and ``adapter_library.png`` under ``experiments/results/``.

* perk: QA accuracy per arm, one point per seed, the mean as a bar (chance 1/16 dashed).
* federated: held-out loss per client, per arm, mean over seeds with every seed as a point.
* adapter_library: held-out loss minus the base's per held-out character, per arm, seeds as points.

Each experiment (``perk_toy``, ``federated_shakespeare``, ``adapter_library``) draws its plot after writing its
JSON; this command redraws all three: ``python -m experiments.plot_adapters_as_data [--results experiments/results]``.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np

from lorajax import atomic


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.tight_layout()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic.write_bytes(path, png.getvalue())


def _grouped(ax, groups: list[str], arms: dict[str, np.ndarray], ylabel: str) -> None:
    """``arms``: name -> ``[seeds, groups]``; a bar per (group, arm) at the seed mean, the seeds as points."""
    width = 0.8 / len(arms)
    x = np.arange(len(groups))
    for j, (name, values) in enumerate(arms.items()):
        pos = x + (j - (len(arms) - 1) / 2) * width
        ax.bar(pos, values.mean(0), width, label=name, alpha=0.7)
        for row in values:
            ax.plot(pos, row, "k.", markersize=3)
    ax.set_xticks(x, groups, rotation=15, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def perk(json_path: Path) -> Path:
    """``perk.png`` beside ``json_path`` (the experiment's ``perk.json``)."""
    import matplotlib.pyplot as plt

    runs = json.loads(Path(json_path).read_text())["runs"]
    arms = {
        "base, no context": "base_no_context",
        "meta init, no context": "no_context",
        "TTT (no meta-learning)": "ttt",
        "PERK": "perk",
    }
    values = {name: np.array([[100 * r[key]] for r in runs]) for name, key in arms.items()}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    _grouped(ax, ["toy key→value QA"], values, "accuracy (%)")
    ax.axhline(100 / 16, color="gray", linestyle="--", linewidth=1)
    ax.set_title(f"PERK, {len(runs)} seeds (synthetic task; dashed: chance)")
    path = Path(json_path).with_suffix(".png")
    _save(fig, path)
    return path


def federated(json_path: Path) -> Path:
    """``federated.png`` beside ``json_path`` (the experiment's ``federated.json``)."""
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    seeds = data["seeds"]
    arms = {
        "FedAvg (global)": "fedavg",
        "pFedLoRA (personalised)": "pfedlora",
        "Fed-SB": "fed_sb",
        "Fed-SB + DP": "fed_sb_dp",
    }
    values = {name: np.array([s[key] for s in seeds]) for name, key in arms.items()}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    _grouped(ax, [c.replace("_", " ") for c in data["clients"]], values, "held-out loss (nats/char)")
    ax.plot(np.arange(len(data["clients"])), data["base"], "rx", label="base (no adapter)")
    ax.legend(fontsize=7)
    lo = min(float(v.min()) for v in values.values())
    ax.set_ylim(lo - 0.05, max(data["base"]) + 0.05)
    ax.set_title(f"Federated LoRA, one comedy per client, {len(seeds)} seeds")
    path = Path(json_path).with_suffix(".png")
    _save(fig, path)
    return path


def adapter_library(json_path: Path) -> Path:
    """``adapter_library.png`` beside ``json_path`` (the experiment's ``adapter_library.json``)."""
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    seeds, base = data["seeds"], np.array(data["base"])
    arms = {"SG-LoRA (generated)": "sg_lora", "AutoLoRA (retrieved + fused)": "autolora", "trained": "trained"}
    values = {name: np.array([s[key] for s in seeds]) - base for name, key in arms.items()}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    _grouped(ax, data["held_out"], values, "held-out loss − base (nats/char)")
    ax.axhline(0, color="gray", linewidth=1)
    ax.set_title(f"Adapters for held-out characters, {len(seeds)} seeds")
    path = Path(json_path).with_suffix(".png")
    _save(fig, path)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default="experiments/results", help="folder of the JSON results (and the plots)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    for make in (perk, federated, adapter_library):
        print(make(Path(args.results) / f"{make.__name__}.json"))


if __name__ == "__main__":
    main()
