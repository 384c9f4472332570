"""lorajax.serve.server: the OpenAI-compatible HTTP server, run as ``python -m lorajax.serve`` in a subprocess.

One tiny Llama folder (2 layers, width 32, a 31-character char tokenizer and a chat template) written by the
test, three PEFT adapter folders (LoRA r=2 on q/v, rsLoRA r=4 on every linear layer, DoRA r=3 on o/down) given on
the command line and a fourth (LoRA r=2 on k/up) loaded at run time. One server for the module on a free port;
requests through ``urllib.request`` from a thread pool. Greedy tokens must equal ``llama.generate`` on the base
merged with the adapter (as `lorajax.peft.load` reads the folder), for concurrent streaming and non-streaming
requests.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.models import llama, save_pretrained

CHARS = "abcdefghijklmnopqrstuvwxyz :\n.!"  # ids 1..31, 0 = unknown
MAX_LEN, N = 40, 6
PROMPTS = ["to be or", "hello", "a cat", "why"]  # <= 8 tokens: one prefill bucket
TEMPLATE = "{% for m in messages %}{{ m['role'][0] }}{{ m['content'] }}\n{% endfor %}:"
SPECS = {
    "a": lorajax.Spec("lora", rank=2, targets=["q_proj", "v_proj"], init_weights=False),
    "b": lorajax.Spec("lora", rank=4, alpha=8, targets="all-linear", init_weights=False, use_rslora=True),
    "c": lorajax.Spec("dora", rank=3, targets=["o_proj", "down_proj"], init_weights=False),
    "d": lorajax.Spec("lora", rank=2, targets=["k_proj", "up_proj"], init_weights=False),
}


def _encode(text):
    return [CHARS.index(c) + 1 for c in text]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    root = tmp_path_factory.mktemp("serve_http")
    cfg = llama.Config(
        vocab_size=len(CHARS) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = llama.build(cfg)
    params = jax.tree.map(lambda x: 4 * x, model.init(jax.random.key(0), *llama.example_inputs(cfg))["params"])
    save_pretrained(root / "base", model, params)
    (root / "base" / "char_tokenizer.json").write_text(json.dumps({"kind": "char", "chars": CHARS}))
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    for i, (name, spec) in enumerate(SPECS.items()):
        adapters = jax.tree.map(lambda x: 3 * x, lorajax.init(spec, params, jax.random.key(i + 1)))
        lorajax.peft.save(root / name, spec, adapters, params)

    port = _free_port()
    log = open(root / "server.log", "w")
    cmd = [sys.executable, "-m", "lorajax.serve", "--model", str(root / "base"), "--served-model-name", "base",
           "--port", str(port), "--max-model-len", str(MAX_LEN), "--max-batch", "4", "--block-size", "4",
           "--max-loras", "3", "--max-lora-rank", "4", "--max-body-bytes", "4096",
           "--log-level", "warning"]  # fmt: skip
    cmd += [f"--adapter={n}={root / n}" for n in "abc"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())

    # references while the server starts: merged params as the server reads each folder, one padded batch
    width = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), width), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = _encode(p), 1
    ref = {}
    for name in ["base", *SPECS]:
        if name == "base":
            merged = params
        else:
            spec, adapters = lorajax.peft.load(root / name, params)
            merged = lorajax.merge(spec, params, adapters)
        out = np.asarray(llama.generate(model, merged, jnp.asarray(ids), N, attention_mask=jnp.asarray(mask)))
        ref[name] = {p: out[i, width:].tolist() for i, p in enumerate(PROMPTS)}

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the server did not start: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)
    yield {"url": url, "proc": proc, "ref": ref, "root": root}
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def _post(url, body, *, raw=None):
    """``(status, parsed JSON body)``; ``raw`` bytes are sent as they are."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _stream(url, body):
    """The ``data:`` events of a streaming request, parsed (``[DONE]`` last, as a string)."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    assert events[-1] == "[DONE]"
    return events[:-1]


def _complete(server, model, prompt, stream):
    body = {"model": model, "prompt": prompt, "max_tokens": N, "temperature": 0, "return_token_ids": True}
    url = server["url"] + "/v1/completions"
    if not stream:
        status, out = _post(url, body)
        assert status == 200, out
        c = out["choices"][0]
        return c["text"], c["token_ids"], c["finish_reason"], out["usage"]
    events = _stream(url, {**body, "stream_options": {"include_usage": True}})
    choices = [e["choices"][0] for e in events if e["choices"]]
    assert all(e["object"] == "text_completion" and e["model"] == model for e in events)
    text = "".join(c["text"] for c in choices)
    tokens = [t for c in choices for t in c["token_ids"]]
    return text, tokens, choices[-1]["finish_reason"], events[-1]["usage"]


def _error(status_body, status, code):
    got, body = status_body
    assert got == status, body
    err = body["error"]
    assert err["code"] == code and isinstance(err["message"], str) and err["message"] and "type" in err
    return err["message"]


def test_models_lists_base_and_adapters(server):
    out = json.loads(urllib.request.urlopen(server["url"] + "/v1/models", timeout=10).read())
    assert out["object"] == "list"
    assert [m["id"] for m in out["data"]] == ["base", "a", "b", "c"]
    assert [m["parent"] for m in out["data"]] == [None, "base", "base", "base"]


def test_concurrent_requests_match_merged_generate(server):
    ref = server["ref"]
    assert len({tuple(ref[m][PROMPTS[0]]) for m in ref}) == len(ref)  # the adapters change the text
    jobs = [(m, p, s) for i, m in enumerate(["base", "a", "b", "c"]) for s in (False, True) for p in PROMPTS[i::2]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: _complete(server, *j), jobs))
    for (model, prompt, _), (text, tokens, reason, usage) in zip(jobs, results):
        assert tokens == ref[model][prompt], (model, prompt)
        assert text == "".join(CHARS[t - 1] if t else "\ufffd" for t in tokens)
        assert reason == "length"
        assert usage == {"prompt_tokens": len(prompt), "completion_tokens": N, "total_tokens": len(prompt) + N}


def test_chat_uses_the_template_and_streams(server):
    messages = [{"role": "user", "content": "hi"}]
    prompt = "uhi\n:"
    body = {"model": "a", "messages": messages, "max_tokens": N, "temperature": 0, "return_token_ids": True}
    status, out = _post(server["url"] + "/v1/chat/completions", body)
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    _, tokens, _, usage = _complete(server, "a", prompt, stream=False)
    assert out["choices"][0]["token_ids"] == tokens and out["usage"] == usage
    events = _stream(server["url"] + "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == out["choices"][0]["message"]["content"]


def test_stop_string_ends_and_is_cut(server):
    text, tokens, _, _ = _complete(server, "b", PROMPTS[0], stream=False)
    stop = text[1]
    j = text.index(stop)  # the token that completes the stop string is the (j+1)-th
    for stream in (False, True):
        body = {"model": "b", "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0, "stop": [stop]}
        if stream:
            events = _stream(server["url"] + "/v1/completions", body)
            got = "".join(e["choices"][0]["text"] for e in events)
            reason = events[-1]["choices"][0]["finish_reason"]
        else:
            _, out = _post(server["url"] + "/v1/completions", body)
            got, reason = out["choices"][0]["text"], out["choices"][0]["finish_reason"]
            assert out["usage"]["completion_tokens"] == j + 1
        assert (got, reason) == (text[:j], "stop")


def test_load_and_unload_adapter_at_run_time(server):
    url, ref = server["url"], server["ref"]
    assert _post(url + "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": str(server["root"] / "d")})[0] == 200
    models = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=10).read())
    assert "d" in [m["id"] for m in models["data"]]
    assert _complete(server, "d", PROMPTS[1], stream=True)[1] == ref["d"][PROMPTS[1]]
    _error(_post(url + "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": str(server["root"] / "d")}),
           400, "adapter_exists")  # fmt: skip
    # a client that disconnects mid-stream: the adapter unloads once its request has ended (aborted or finished)
    body = {"model": "d", "prompt": "hi", "max_tokens": MAX_LEN - 2, "temperature": 0, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.readline().startswith(b"data: ")
    deadline = time.time() + 10
    while (got := _post(url + "/v1/unload_lora_adapter", {"lora_name": "d"}))[0] == 409 and time.time() < deadline:
        time.sleep(0.05)
    assert got[0] == 200, got
    models = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=10).read())
    assert "d" not in [m["id"] for m in models["data"]]
    _error(_post(url + "/v1/completions", {"model": "d", "prompt": "hi"}), 404, "model_not_found")
    _error(_post(url + "/v1/unload_lora_adapter", {"lora_name": "d"}), 404, "model_not_found")
    _error(_post(url + "/v1/load_lora_adapter", {"lora_name": "e", "lora_path": str(server["root"] / "nope")}),
           404, "adapter_path_not_found")  # fmt: skip
    # the others still give their tokens (the freed slot is reused)
    assert _complete(server, "c", PROMPTS[3], stream=False)[1] == ref["c"][PROMPTS[3]]


def test_errors(server):
    url = server["url"] + "/v1/completions"
    msg = _error(_post(url, {"model": "nobody", "prompt": "hi"}), 404, "model_not_found")
    assert "nobody" in msg
    msg = _error(_post(url, {"model": "base", "prompt": "ab" * MAX_LEN}), 400, "context_length_exceeded")
    assert str(MAX_LEN) in msg
    _error(_post(url, {"model": "base", "prompt": "hi", "max_tokens": MAX_LEN}), 400, "context_length_exceeded")
    _error(_post(url, None, raw=b'{"model": "base", "prompt": '), 400, "invalid_json")
    _error(_post(url, None, raw=b"[1, 2]"), 400, "invalid_json")
    assert "'model'" in _error(_post(url, {"prompt": "hi"}), 422, "missing_field")
    assert "'prompt'" in _error(_post(url, {"model": "base"}), 422, "missing_field")
    assert "max_tokens" in _error(_post(url, {"model": "a", "prompt": "hi", "max_tokens": "5"}), 422, "invalid_value")
    _error(_post(url, {"model": "a", "prompt": "hi", "temperature": -1}), 422, "invalid_value")
    _error(_post(url, {"model": "a", "prompt": [1, 99]}), 422, "invalid_value")
    _error(_post(url, {"model": "a", "prompt": "hi", "n": 2}), 422, "invalid_value")
    _error(_post(url, None, raw=b" " * 4096 + b"{}"), 413, "body_too_large")
    _error(_post(server["url"] + "/v1/nothing", {}), 404, "not_found")
    _error(_post(server["url"] + "/v1/unload_lora_adapter", {}), 422, "missing_field")


def test_sigterm_stops_the_server_cleanly(server):
    proc = server["proc"]
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    log = (server["root"] / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]
