"""Fused self-attention for XLA:CPU: one C++ kernel (forward and backward) called through ``jax.ffi``.

`fused_attention` computes what `lorajax.models.attention.dense_attention` does (per query head
``softmax(q kᵀ/√d + mask) v``, hidden scores at float32's lowest value) for self-attention without a KV
cache, on ``q [B, S, K, G, d]``, ``k, v [B, S, K, d]``, ``mask [B, S, S]`` in float32, without forming the
``[S, S]`` scores: queries and keys in blocks of 64, a running row maximum and sum (online softmax), and
with ``causal=True`` only the key blocks a query block can see (a sliding ``window`` skips the blocks
before it too); on a causal diagonal block (query block = key block) the products also skip the register
tiles and contraction ranges that meet only keys after the query, about a third of such a block's work (at the
benchmark's shapes, forward + backward 17.4 → 15.1 ms per layer with the per-worker buffers below; outputs
unchanged bit for bit). The backward recomputes each block's probabilities from the saved row log-sum-exp
(FlashAttention-2's Algorithm 2), so the gradient needs ``O(S)`` extra memory per head, not ``O(S²)``. Each
worker thread of a call reuses one set of buffers for all the heads it computes (freed when the call returns).
Any leading batch dimensions are folded (``jax.vmap`` over it works: ``vmap_method="broadcast_all"``).

Why a kernel: XLA:CPU runs attention as many small batched matmuls plus separate softmax, mask and
layout passes; at the benchmark's shapes (``shared/specs/performance.md`` §7) that core ran at 0.19 of a
plain matmul's rate. The kernel keeps each block in cache and fuses mask, softmax and both products.

The kernel is C++ source in the package (``csrc/attention_cpu.cc``), compiled with the machine's C++
compiler (``$CXX`` or ``g++``, ``-O3 -march=native``) on first use into the cache folder
(``$LORAJAX_CACHE`` or ``~/.cache/lorajax``), keyed by the source, jaxlib's version and the CPU, then
registered as the FFI targets ``lorajax_attention_fwd`` / ``_bwd`` for the CPU platform. `available()` says
whether that worked; when it did not (no compiler, a failed build, ``LORAJAX_FUSED_ATTENTION=0``) the
models' ``attention="auto"`` uses the blockwise path instead, with one warning naming the reason.

Limits: float32, CPU, self-attention (``T == S``) only; first-order gradients (``jax.grad``/``vjp``; a
second derivative raises NotImplementedError saying so, ``jax.jvp`` JAX's custom_vjp error: choose
``attention="blockwise"`` for those); under a multi-device mesh the
custom call is not partitioned, so the models' ``"auto"`` uses it only on a single device.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorajax.models import attention, attention_cpu
  >>> ks = jax.random.split(jax.random.key(0), 3)
  >>> q = jax.random.normal(ks[0], (1, 70, 2, 2, 8)); k, v = (jax.random.normal(x, (1, 70, 2, 8)) for x in ks[1:])
  >>> mask = jnp.tril(jnp.ones((70, 70), bool))[None]
  >>> if attention_cpu.available():
  ...     got = attention_cpu.fused_attention(q, k, v, mask)
  ...     assert jnp.allclose(got, attention.dense_attention(q, k, v, mask), atol=1e-5)

References: T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
arXiv:2307.08691 (Algorithms 1 and 2); official code github.com/Dao-AILab/flash-attention
(``csrc/flash_attn``, CUDA; the equations only are used here).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

__all__ = ["fused_attention", "available", "unavailable_reason", "library_path"]

_SOURCE = Path(__file__).with_name("csrc") / "attention_cpu.cc"
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
_TARGETS = {"lorajax_attention_fwd": "LorajaxAttentionFwd", "lorajax_attention_bwd": "LorajaxAttentionBwd"}


def _cpu_id() -> str:
    """What the compiled code depends on beyond the source: machine, CPU model and flags (``-march=native``)."""
    info = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        info = "\n".join(sorted(set(keep)))
    except OSError:
        pass
    return f"{platform.machine()}\n{info}"


def library_path() -> Path:
    """Where the compiled kernel for this source, jaxlib and CPU lives (it may not exist yet)."""
    import jaxlib

    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), jaxlib.__version__.encode(), " ".join(_FLAGS).encode(), _cpu_id().encode()):
        key.update(part)
        key.update(b"\0")
    root = Path(os.environ.get("LORAJAX_CACHE", Path.home() / ".cache" / "lorajax"))
    return root / "ffi" / f"attention_cpu-{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    """Compiles the kernel into ``target`` (written under a temporary name, then renamed: concurrent
    builds by several processes each produce a whole file, and the last rename wins)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load() -> str | None:
    """Builds (if needed), loads and registers the kernel once per process; None on success, else why not."""
    if os.environ.get("LORAJAX_FUSED_ATTENTION", "1") == "0":
        return "disabled by LORAJAX_FUSED_ATTENTION=0"
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: use the jnp path, and say why
        return f"{type(e).__name__}: {e}"
    return None


def unavailable_reason() -> str | None:
    """None when the fused kernel is usable in this process, else why it is not (builds it on first call)."""
    return _load()


def available() -> bool:
    """Whether `fused_attention` can run here (builds and registers the kernel on the first call)."""
    return _load() is None


@functools.cache
def warn_unavailable() -> None:
    """One warning per process that ``attention="auto"`` falls back to the blockwise path, and why."""
    warnings.warn(
        f"lorajax: the fused CPU attention kernel is unavailable ({_load()}); using blockwise attention",
        RuntimeWarning,
        stacklevel=3,
    )


def _check(q, k, v, mask):
    if q.ndim < 4 or k.ndim != q.ndim - 1 or v.shape != k.shape or mask.ndim != q.ndim - 2:
        raise ValueError(
            f"fused_attention wants q [..., S, K, G, d], k/v [..., S, K, d], mask [..., S, S]; got q {q.shape}, "
            f"k {k.shape}, v {v.shape}, mask {mask.shape}"
        )
    S, K, _, d = q.shape[-4:]
    lead_ok = all(m in (1, n) for m, n in zip(mask.shape[:-2], q.shape[:-4]))  # a mask may broadcast over batch
    if k.shape[-3:] != (S, K, d) or mask.shape[-2:] != (S, S) or k.shape[:-3] != q.shape[:-4] or not lead_ok:
        raise ValueError(
            f"fused_attention is self-attention without a cache: q {q.shape}, k {k.shape}, mask {mask.shape} "
            "do not agree"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype != jnp.float32:
            raise TypeError(f"fused_attention computes in float32; {name} is {x.dtype} (use attention='blockwise')")
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the fused CPU attention kernel is unavailable: {reason}")


SECOND_ORDER = (
    "the fused CPU attention kernel has first-order gradients only (its backward is one custom call); for "
    "second derivatives (grad of grad, Hessian-vector products, meta-gradients through inner gradient steps) "
    "build the model with attention='blockwise' or 'dense'"
)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _forward(q, k, v, mask, causal, window):
    lead = q.shape[:-4]
    S, K, G, _ = q.shape[-4:]
    call = jax.ffi.ffi_call(
        "lorajax_attention_fwd",
        (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((*lead, K, G, S), jnp.float32)),
        vmap_method="broadcast_all",
    )
    return call(q, k, v, mask.astype(jnp.bool_), causal=causal, window=window)


@_forward.defjvp
def _forward_jvp(causal, window, primals, tangents):
    raise NotImplementedError(SECOND_ORDER)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, causal, window):
    return _forward(q, k, v, mask, causal, window)[0]


def _attention_fwd(q, k, v, mask, causal, window):
    o, lse = _forward(q, k, v, mask, causal, window)
    return o, (q, k, v, mask, o, lse)


@functools.partial(jax.custom_jvp, nondiff_argnums=(7, 8))
def _backward(q, k, v, mask, o, lse, do, causal, window):
    call = jax.ffi.ffi_call(
        "lorajax_attention_bwd",
        (
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct(k.shape, jnp.float32),
            jax.ShapeDtypeStruct(v.shape, jnp.float32),
        ),
        vmap_method="broadcast_all",
    )
    return call(q, k, v, mask, o, lse, do, causal=causal, window=window)


@_backward.defjvp
def _backward_jvp(causal, window, primals, tangents):
    raise NotImplementedError(SECOND_ORDER)


def _attention_bwd(causal, window, res, do):
    q, k, v, mask, o, lse = res
    dq, dk, dv = _backward(q, k, v, mask, o, lse, do.astype(jnp.float32), causal, window)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def fused_attention(q_BxSxKxGxd, k_BxSxKxd, v_BxSxKxd, mask_BxSxS, *, causal: bool = True, window: int | None = None):
    """Self-attention (no cache) through the fused CPU kernel -> ``o [B, S, K, G, d]`` float32.

    ``mask [B, S, S]`` (or ``[1, S, S]``, broadcast over the batch) holds the whole mask (causal, window
    and padding: True = visible); ``causal=True`` promises it is causal so the kernel skips key blocks
    past each query block (``window``: a sliding window, which also skips the blocks before it; needs
    ``causal=True``). Equal to `dense_attention` on every row with a visible key (float32 rounding).
    Raises ValueError on shapes that do not agree, TypeError on a non-float32 input, RuntimeError when
    the kernel is unavailable (`unavailable_reason`).
    """
    if window is not None and (not causal or window < 1):
        raise ValueError(f"window={window} needs causal=True and window >= 1")
    _check(q_BxSxKxGxd, k_BxSxKxd, v_BxSxKxd, mask_BxSxS)
    mask_BxSxS = jnp.broadcast_to(mask_BxSxS, (*q_BxSxKxGxd.shape[:-4], *mask_BxSxS.shape[-2:]))
    return _attention(q_BxSxKxGxd, k_BxSxKxd, v_BxSxKxd, mask_BxSxS, int(causal), int(window or 0))
