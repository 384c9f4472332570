"""GaLore against the official implementation (PyPI ``galore-torch`` 1.0, ``GaLoreAdamW``).

Protocol: the same parameters (float32) and the same sequence of gradients
are fed to ``galore_torch.GaLoreAdamW`` (``p.grad = g; opt.step()``) and to
``lorajax.optim.galore`` (``tx.update(g, ...)``); the parameters are compared
after every step at rtol 1e-5. The tree has a tall (24x10), a wide (10x24) and
a square (12x12) GaLore kernel, plus an untargeted 2-D kernel and a 1-D scale
(plain AdamW on both sides); rank 4, ``update_proj_gap`` 3 (refreshes at steps
0, 3, 6), scale 0.25, 7 steps.

What is matched, and how (see `lorajax.optim.galore`'s docstring):

* Side: optax puts the projector on the larger side of the ``a×b`` view,
  which is the official ``proj_type="reverse_std"``, not its default
  ``"std"``. The torch parameter is the same ``a×b`` array as lorajax's
  kernel (no transpose: the optimiser only sees a matrix). ``"std"`` is a
  different algorithm with Adam (the moments live in another basis); what
  both share — the rank-r projection of the gradient at a refresh — is
  tested with the official ``GaLoreProjector`` directly.
* ε: optax adds ε to the bias-corrected ``√v̂``, the official code to ``√v``;
  both sides use ε = 0 (the formulas are then identical).
* Weight decay: the official code decays after the step; a one-step test
  checks the exact ``η²λU`` relation.
* SVD signs: torch's LAPACK and XLA choose different signs for some shapes;
  since moments survive a refresh, the trajectory after the second refresh
  depends on them. The trajectory test gives the official code XLA's signs by
  wrapping ``torch.linalg.svd`` (torch's vectors, flipped per pair to agree
  with ``jnp.linalg.svd``); a separate test shows the first projector period
  needs no such help and that a flipped sign changes the trajectory.
* Conditioning: gradients at refresh steps have a geometric spectrum
  (σ_i = 2·0.7^i) so that two correct float32 SVDs agree to ~1e-6; with
  Gaussian gradients near-equal singular values move the singular vectors by
  ~5e-5 in either library.

``galore_torch/__init__.py`` imports bitsandbytes (for the 8-bit optimiser);
the modules needed here (``adamw.py``, ``galore_projector.py``) are loaded
under a private package name instead, so bitsandbytes is not needed.

8-bit (``GaLoreAdamW8bit``, ``adamw8bit.py``; needs bitsandbytes, reference
0.50.2 on CPU) against ``galore(..., optim_bits=8)``: tall 300×270 and wide
270×300 kernels (projected moments 16×270 = 4320 elements: 8-bit, a partial
last block), a 40×20 one (16×20: bnb's 32-bit fallback), an untargeted 70×100
kernel (8-bit) and a 1-D scale; rank 16, gap 3, 7 steps. bnb's ε sits where
optax's does, so no ε adjustment. To run on CPU torch: ``torch.cuda.synchronize``
(called by the official ``step``) is made a no-op; bnb's CPU optimiser
re-quantises through its exact ``default`` kernel instead of its 65536-bin
lookup table (see tests/optim/test_adam8bit.py); the official code is given
XLA's whole SVD (with r = 16 on Gaussian gradients two float32 SVDs differ by
~1e-5, enough to move a few 8-bit codes). And the constructor needs
``percentile_clipping=0, block_wise=False``: bitsandbytes 0.50 removed those two
parameters from ``Optimizer2State`` (commit c27dc581, PR #1871), so galore-torch
1.0 passes them positionally into ``max_unorm`` and ``skip_zeros``; with its
defaults (100, True) every tensor on bnb's 32-bit path gets update-norm
clipping against the norm of a parameter GaLore has zeroed, i.e. *no update*
(shown by a test). The 0/False values restore the meaning they had (no
clipping, no zero skipping).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")  # galore_torch/adamw.py imports transformers.utils.versions

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lorajax  # noqa: E402
from lorajax.optim.adam8bit import QuantizedMoment  # noqa: E402
from lorajax.optim.galore import galore_state_formula  # noqa: E402

SHAPES = {"tall": (24, 10), "wide": (10, 24), "sq": (12, 12), "head": (10, 7)}
GALORE = ["tall", "wide", "sq"]
RANK, GAP, LR, SCALE, STEPS = 4, 3, 1e-2, 0.25, 7


def _official():
    spec = importlib.util.find_spec("galore_torch")
    if spec is None:
        pytest.skip("galore-torch is not installed (pip install galore-torch==1.0 --no-deps)")
    name = "_galore_torch_official"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.adamw"), importlib.import_module(f"{name}.galore_projector")


def _leaf(node):
    return node["kernel"] if "kernel" in node else node["scale"]


def _spectrum_gradient(rng, shape):
    """``Q₁ diag(2·0.7^i) Q₂ᵀ``: well-separated singular values."""
    k = min(shape)
    q1 = np.linalg.qr(rng.standard_normal((shape[0], k)))[0]
    q2 = np.linalg.qr(rng.standard_normal((shape[1], k)))[0]
    return ((q1 * (2.0 * 0.7 ** np.arange(k))) @ q2.T).astype(np.float32)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {k: {"kernel": rng.standard_normal(s).astype(np.float32)} for k, s in SHAPES.items()}
    params["norm"] = {"scale": (1.0 + 0.1 * rng.standard_normal(10)).astype(np.float32)}
    grads = []
    for step in range(STEPS):
        g = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
        if step % GAP == 0:
            for k in GALORE:
                g[k]["kernel"] = _spectrum_gradient(rng, SHAPES[k])
        grads.append(g)
    return params, grads


def run_lorajax(params, grads, *, weight_decay=0.0, steps=STEPS):
    tx = lorajax.optim.galore(LR, targets=GALORE, rank=RANK, update_proj_gap=GAP, scale=SCALE, eps=0.0,
                              weight_decay=weight_decay, params=params)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    out = []
    for g in grads[:steps]:
        u, state = update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, u)
        out.append({k: np.asarray(_leaf(v)) for k, v in p.items()})
    return out


def run_official(params, grads, *, proj_type="reverse_std", weight_decay=0.0, steps=STEPS):
    adamw, _ = _official()
    tp = {k: torch.nn.Parameter(torch.tensor(_leaf(v))) for k, v in params.items()}
    groups = [{"params": [tp[k] for k in tp if k not in GALORE]},
              {"params": [tp[k] for k in GALORE], "rank": RANK, "update_proj_gap": GAP, "scale": SCALE,
               "proj_type": proj_type}]
    opt = adamw.AdamW(groups, lr=LR, eps=0.0, weight_decay=weight_decay, no_deprecation_warning=True)
    out = []
    for g in grads[:steps]:
        for k, p in tp.items():
            p.grad = torch.tensor(_leaf(g[k]))
        opt.step()
        out.append({k: p.detach().numpy().copy() for k, p in tp.items()})
    return out, opt, tp


def _xla_signs(flip_at=None):
    """``torch.linalg.svd`` with each singular pair's sign chosen as ``jnp.linalg.svd`` chooses it.

    ``flip_at``: the index of the SVD call (counting from 0) at which the
    first pair's sign is flipped instead, to show that the sign matters.
    """
    orig = torch.linalg.svd
    calls = [0]

    def svd(a, full_matrices=True, **kw):
        u, s, vh = orig(a, full_matrices=full_matrices, **kw)
        uj = np.asarray(jnp.linalg.svd(jnp.asarray(a.detach().numpy()), full_matrices=False)[0])
        k = min(u.shape[1], uj.shape[1])
        sign = np.sign(np.sum(u.numpy()[:, :k] * uj[:, :k], axis=0))
        if flip_at is not None and calls[0] == flip_at:
            sign[0] = -sign[0]
        calls[0] += 1
        sign_t = torch.tensor(sign, dtype=u.dtype)
        return u[:, :k] * sign_t, s, vh[:k] * sign_t[:, None]

    return svd


def assert_step_close(a, b, step, rtol=1e-5, atol=1e-6):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{k} after step {step}")


def test_trajectory_with_refreshes(problem, monkeypatch):
    """7 steps, refreshes at 0, 3, 6: every parameter equal after every step (official given XLA's SVD signs)."""
    params, grads = problem
    ours = run_lorajax(params, grads)
    monkeypatch.setattr(torch.linalg, "svd", _xla_signs())
    theirs, opt, tp = run_official(params, grads)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert_step_close(a, b, step)
    # state shapes agree too: reverse_std == optax's side choice
    state = lorajax.optim.galore(LR, targets=GALORE, rank=RANK).init(jax.tree.map(jnp.asarray, params))[0]
    for k in GALORE:
        assert tuple(opt.state[tp[k]]["exp_avg"].shape) == state.base_optimizer_state.mu[k]["kernel"].shape
        ortho = opt.state[tp[k]]["projector"].ortho_matrix
        proj = state.projector[k]["kernel"]
        assert ortho.numel() == proj.size  # (a, r) both for tall/square; (r, b) vs (b, r) for wide


def test_first_period_needs_no_sign_fix(problem):
    """Before the second refresh one projector serves every step: no sign fix is needed.

    Flipping a singular pair's sign flips that row of R and of M, not of V: the update is unchanged.
    """
    params, grads = problem
    ours = run_lorajax(params, grads, steps=GAP)
    theirs, _, _ = run_official(params, grads, steps=GAP)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert_step_close(a, b, step)


def test_sign_flip_at_refresh_changes_trajectory(problem, monkeypatch):
    """A flipped sign at the second refresh (SVD call 3 = tall's) leaves steps 0..2 equal and changes tall after."""
    params, grads = problem
    ours = run_lorajax(params, grads, steps=GAP + 1)
    monkeypatch.setattr(torch.linalg, "svd", _xla_signs(flip_at=len(GALORE)))
    theirs, _, _ = run_official(params, grads, steps=GAP + 1)
    for step in range(GAP):
        assert_step_close(ours[step], theirs[step], step)
    assert not np.allclose(ours[GAP]["tall"], theirs[GAP]["tall"], rtol=1e-3)
    others = ("wide", "sq", "head", "norm")
    assert_step_close({k: ours[GAP][k] for k in others}, {k: theirs[GAP][k] for k in others}, GAP)


def test_weight_decay_order(problem, monkeypatch):
    """Official: W ← (W − ηU)(1 − ηλ); optax: W ← W − ηU − ηλW.

    One step: official = ours + ηλ·(ηU).
    """
    params, grads = problem
    wd = 0.1
    ours = run_lorajax(params, grads, weight_decay=wd, steps=1)[0]
    plain = run_lorajax(params, grads, steps=1)[0]
    theirs = run_official(params, grads, weight_decay=wd, steps=1)[0][0]
    for k in ours:
        lr_u = _leaf(params[k]) - plain[k]  # ηU
        np.testing.assert_allclose(theirs[k], ours[k] + LR * wd * lr_u, rtol=1e-5, atol=1e-7, err_msg=k)
        assert not np.allclose(theirs[k], ours[k], rtol=1e-7, atol=0)


@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (12, 12)])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_refresh_projection_is_trunc_r(shape, proj_type):
    """At a refresh both sides' project → project_back is trunc_r(G) (official std and reverse_std alike).

    lorajax: ``galore`` with an identity base optimiser, T = 1, scale 1, lr 1
    gives ``−trunc_r(G)`` at every step. This is the only part of the
    official default ``std`` that optax's side choice can match with Adam.
    """
    _, proj_mod = _official()
    rng = np.random.default_rng(1)
    g = _spectrum_gradient(rng, shape)
    u, s, vh = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    trunc = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
    proj = proj_mod.GaLoreProjector(RANK, update_proj_gap=1, scale=1.0, proj_type=proj_type)
    back = proj.project_back(proj.project(torch.tensor(g), 0)).numpy()
    np.testing.assert_allclose(back, trunc, rtol=1e-5, atol=1e-6)
    params = {"w": {"kernel": jnp.zeros(shape)}}
    tx = lorajax.optim.galore(1.0, targets=["w"], rank=RANK, update_proj_gap=1, base_optimizer=optax.identity())
    upd, _ = tx.update({"w": {"kernel": jnp.asarray(g)}}, tx.init(params), params)
    np.testing.assert_allclose(-np.asarray(upd["w"]["kernel"]), trunc, rtol=1e-5, atol=1e-6)


def test_official_std_uses_other_side_and_more_state(problem):
    """Official default "std": moments on the larger side; its state size is the formula's ``side="official-std"``."""
    params, grads = problem
    _, opt, tp = run_official(params, grads, proj_type="std", steps=1)
    n = 0
    for k in GALORE:
        st = opt.state[tp[k]]
        a, b = SHAPES[k]
        assert tuple(st["exp_avg"].shape) == ((a, RANK) if a >= b else (RANK, b))
        n += 4 * (st["exp_avg"].numel() + st["exp_avg_sq"].numel() + st["projector"].ortho_matrix.numel())
    for k in ("head", "norm"):
        n += 4 * (opt.state[tp[k]]["exp_avg"].numel() + opt.state[tp[k]]["exp_avg_sq"].numel())
    jparams = jax.tree.map(jnp.asarray, params)
    official = galore_state_formula(jparams, GALORE, rank=RANK, side="official-std")
    assert official.total == n
    ours = galore_state_formula(jparams, GALORE, rank=RANK)
    assert ours.total - ours.scalars < n  # optax's side is smaller


# --- 8-bit: GaLoreAdamW8bit (bitsandbytes) ------------------------------------------------------------------------

SHAPES8 = {"tall": (300, 270), "wide": (270, 300), "small": (40, 20), "head": (70, 100)}
GALORE8, RANK8 = ["tall", "wide", "small"], 16


def _official_8bit(monkeypatch):
    pytest.importorskip("bitsandbytes")
    cpu_ops = pytest.importorskip("bitsandbytes.backends.cpu.ops")
    _official()
    adamw8bit = importlib.import_module("_galore_torch_official.adamw8bit")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    # bnb's exact (device-independent "default" backend) quantiser, as lorajax's
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

    def exact(a, code, absmax_out, out_uint8, block_size):
        q, absmax = op.redispatch(keys, a, code, block_size)
        out_uint8.copy_(q)
        absmax_out.copy_(absmax)

    if not hasattr(cpu_ops, "_quant_blockwise_fp32_direct"):
        pytest.skip("bitsandbytes' CPU optimiser has no _quant_blockwise_fp32_direct hook in this version")
    monkeypatch.setattr(cpu_ops, "_quant_blockwise_fp32_direct", exact)

    def xla_svd(a, full_matrices=True, **kw):
        u, sv, vh = jnp.linalg.svd(jnp.asarray(a.detach().numpy()), full_matrices=False)
        return tuple(torch.tensor(np.asarray(x)) for x in (u, sv, vh))

    monkeypatch.setattr(torch.linalg, "svd", xla_svd)
    return adamw8bit


@pytest.fixture(scope="module")
def problem8():
    rng = np.random.default_rng(2)
    params = {k: {"kernel": rng.standard_normal(s).astype(np.float32)} for k, s in SHAPES8.items()}
    params["norm"] = {"scale": (1.0 + 0.1 * rng.standard_normal(10)).astype(np.float32)}
    grads = [jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params) for _ in range(STEPS)]
    return params, grads


def run_official_8bit(adamw8bit, params, grads, *, restore_args=True):
    tp = {k: torch.nn.Parameter(torch.tensor(_leaf(v))) for k, v in params.items()}
    groups = [{"params": [tp[k] for k in tp if k not in GALORE8]},
              {"params": [tp[k] for k in GALORE8], "rank": RANK8, "update_proj_gap": GAP, "scale": SCALE,
               "proj_type": "reverse_std"}]
    kw = dict(percentile_clipping=0.0, block_wise=False) if restore_args else {}
    opt = adamw8bit.AdamW8bit(groups, lr=LR, weight_decay=0.0, **kw)
    out = []
    for g in grads:
        for k, p in tp.items():
            p.grad = torch.tensor(_leaf(g[k]))
        opt.step()
        out.append({k: p.detach().numpy().copy() for k, p in tp.items()})
    return out, opt, tp


def run_lorajax_8bit(params, grads):
    tx = lorajax.optim.galore(LR, targets=GALORE8, rank=RANK8, update_proj_gap=GAP, scale=SCALE, optim_bits=8,
                              params=params)
    p = jax.tree.map(jnp.asarray, params)
    state, update, out = tx.init(p), jax.jit(tx.update), []
    for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, u)
        out.append({k: np.asarray(_leaf(v)) for k, v in p.items()})
    return out, state[0].base_optimizer_state.inner_state


def test_8bit_trajectory(problem8, monkeypatch):
    """7 steps with refreshes at 0, 3, 6: every parameter equal after every step; the same tensors are 8-bit."""
    adamw8bit = _official_8bit(monkeypatch)
    params, grads = problem8
    ours, base = run_lorajax_8bit(params, grads)
    theirs, opt, tp = run_official_8bit(adamw8bit, params, grads)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert_step_close(a, b, step)
    for k in tp:
        st, mu = opt.state[tp[k]], base.mu[k]["kernel" if k in SHAPES8 else "scale"]
        eight = isinstance(mu, QuantizedMoment)
        assert (st["state1"].dtype == torch.uint8) == eight == (k in ("tall", "wide", "head")), k
        codes = np.asarray(mu.codes if eight else mu)
        assert codes.shape == tuple(st["state1"].shape), k
        if eight:  # the 8-bit codes themselves agree (float32 matmul rounding may move a rare one)
            assert np.mean(codes == st["state1"].numpy()) > 0.999, k
            np.testing.assert_allclose(np.asarray(mu.absmax), st["absmax1"].numpy(), rtol=1e-5, err_msg=k)


def test_8bit_state_bytes_equal_official(problem8, monkeypatch):
    """bnb's state (codes, absmax, 32-bit fallbacks) + the projectors = ``galore_state_formula(optim_bits=8)``."""
    adamw8bit = _official_8bit(monkeypatch)
    params, grads = problem8
    _, opt, tp = run_official_8bit(adamw8bit, params, grads[:1])
    n = 0
    for k in tp:
        st = opt.state[tp[k]]
        n += sum(st[s].numel() * st[s].element_size() for s in ("state1", "state2", "absmax1", "absmax2") if s in st)
        if "projector" in st:
            n += 4 * st["projector"].ortho_matrix.numel()
    f = galore_state_formula(jax.tree.map(jnp.asarray, params), GALORE8, rank=RANK8, optim_bits=8)
    assert f.total - f.scalars == n


def test_8bit_default_args_freeze_small_galore_weights(problem8, monkeypatch):
    """galore-torch 1.0's defaults on bitsandbytes ≥ 0.50: a GaLore weight on bnb's 32-bit path never moves."""
    import inspect

    adamw8bit = _official_8bit(monkeypatch)
    if "percentile_clipping" in inspect.signature(adamw8bit.Optimizer2State.__init__).parameters:
        pytest.skip("this bitsandbytes still takes percentile_clipping/block_wise: the arguments line up")
    params, grads = problem8
    theirs, _, _ = run_official_8bit(adamw8bit, params, grads[:3], restore_args=False)
    np.testing.assert_array_equal(theirs[-1]["small"], _leaf(params["small"]))
    assert not np.allclose(theirs[-1]["tall"], _leaf(params["tall"]))
