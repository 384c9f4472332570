"""lorajax.serve: every request's tokens equal single-adapter generation, whatever shares its batch.

One tiny HF-made Llama (2 layers, width 32, vocab 64, GQA), three lorajax adapters (LoRA r=2 on q/v, rsLoRA r=4
on every linear layer, DoRA r=3 on o/down) and one PEFT folder (LoRA r=2 on q/k/up), all with random non-zero B
so that they generate different text. One engine (module fixture) with 3 rows, 3 adapter slots (base + 2: four
adapters force evictions) and 8 KV blocks of 4 (32 tokens for 3 rows: forces preemption) serves every test, so
the step function compiles once per prefill bucket (8, 16) and once for decoding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.models import from_pretrained, llama
from lorajax.serve import AdapterStore, Engine

V, MAX_LEN, N_REF = 64, 32, 8
PROMPTS = {  # lengths 3..9: prefill buckets 8 and 16
    "p0": [5, 17, 3],
    "p1": [9, 1, 44, 2, 60, 7, 31],
    "p2": [12, 40, 8, 8, 23],
    "p3": [33, 2, 57, 19, 4, 61, 28, 10, 1],
    "p4": [50, 6, 6, 27],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
    )  # fmt: skip
    base_dir = tmp_path_factory.mktemp("serve_llama")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(base_dir, safe_serialization=True)
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "up_proj"], init_lora_weights=False)
    ).eval()
    peft_dir = tmp_path_factory.mktemp("serve_peft")
    peft_model.save_pretrained(peft_dir)
    with torch.no_grad():
        hf_tokens = peft_model.generate(
            torch.tensor([PROMPTS["p3"]]), max_new_tokens=N_REF, do_sample=False, pad_token_id=0
        )[0, len(PROMPTS["p3"]) :].tolist()

    model, params = from_pretrained(base_dir)
    specs = {
        "a": lorajax.Spec("lora", rank=2, targets=["q_proj", "v_proj"], init_weights=False),
        "b": lorajax.Spec("lora", rank=4, alpha=8, targets="all-linear", init_weights=False, use_rslora=True),
        "c": lorajax.Spec("dora", rank=3, targets=["o_proj", "down_proj"], init_weights=False),
    }
    store = AdapterStore(params)
    merged = {None: params}
    for i, (name, spec) in enumerate(specs.items()):
        adapters = jax.tree.map(lambda x: 2 * x, lorajax.init(spec, params, jax.random.key(i)))
        store.add(name, (spec, adapters))
        merged[name] = lorajax.merge(spec, params, adapters)
    store.add("peft", str(peft_dir))
    spec_p, ad_p = lorajax.peft.load(peft_dir, params)
    merged["peft"] = lorajax.merge(spec_p, params, ad_p)

    # references: llama.generate on the merged params, every prompt left-padded into one batch (one compile)
    width = max(map(len, PROMPTS.values()))
    ids = np.zeros((len(PROMPTS), width), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(PROMPTS.values()):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    ref = {}
    for name, pm in merged.items():
        out = np.asarray(llama.generate(model, pm, jnp.asarray(ids), N_REF, attention_mask=jnp.asarray(mask)))
        ref[name] = {k: out[i, width:].tolist() for i, k in enumerate(PROMPTS)}
    engine = Engine(model, params, store, max_batch=3, block_size=4, num_blocks=8, slots=3, max_len=MAX_LEN)
    return {"engine": engine, "ref": ref, "hf_tokens": hf_tokens, "merged": merged, "model": model}


def _run(engine, plan):
    """``plan``: ``[(arrival step, prompt key, adapter, max_tokens)]`` -> ``{index: tokens}`` (streamed == final)."""
    ids, streamed, step = {}, {}, 0
    pending = sorted(enumerate(plan), key=lambda x: x[1][0])
    while pending or engine.has_work():
        while pending and pending[0][1][0] <= step:
            i, (_, key, adapter, n) = pending.pop(0)
            ids[i] = engine.add_request(PROMPTS[key], adapter, max_tokens=n)
        for out in engine.step():
            streamed.setdefault(out.id, []).extend(out.tokens)
        step += 1
    results = {i: engine.result(rid)[0] for i, rid in ids.items()}
    assert all(streamed[ids[i]] == results[i] for i in ids)
    return results


def test_greedy_matches_merged_generate_in_any_batch(setup):
    engine, ref = setup["engine"], setup["ref"]
    # the adapters are distinguishable: the same prompt gives a different continuation under each
    assert len({tuple(ref[a]["p0"]) for a in ref}) == len(ref)
    plan = [(0, "p0", "a", 6), (0, "p1", None, 8), (0, "p0", "b", 7), (0, "p2", "c", 5), (2, "p3", "a", 8),
            (3, "p4", "b", 3), (5, "p0", "c", 8), (6, "p0", None, 4)]  # fmt: skip
    got = _run(engine, plan)
    for i, (_, key, adapter, n) in enumerate(plan):
        assert got[i] == ref[adapter][key][:n], (i, adapter, key)
    assert sum(r.preemptions for r in engine.requests.values()) > 0  # 8 blocks could not hold 3 rows
    assert engine.allocator.num_used == 0 and not engine.waiting


def test_peft_folder_matches_transformers_peft(setup):
    engine = setup["engine"]
    rid = engine.add_request(PROMPTS["p3"], "peft", max_tokens=N_REF)
    engine.run_until_done()
    assert engine.result(rid) == (setup["hf_tokens"], "length")
    assert setup["hf_tokens"] == setup["ref"]["peft"]["p3"]


def test_eviction_and_reload_give_the_same_tokens(setup):
    engine, ref = setup["engine"], setup["ref"]
    pool = engine.adapters
    assert pool.slots - 1 < 4  # four adapters, two slots
    loads = pool.loads
    for adapter in ("a", "b", "c", "peft", "a", "b"):  # one at a time: LRU evicts the one used longest ago
        rid = engine.add_request(PROMPTS["p4"], adapter, max_tokens=5)
        engine.run_until_done()
        assert engine.result(rid)[0] == ref[adapter]["p4"][:5], adapter
    assert pool.loads - loads >= 4 and list(pool.resident) == ["a", "b"]  # a and b were evicted and reloaded
    plan = [(0, "p4", "a", 5), (0, "p4", "peft", 5), (0, "p2", "b", 5), (1, "p1", "c", 5), (2, "p4", "a", 5)]
    got = _run(engine, plan)  # concurrent: requests wait for a slot whose adapter is unpinned
    for i, (_, key, adapter, n) in enumerate(plan):
        assert got[i] == ref[adapter][key][:n], (i, adapter, key)
    assert len(pool.resident) == pool.slots - 1 and all(p == 0 for p in pool.pins)


def test_no_recompiles_in_steady_state_and_block_accounting(setup):
    engine, ref = setup["engine"], setup["ref"]
    before = engine.compiles
    assert before == len({(1, 8), (1, 16), (3, 1)})  # the prefill buckets and the decode step, traced once each
    rid = engine.add_request(PROMPTS["p3"], "b", max_tokens=6)  # 9 tokens: 3 blocks of 4, not max_len's 8
    rid2 = engine.add_request(PROMPTS["p0"], None, max_tokens=3)
    engine.step()
    bs = engine.block_size
    held = {r.id: len(r.blocks) for r in engine.requests.values() if r.row is not None}
    assert held == {rid: -(-(9 + 1) // bs), rid2: -(-(3 + 1) // bs)}  # prompt + the token being decoded
    assert engine.allocator.num_used == sum(held.values()) < 2 * engine.max_blocks
    engine.run_until_done()
    assert engine.allocator.num_used == 0 and all(r is None for r in engine.rows)
    assert engine.result(rid)[0] == ref["b"]["p3"][:6]
    assert engine.compiles == before


def test_sampling_same_alone_or_batched(setup):
    engine = setup["engine"]
    kw = dict(max_tokens=6, temperature=0.8, top_p=0.9, seed=7)
    alone = engine.add_request(PROMPTS["p1"], "c", **kw)
    engine.run_until_done()
    batched = engine.add_request(PROMPTS["p1"], "c", **kw)
    for key, adapter in (("p0", "a"), ("p2", None)):
        engine.add_request(PROMPTS[key], adapter, max_tokens=5, temperature=1.0, seed=3)
    engine.run_until_done()
    tokens = engine.result(alone)[0]
    assert tokens == engine.result(batched)[0]
    other = engine.add_request(PROMPTS["p1"], "c", **{**kw, "seed": 8})
    engine.run_until_done()
    assert engine.result(other)[0] != tokens  # the seed matters
    want = llama.generate(
        setup["model"], setup["merged"]["c"], jnp.asarray([PROMPTS["p1"]]), 6,
        temperature=0.8, top_p=0.9, key=jax.random.key(7),
    )  # fmt: skip
    assert tokens == np.asarray(want)[0, len(PROMPTS["p1"]) :].tolist()


def test_stop_eos_and_errors(setup, tmp_path):
    engine, ref = setup["engine"], setup["ref"]
    toks = ref["a"]["p2"]
    r_eos = engine.add_request(PROMPTS["p2"], "a", max_tokens=8, eos=toks[2])
    r_stop = engine.add_request(PROMPTS["p2"], "a", max_tokens=8, stop=[toks[1:3]])
    engine.run_until_done()
    cut = toks.index(toks[2]) + 1
    assert engine.result(r_eos) == (toks[:cut], "eos")
    assert engine.result(r_stop)[1] == "stop" and engine.result(r_stop)[0][-2:] == toks[1:3]
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        engine.add_request([1, 2], "zz")
    with pytest.raises(ValueError, match="does not fit max_len=32"):
        engine.add_request(list(range(MAX_LEN)), None)
    with pytest.raises(ValueError, match="need the Engine's tokenizer"):
        engine.add_request([1, 2], None, stop=["x"])
    spec = lorajax.Spec("lora", rank=2, targets=["q_proj"])
    params = engine.params
    foreign = {"model": {"layers": {"7": {"self_attn": {"q_proj": {"kernel": {
        "lora_A": jnp.zeros((32, 2)), "lora_B": jnp.zeros((2, 32))}}}}}}}  # fmt: skip
    with pytest.raises(ValueError, match="adapter 'foreign' does not fit the served model.*layers/7"):
        AdapterStore(params).add("foreign", (spec, foreign))
    # more requests than rows: they queue (no error) and all finish
    rids = [engine.add_request(PROMPTS["p0"], None, max_tokens=4) for _ in range(engine.max_batch + 2)]
    engine.step()
    assert all(r is not None for r in engine.rows) and len(engine.waiting) == 2
    done = engine.run_until_done()
    assert all(done[r] == ref[None]["p0"][:4] for r in rids)
    assert engine.compiles == 3  # sampling settings, stops and queueing are data, not shapes
    vera = lorajax.Spec("vera", rank=2, targets=["q_proj"])
    with pytest.raises(ValueError, match="'vera'.*LoRA-form"):
        AdapterStore(params).add("v", (vera, lorajax.init(vera, params, jax.random.key(0))))


def test_adapters_admitted_together_load_in_one_write(setup):
    engine, ref = setup["engine"], setup["ref"]
    pool = engine.adapters
    fresh = [n for n in ("a", "b", "c", "peft") if n not in pool.resident]  # two slots, four adapters
    loads, writes = pool.loads, pool.writes
    plan = [("p0", fresh[0], 3), ("p2", fresh[1], 3), ("p1", None, 3)]
    rids = [engine.add_request(PROMPTS[k], adapter, max_tokens=n) for k, adapter, n in plan]
    engine.step()  # admits all three: both loads are written by one call before the first prefill
    assert (pool.loads - loads, pool.writes - writes, pool.write_compiles) == (2, 1, 1)
    got = engine.run_until_done()
    for rid, (key, adapter, n) in zip(rids, plan):
        assert got[rid] == ref[adapter][key][:n], (adapter, key)


def test_prefetch_loads_a_waiting_adapter_but_never_a_running_rows(setup):
    engine, ref = setup["engine"], setup["ref"]
    pool = engine.adapters
    engine.add_request(PROMPTS["p4"], "b", max_tokens=2)
    engine.run_until_done()  # b: resident, most recently used, unpinned
    plan = [("p4", "a", 8), ("p0", None, 4), ("p2", None, 4), ("p0", "c", 3), ("p1", "peft", 3)]
    rids = [engine.add_request(PROMPTS[k], adapter, max_tokens=n) for k, adapter, n in plan]
    prefetched = pool.prefetched
    engine.step()  # a and two base requests take the three rows; c and peft wait
    slot_a = engine.requests[rids[0]].slot
    assert [r.id for r in engine.waiting] == rids[3:]
    # during the decode step c was loaded in place of b; peft found no slot (a's is pinned by its running row)
    assert list(pool.resident) == ["a", "c"] and pool.resident["a"] == slot_a and pool.prefetched - prefetched == 1
    assert pool.pins[slot_a] == 1 and pool.pins[pool.resident["c"]] == 0
    loads = pool.loads
    while engine.requests[rids[3]].row is None:
        engine.step()
    assert pool.loads == loads  # admitting c loaded nothing: it was prefetched
    got = engine.run_until_done()
    for rid, (key, adapter, n) in zip(rids, plan):
        assert got[rid] == ref[adapter][key][:n], (adapter, key)
    assert engine.compiles == 3 and pool.write_compiles == 1
