"""The README quick start runs as pasted, and its LoRA fit lowers the loss."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys):
    block = re.search(r"## Quick start\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) <= 16
    ns = {}
    exec(compile(block, "README.md", "exec"), ns)
    jnp, lorajax = ns["jnp"], ns["lorajax"]
    zero = {k: v for k, v in ns.items()}
    start = lorajax.init(ns["spec"], ns["params"], ns["jax"].random.key(3))
    assert float(ns["loss"](ns["adapters"])) < float(ns["loss"](start))
    out_merged = ns["model"].apply(ns["merged"], ns["x"])
    assert jnp.allclose(out_merged, ns["fwd"](ns["params"], ns["adapters"], ns["x"]), atol=1e-5)
    assert zero and capsys.readouterr().out.strip()
