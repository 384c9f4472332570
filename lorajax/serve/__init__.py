"""Serving: continuous batching of requests for many LoRA adapters over one Llama-family model.

`Engine` (continuous batching, paged KV cache, per-row adapters from an LRU
device pool, static bucketed shapes), `AdapterStore` (host memory: PEFT folders
or ``(spec, adapters)`` pairs in serving form), `DevicePool` (device slots),
`lorajax.serve.kv_cache` (blocks, block tables, gather/scatter). The OpenAI-compatible
HTTP server is `lorajax.serve.server` (``python -m lorajax.serve``); importing this
package imports no web stack.
"""

from lorajax.serve import kv_cache
from lorajax.serve.adapters import AdapterStore, DevicePool, ServingAdapter, serving_form
from lorajax.serve.engine import Engine, Output, Request

__all__ = ["Engine", "Output", "Request", "AdapterStore", "DevicePool", "ServingAdapter", "serving_form", "kv_cache"]
