"""experiments.bench_serve end to end at tiny sizes: the report and its JSON are written, the ratios in them are
computed from the measured rates, the engine never recompiles after its warm-up, and every request's greedy
tokens equal merge-then-generate's (the same requests, each adapter merged into the base)."""

import json
import statistics

import pytest

from experiments import bench_serve


def test_workload_is_fixed_and_poisson_in_steps():
    a, b = bench_serve.workload(40, 0.5, 64, seed=3), bench_serve.workload(40, 0.5, 64, seed=3)
    assert a == b
    arrivals = [r["arrival"] for r in a]
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0
    assert all(16 <= len(r["prompt"]) <= 32 and 16 <= r["max_tokens"] <= 32 for r in a)
    names = bench_serve.names_for(a, 8)
    assert set(names) <= {f"a{i}" for i in range(8)} and bench_serve.names_for(a, None) == [None] * 40
    plan = bench_serve.batches(a, names, 4)
    assert sorted(j for _, chunk, *_ in plan for j in chunk) == list(range(40))
    for name, chunk, rows, new in plan:
        assert len(chunk) <= rows <= 4 and {names[j] for j in chunk} == {name}
        assert max(a[j]["max_tokens"] for j in chunk) <= new


@pytest.mark.slow  # ~15 s: compiles the engine's buckets and a few generate shapes
def test_bench_serve_writes_report(tmp_path):
    out = tmp_path / "serve.md"
    summary = bench_serve.main(
        ["--adapters", "1,3,20", "--requests", "6", "--repeats", "1", "--layers", "1", "--hidden", "32",
         "--max-batch", "4", "--slots", "3", "--rate", "1.0", "--out", str(out)]
    )  # fmt: skip
    text = out.read_text()
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(summary))
    res = {r["adapters"]: r for r in summary["results"]}
    assert set(res) == {1, 3, 20, None}
    for n, r in res.items():
        assert r["engine_tokens_per_s"] == statistics.median(r["per_round_tokens_per_s"]) > 0
        assert r["ratio_vs_one_adapter"] == pytest.approx(r["engine_tokens_per_s"] / res[1]["engine_tokens_per_s"])
        assert r["engine_vs_merge"] == pytest.approx(r["engine_tokens_per_s"] / r["merge_tokens_per_s"])
        assert r["compiles_after_warmup"] == 0
        assert r["tokens_equal_merged"] == 6
        assert r["latency_p50_s"] <= r["latency_p90_s"] <= r["latency_p99_s"]
        assert f"**{r['ratio_vs_one_adapter']:.2f}x**" in text or n is None
    assert res[20]["loads"] > 2 and res[20]["evictions"] == res[20]["loads"] - 2  # 2 free slots, cold pool
    assert res[None]["loads"] == 0
    assert summary["goal"] is None and "64 not among" in text
    assert 0 < summary["memory"]["kv_peak_used_bytes"] <= summary["memory"]["kv_paged_bytes_formula"]
