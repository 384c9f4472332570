"""An OpenAI-compatible HTTP server over `lorajax.serve.Engine` (Starlette + uvicorn).

``python -m lorajax.serve --model DIR --adapter NAME=DIR ... [--port 8000]`` serves one Llama-family
model folder (`lorajax.models.from_pretrained`) and any number of LoRA / rsLoRA / DoRA adapters (PEFT
folders) with the routes of OpenAI's API as vLLM's multi-LoRA server exposes them:

* ``GET /v1/models``: the base (``--served-model-name``, default the ``--model`` argument) and every
  adapter (``parent``: the base).
* ``POST /v1/completions``: ``model`` (the base or an adapter name: the adapter is chosen per request,
  as in vLLM), ``prompt`` (a string or a list of token ids; a list of one of them), ``max_tokens``
  (default 16), ``temperature`` (default 1; 0 = greedy), ``top_p``, ``stop`` (strings), ``seed``,
  ``stream`` (server-sent events, ``data: {...}`` chunks then ``data: [DONE]``), ``stream_options``
  ``{"include_usage": true}``; ``usage`` counts; vLLM's ``return_token_ids`` adds ``prompt_token_ids``
  and ``token_ids`` (the generated ids) to each choice or chunk.
* ``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's chat template
  (``chat_template`` in ``tokenizer_config.json`` or ``chat_template.jinja``; jinja2); 404 when the
  tokenizer has none. ``max_completion_tokens`` is read as ``max_tokens``.
* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and ``POST /v1/unload_lora_adapter``
  ``{"lora_name"}`` at run time (vLLM's routes). A loaded adapter must fit the engine's adapter pool
  (its targets and ``--max-lora-rank``); an adapter is unloaded only when no request uses it.
* ``GET /health``: 200 once the model is loaded.

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "code"}}``: 400 for a body that is
not JSON (``invalid_json``) and a prompt that does not fit the context (``context_length_exceeded``:
prompt + ``max_tokens`` > ``--max-model-len``, as vLLM), 404 for an unknown model or adapter
(``model_not_found``) and for chat without a template, 409 for unloading an adapter in use, 413 for a
body over ``--max-body-bytes``, 422 for a missing or invalid field (``invalid_value``, naming the
field).

Threads: one engine thread owns the `Engine` (and its `AdapterStore`): the HTTP handlers (asyncio)
send it commands (add a request, abort one, load or unload an adapter) through a queue, and it steps
the engine while there is work, pushing each request's new tokens to that request's asyncio queue.
Text is decoded from all tokens so far and sent as the difference (held back while it ends in an
incomplete UTF-8 character or could be the start of a stop string); the stop string is not part of
the text (OpenAI's behaviour), the tokens up to and including the one that completed it are counted.
A client that disconnects aborts its request. SIGINT / SIGTERM: uvicorn's graceful shutdown, then
the engine thread stops.

Tokenizers: a model folder's ``tokenizer.json`` (HF ``tokenizers``; completions add the special
tokens, e.g. BOS, as vLLM does; a chat template's text is encoded without them), or the
``char_tokenizer.json`` that the ``lm`` experiment task writes beside its base
(``{"kind": "char", "chars": ...}``: id 0 unknown, ``i`` the ``i``-th character). eos ids come from
``generation_config.json`` / ``config.json`` (``eos_token_id``).

References: OpenAI API reference (completions, chat completions, streaming, error objects),
https://platform.openai.com/docs/api-reference; vLLM's OpenAI-compatible server and its LoRA routes
(``vllm/entrypoints/openai/api_server.py``, ``serving_models.py``: ``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``; adapters chosen by ``model``).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import queue
import secrets
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Sequence

import numpy as np

from lorajax.serve.adapters import AdapterStore
from lorajax.serve.engine import Engine, Output

__all__ = ["TextTokenizer", "load_tokenizer", "EngineThread", "HTTPError", "build_app", "main", "parse_args"]

log = logging.getLogger("lorajax.serve")
CHAR_TOKENIZER = "char_tokenizer.json"


# ---------------------------------------------------------------------------- tokenizers
class TextTokenizer:
    """Text <-> ids for serving: ``encode(text, special) -> list[int]``, ``decode(ids) -> str``, ``chat_template``."""

    def __init__(
        self,
        encode: Callable[[str, bool], list[int]],
        decode: Callable[[list[int]], str],
        chat_template: str | None = None,
        special_tokens: dict | None = None,
    ):
        self._encode, self._decode = encode, decode
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})

    def encode(self, text: str, special: bool = True) -> list[int]:
        return [int(i) for i in self._encode(text, special)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text of ``messages`` with the generation prompt (jinja2, sandboxed, as transformers renders)."""
        if self.chat_template is None:
            raise ValueError("the tokenizer has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, **self.special_tokens
        )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_str(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok if isinstance(tok, str) else None


def load_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
    """The model folder's tokenizer: ``tokenizer.json``, else ``char_tokenizer.json``, else a ValueError."""
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # transformers' named templates: [{"name", "template"}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    special = {k: _token_str(config.get(k)) or "" for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if (folder / "tokenizer.json").is_file():
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        return TextTokenizer(
            lambda text, sp: tok.encode(text, add_special_tokens=sp).ids,
            lambda ids: tok.decode(ids, skip_special_tokens=True),
            template if isinstance(template, str) else None,
            special,
        )
    path = folder / CHAR_TOKENIZER
    if path.is_file():
        data = _read_json(path)
        if data.get("kind") != "char" or not isinstance(data.get("chars"), str):
            raise ValueError(f"{path} is not a char tokenizer file ({{'kind': 'char', 'chars': ...}})")
        chars: str = data["chars"]
        index = {c: i + 1 for i, c in enumerate(chars)}
        return TextTokenizer(
            lambda text, sp: [index.get(c, 0) for c in text],
            lambda ids: "".join(chars[i - 1] if 0 < i <= len(chars) else "\ufffd" for i in ids),
            template if isinstance(template, str) else None,
            special,
        )
    raise ValueError(f"--model {folder}: no tokenizer.json nor {CHAR_TOKENIZER} in the folder; the server needs text")


def eos_ids(folder: str | os.PathLike) -> list[int]:
    """``eos_token_id`` of ``generation_config.json``, else ``config.json`` (an int or a list), else []."""
    for name in ("generation_config.json", "config.json"):
        e = _read_json(Path(folder) / name).get("eos_token_id")
        if e is not None:
            return [int(i) for i in np.atleast_1d(e)]
    return []


# ---------------------------------------------------------------------------- engine thread
class EngineThread:
    """The one thread that owns an `Engine`: ``call(fn)`` runs ``fn(engine)`` there (a concurrent Future);
    ``add(sink, **request)`` queues a request whose `Output`s (or an exception) go to ``sink``."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cmds: queue.Queue = queue.Queue()
        self._sinks: dict[int, Callable[[Output | BaseException], None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorajax-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(None)
        self._thread.join(timeout)

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put((fn, fut))
        return fut

    def add(self, sink: Callable[[Output | BaseException], None], **request: Any) -> concurrent.futures.Future:
        def fn(engine: Engine) -> int:
            rid = engine.add_request(**request)
            self._sinks[rid] = sink
            return rid

        return self.call(fn)

    def abort(self, rid: int) -> None:
        def fn(engine: Engine) -> None:
            if self._sinks.pop(rid, None) is not None:
                engine.abort(rid)
                engine.requests.pop(rid, None)

        self.call(fn)

    def _run(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_work()
            try:
                while True:
                    item = self._cmds.get(block=block, timeout=0.5 if block else None)
                    block = False
                    if item is None:
                        return
                    fn, fut = item
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn(self.engine))
                        except Exception as e:  # the caller turns it into an HTTP error
                            fut.set_exception(e)
            except queue.Empty:
                pass
            if not self.engine.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # fail every request rather than the thread
                log.exception("engine step failed")
                for rid, sink in list(self._sinks.items()):
                    sink(e)
                    self.engine.abort(rid)
                    self.engine.requests.pop(rid, None)
                self._sinks.clear()
                continue
            for out in outputs:
                to = self._sinks.get(out.id)
                if to is not None:
                    to(out)
                if out.finished:
                    self._sinks.pop(out.id, None)
                    self.engine.requests.pop(out.id, None)


# ---------------------------------------------------------------------------- HTTP errors and parsing
class HTTPError(Exception):
    """An error answered as ``{"error": {"message", "type", "code"}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error"}

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self):
        from starlette.responses import JSONResponse

        kind = self.TYPES.get(self.status, "invalid_request_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _invalid(field: str, message: str) -> HTTPError:
    return HTTPError(422, f"{field}: {message}", "invalid_value", field)


def _field(body: dict, name: str, kinds: tuple, default: Any = None, *, required: bool = False) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise HTTPError(422, f"missing required field {name!r}", "missing_field", name)
        return default
    v = body[name]
    if isinstance(v, bool) and bool not in kinds:
        raise _invalid(name, f"expected {' or '.join(k.__name__ for k in kinds)}, got {v!r}")
    if not isinstance(v, kinds):
        raise _invalid(name, f"expected {' or '.join(k.__name__ for k in kinds)}, got {type(v).__name__}")
    return v


@dataclasses.dataclass
class _Settings:
    model: str
    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int
    stream: bool
    include_usage: bool
    return_token_ids: bool


class Server:
    """The Starlette app's state: engine thread, tokenizer, names and limits (built by `build_app`)."""

    def __init__(self, engine_thread: EngineThread, tokenizer: TextTokenizer, model_name: str, eos: Sequence[int]):
        self.thread, self.tokenizer, self.model_name = engine_thread, tokenizer, model_name
        self.engine = engine_thread.engine
        self.eos = list(eos)
        self.created = int(time.time())
        self.max_body_bytes = 1 << 20

    # -------------------------------------------------------------- request parsing
    async def body(self, request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise HTTPError(413, f"request body of {size} bytes exceeds {self.max_body_bytes}", "body_too_large")
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            raise HTTPError(413, f"request body of {len(raw)} bytes exceeds {self.max_body_bytes}", "body_too_large")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise HTTPError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_json")
        return body

    def adapter_of(self, model: str) -> str | None:
        if model == self.model_name:
            return None
        if model in self.engine.store:
            return model
        raise HTTPError(
            404,
            f"the model {model!r} does not exist; served: {[self.model_name, *self.engine.store.names()]}",
            "model_not_found",
            "model",
        )

    def settings(self, body: dict, prompt_ids: list[int]) -> _Settings:
        model = _field(body, "model", (str,), required=True)
        adapter = self.adapter_of(model)
        n = _field(body, "n", (int,), 1)
        if n != 1:
            raise _invalid("n", f"only n=1 is supported, got {n}")
        for name in ("echo", "logprobs", "best_of", "suffix", "tools", "logit_bias"):
            v = body.get(name)
            if v not in (None, False, 1, {}, []) or (name == "best_of" and v not in (None, 1)):
                raise _invalid(name, "not supported by this server")
        max_tokens = _field(body, "max_tokens", (int,), None)
        if max_tokens is None:
            max_tokens = _field(body, "max_completion_tokens", (int,), 16)
        if max_tokens < 1:
            raise _invalid("max_tokens", f"must be >= 1, got {max_tokens}")
        temperature = float(_field(body, "temperature", (int, float), 1.0))
        if not 0 <= temperature <= 100:
            raise _invalid("temperature", f"must be in [0, 100], got {temperature}")
        top_p = float(_field(body, "top_p", (int, float), 1.0))
        if not 0 < top_p <= 1:
            raise _invalid("top_p", f"must be in (0, 1], got {top_p}")
        stop = _field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) and s for s in stop):
            raise _invalid("stop", "must be a non-empty string or a list of them")
        seed = _field(body, "seed", (int,), None)
        seed = secrets.randbits(31) if seed is None else seed
        stream = _field(body, "stream", (bool,), False)
        options = _field(body, "stream_options", (dict,), {})
        total = len(prompt_ids) + max_tokens
        if total > self.engine.max_len:
            raise HTTPError(
                400,
                f"this model's maximum context length is {self.engine.max_len} tokens; the request has "
                f"{len(prompt_ids)} prompt tokens + max_tokens {max_tokens} = {total}: shorten the prompt "
                "or lower max_tokens",
                "context_length_exceeded",
                "prompt" if len(prompt_ids) >= self.engine.max_len else "max_tokens",
            )
        vocab = self.engine.cfg.vocab_size
        if not prompt_ids or min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise _invalid("prompt", f"must be non-empty with token ids in [0, {vocab})")
        return _Settings(
            model, adapter, prompt_ids, max_tokens, temperature, top_p, stop, int(seed), stream,
            bool(options.get("include_usage", False)), bool(body.get("return_token_ids", False)),
        )  # fmt: skip

    def completion_prompt(self, body: dict) -> list[int]:
        p = _field(body, "prompt", (str, list), required=True)
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            return self.tokenizer.encode(p, True)
        if p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            return list(p)
        raise _invalid("prompt", "must be a string or a list of token ids (one prompt per request)")

    def chat_prompt(self, body: dict) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise HTTPError(
                404,
                "this model's tokenizer has no chat template (chat_template in tokenizer_config.json or "
                "chat_template.jinja), so /v1/chat/completions is not served; use /v1/completions",
                "chat_template_missing",
            )
        messages = _field(body, "messages", (list,), required=True)
        if not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise _invalid("messages", "must be a non-empty list of {'role': str, 'content': str}")
        try:
            text = self.tokenizer.apply_chat_template(messages)
        except Exception as e:  # jinja2 errors
            raise _invalid("messages", f"the chat template failed: {e}") from None
        return self.tokenizer.encode(text, False)

    # -------------------------------------------------------------- generation
    async def generate(self, s: _Settings) -> AsyncGenerator[tuple[str, list[int], str | None], None]:
        """Yield ``(new text, new token ids, finish reason or None)`` until the request finishes."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(item: Output | BaseException) -> None:
            loop.call_soon_threadsafe(q.put_nowait, item)

        try:
            rid = await asyncio.wrap_future(
                self.thread.add(
                    sink,
                    prompt_ids=s.prompt_ids,
                    adapter=s.adapter,
                    max_tokens=s.max_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    stop=s.stop,
                    eos=self.eos,
                    seed=s.seed,
                )  # fmt: skip
            )
        except ValueError as e:
            raise HTTPError(400, str(e), "invalid_request") from None
        tokens: list[int] = []
        sent, done = 0, False
        hold = max((len(t) for t in s.stop), default=1) - 1
        try:
            while not done:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                new = list(item.tokens)
                tokens += new
                done = item.finished
                text = self.tokenizer.decode(tokens)
                reason = None
                if done:
                    cut = min((i for i in (text.find(t) for t in s.stop) if i >= 0), default=-1)
                    if cut >= 0:
                        text = text[:cut]
                    reason = "length" if item.finish_reason == "length" else "stop"
                    end = len(text)
                else:
                    end = len(text) - hold
                    while end > sent and text[end - 1] == "\ufffd":
                        end -= 1  # an incomplete multi-byte character: wait for the next token
                yield text[sent:end] if end > sent else "", new, reason
                sent = max(sent, end)
        finally:
            if not done:
                self.thread.abort(rid)


# ---------------------------------------------------------------------------- the app
def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _prepend(first: Any, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


def build_app(server: Server, *, on_shutdown: Callable[[], None] | None = None):
    """The Starlette app of ``server`` (routes in the module docstring)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def handles_errors(fn):
        async def endpoint(request: Request):
            try:
                return await fn(request)
            except HTTPError as e:
                return e.response()

        return endpoint

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    async def models(request: Request):
        def entry(name: str, parent: str | None, root: str) -> dict:
            return {
                "id": name, "object": "model", "created": server.created, "owned_by": "lorajax",
                "root": root, "parent": parent, "max_model_len": server.engine.max_len,
            }  # fmt: skip

        store = server.engine.store
        data = [entry(server.model_name, None, server.model_name)]
        data += [entry(n, server.model_name, store[n].source) for n in store.names()]
        return JSONResponse({"object": "list", "data": data})

    async def respond(request: Request, chat: bool):
        body = await server.body(request)
        prompt = server.chat_prompt(body) if chat else server.completion_prompt(body)
        s = server.settings(body, prompt)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        gen = server.generate(s)
        first = await gen.__anext__()  # add errors (e.g. a removed adapter) become HTTP errors before streaming

        def choice(text: str, ids: list[int], reason: str | None, delta: bool) -> dict:
            c: dict[str, Any] = {"index": 0}
            if chat and delta:
                c["delta"] = {"content": text} if text else {}
            elif chat:
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"], c["logprobs"] = text, None
            c["finish_reason"] = reason
            if s.return_token_ids:
                c["token_ids"] = ids
            return c

        if not s.stream:
            text, ids, reason = first
            async for t, new, r in gen:
                text, reason = text + t, r
                ids += new
            out = {
                "id": rid, "object": obj, "created": created, "model": s.model,
                "choices": [choice(text, ids, reason, False)], "usage": _usage(len(s.prompt_ids), len(ids)),
            }  # fmt: skip
            if s.return_token_ids:
                out["prompt_token_ids"] = s.prompt_ids
            return JSONResponse(out)

        async def events() -> AsyncIterator[str]:
            n = 0
            chunk_obj = obj + ".chunk" if chat else obj

            def chunk(choices: list, **extra: Any) -> str:
                body = {"id": rid, "object": chunk_obj, "created": created, "model": s.model, "choices": choices}
                return f"data: {json.dumps({**body, **extra})}\n\n"

            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            try:
                async for text, new, reason in _prepend(first, gen):
                    n += len(new)
                    if text or reason or s.return_token_ids:
                        yield chunk([choice(text, new, reason, True)])
                if s.include_usage:
                    yield chunk([], usage=_usage(len(s.prompt_ids), n))
            except Exception as e:  # the status line is sent: report the error in the stream
                err = {"message": str(e), "type": "server_error", "code": "internal_error"}
                yield f"data: {json.dumps({'error': err})}\n\n"
            finally:
                await gen.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(request: Request):
        return await respond(request, chat=False)

    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    async def load_adapter(request: Request):
        body = await server.body(request)
        name = _field(body, "lora_name", (str,), required=True)
        path = _field(body, "lora_path", (str,), required=True)
        if name == server.model_name or name in server.engine.store:
            raise HTTPError(400, f"an adapter or model named {name!r} is already served", "adapter_exists", "lora_name")
        if not Path(path).is_dir():
            raise HTTPError(404, f"lora_path {path!r} is not a folder on the server", "adapter_path_not_found")
        try:
            await asyncio.wrap_future(server.thread.call(lambda engine: engine.add_adapter(name, path)))
        except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
            raise HTTPError(400, f"adapter {name!r} could not be loaded: {e}", "invalid_adapter") from None
        return JSONResponse({"object": "lora_adapter", "id": name, "status": "loaded"})

    async def unload_adapter(request: Request):
        body = await server.body(request)
        name = _field(body, "lora_name", (str,), required=True)
        if name not in server.engine.store:
            raise HTTPError(404, f"no adapter named {name!r} is loaded", "model_not_found", "lora_name")
        try:
            await asyncio.wrap_future(server.thread.call(lambda engine: engine.remove_adapter(name)))
        except KeyError as e:
            raise HTTPError(404, str(e), "model_not_found", "lora_name") from None
        except ValueError as e:
            raise HTTPError(409, str(e), "adapter_in_use", "lora_name") from None
        return JSONResponse({"object": "lora_adapter", "id": name, "status": "unloaded"})

    async def not_found(request: Request, exc: Exception):
        return HTTPError(404, f"no route {request.method} {request.url.path}", "not_found").response()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", handles_errors(completions), methods=["POST"]),
        Route("/v1/chat/completions", handles_errors(chat_completions), methods=["POST"]),
        Route("/v1/load_lora_adapter", handles_errors(load_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", handles_errors(unload_adapter), methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            on_shutdown()

    return Starlette(routes=routes, exception_handlers={404: not_found}, lifespan=lifespan)


# ---------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lorajax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Llama-family model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a PEFT adapter folder (repeat)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the base's name in 'model' (default: --model as given)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + generated tokens (default: the model's)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded at once")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: max-batch full-length sequences)")
    p.add_argument("--max-loras", type=int, default=4, help="adapters resident on the device at once")
    p.add_argument("--max-lora-rank", type=int, default=16, help="largest rank a run-time loaded adapter may have")
    p.add_argument(
        "--lora-targets", nargs="*", default=None,
        help="module names the adapter pool holds, e.g. q_proj v_proj (default: every Dense but lm_head)",
    )  # fmt: skip
    p.add_argument("--dtype", default=None, help="parameter dtype (e.g. bfloat16; default: the checkpoint's)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def _pool_targets(params: Any, wanted: Sequence[str] | None) -> list[str]:
    from lorajax.paths import module_name, weight_leaves

    names = [module_name(k) for k, _ in weight_leaves(params)]
    if wanted is None:
        return [n for n in names if n.split(".")[-1] != "lm_head"]
    picked = [n for n in names if n.split(".")[-1] in set(wanted) or n in set(wanted)]
    if not picked:
        raise SystemExit(f"--lora-targets {list(wanted)} match no Dense layer of the model (e.g. {names[:2]})")
    return picked


def make_server(args: argparse.Namespace) -> Server:
    """Load the model, tokenizer and adapters of ``args`` and start the engine thread."""
    from lorajax.models import from_pretrained
    from lorajax.serve import kv_cache

    tokenizer = load_tokenizer(args.model)
    model, params = from_pretrained(args.model, dtype=args.dtype)
    store = AdapterStore(params)
    for item in args.adapter:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--adapter expects NAME=DIR, got {item!r}")
        store.add(name, folder)
    cfg = model.cfg
    max_len = args.max_model_len or cfg.max_position_embeddings
    num_blocks = args.num_blocks or args.max_batch * kv_cache.blocks_needed(max_len, args.block_size)
    rank = max([args.max_lora_rank, *(r for n in store.names() for r in store[n].ranks.values())])
    engine = Engine(
        model, params, store, max_batch=args.max_batch, block_size=args.block_size, num_blocks=num_blocks,
        slots=args.max_loras + 1, max_len=max_len, max_rank=rank, targets=_pool_targets(params, args.lora_targets),
        tokenizer=tokenizer.decode,
    )  # fmt: skip
    thread = EngineThread(engine)
    thread.start()
    server = Server(thread, tokenizer, args.served_model_name or args.model, eos_ids(args.model))
    server.max_body_bytes = args.max_body_bytes
    return server


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT / SIGTERM; returns 0 after a clean shutdown."""
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = make_server(args)
    app = build_app(server, on_shutdown=server.thread.stop)
    log.info("serving %s with adapters %s", server.model_name, server.engine.store.names())
    stopped: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        # uvicorn shuts down gracefully on these, then raises the signal again under the handler it found:
        # this one, so a signal stop is a normal return (exit status 0) rather than death by the signal
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    server.thread.stop()
    log.info("stopped%s", f" by signal {stopped[0]}" if stopped else "")
    return 0
