"""PERK (`lorajax.perk`): meta-gradient vs finite differences, the first-order formula, truncation, remat, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import perk
from lorajax.models import llama
from lorajax.train.losses import cross_entropy

T = 3  # inner steps


def mlp_problem(dtype):
    """A 2-layer tanh MLP in plain jnp with LoRA on both layers (``x (W + A B)``: cheap to compile; the
    Llama test goes through `lorajax.adapt`); per-step context batches ``[T, 4, 6]`` and a query batch."""
    rng = np.random.default_rng(0)  # numpy draws: no per-shape compiles
    r = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    w1, w2 = r(6, 8), r(8, 3)
    adapters = {
        "l1": {"lora_A": 0.5 * r(6, 2), "lora_B": 0.5 * r(2, 8)},
        "l2": {"lora_A": 0.5 * r(8, 2), "lora_B": 0.5 * r(2, 3)},
    }

    def loss(a, b):
        h = jnp.tanh(b["x"] @ (w1 + a["l1"]["lora_A"] @ a["l1"]["lora_B"]))
        return jnp.mean((h @ (w2 + a["l2"]["lora_A"] @ a["l2"]["lora_B"]) - b["y"]) ** 2)

    batches = {"x": r(T, 4, 6), "y": r(T, 4, 3)}
    query = {"x": r(5, 6), "y": r(5, 3)}
    return loss, adapters, batches, query


@pytest.fixture(scope="module")
def mlp32():
    return mlp_problem(jnp.float32)


def test_meta_gradient_equals_central_finite_differences():
    """Full second-order meta-gradient (Adam inner steps, per-leaf rates) vs central differences, float64."""
    with jax.enable_x64(True):
        loss, adapters, batches, query = mlp_problem(jnp.float64)
        meta = perk.init_meta(adapters, T, lr=0.05, per_leaf=True)
        meta["log_lr"] = jax.tree.map(lambda x: x.astype(jnp.float64), meta["log_lr"])
        leaves, tree = jax.tree.flatten(meta)
        rng = np.random.default_rng(9)
        noise = lambda: [jnp.asarray(rng.standard_normal(x.shape)) for x in leaves]  # noqa: E731
        meta = jax.tree.unflatten(tree, [x + 0.1 * e for x, e in zip(leaves, noise())])
        h = 1e-5
        dirs = [jax.tree.unflatten(tree, noise()) for _ in range(2)]  # random directions over init and log_lr

        @jax.jit
        def check(meta, dirs):  # (analytic, central-difference) directional derivatives
            f = lambda m: perk.meta_loss(loss, loss, m, batches, query)[0]  # noqa: E731
            g, _ = perk.meta_grad(loss, loss, meta, batches, query)
            out = []
            for d in dirs:
                shift = lambda s: jax.tree.map(lambda m, v: m + s * h * v, meta, d)  # noqa: E731
                an = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
                out.append((an, (f(shift(1.0)) - f(shift(-1.0))) / (2 * h)))
            return out

        for an, fd in check(meta, dirs):
            np.testing.assert_allclose(float(an), float(fd), rtol=1e-6, atol=1e-9)


def test_first_order_formula_truncation_and_remat(mlp32):
    """SGD inner steps. first_order: ∂L/∂φ₀ = ∇ℓ_Q(φ_T) and ∂L/∂log_lr_t = −lr_t ⟨g_t, ∇ℓ_Q(φ_T)⟩ (the inner
    loop written out by hand); unroll_last=1 is neither the full nor the first-order gradient; remat (of both
    scans) gives the same gradient."""
    loss, adapters, batches, query = mlp32
    meta = perk.init_meta(adapters, T, lr=0.2)
    meta["log_lr"] = meta["log_lr"] + jnp.array([0.0, -0.5, 0.3])
    flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])  # noqa: E731
    kws = [{}, {"first_order": True}, {"unroll_last": 1}, {"unroll_last": 1, "remat": True}]

    @jax.jit
    def run(meta):
        grads = [perk.meta_grad(loss, loss, meta, batches, query, tx=optax.identity(), **kw) for kw in kws]
        phi, gs, lrs = meta["init"], [], jnp.exp(meta["log_lr"])  # by hand, gradients taken at each φ_t
        for t in range(T):
            gs.append(jax.grad(loss)(phi, jax.tree.map(lambda x: x[t], batches)))
            phi = jax.tree.map(lambda p, q: p - lrs[t] * q, phi, gs[t])
        g_out = jax.grad(loss)(phi, query)
        dots = [sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(gs[t]), jax.tree.leaves(g_out))) for t in range(T)]
        return grads, (g_out, -lrs * jnp.stack(dots), loss(phi, query))

    grads, (g_out, want_lr, want_loss) = run(meta)
    (g, aux) = grads[1]
    np.testing.assert_allclose(flat(g["init"]), flat(g_out), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g["log_lr"], want_lr, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux["outer_loss"], want_loss, rtol=1e-6)
    full, first, mid, mid_remat = (flat(gr[0]) for gr in grads)
    assert float(jnp.max(jnp.abs(full - first))) > 1e-4  # the second-order terms matter here
    assert float(jnp.max(jnp.abs(mid - full))) > 1e-6 and float(jnp.max(jnp.abs(mid - first))) > 1e-6
    np.testing.assert_allclose(mid_remat, mid, rtol=1e-5, atol=1e-8)


def test_batched_meta_step_averages_task_gradients(mlp32):
    """make_meta_step(batched=True) with outer SGD(lr=1): meta − mean over tasks of each task's meta-gradient."""
    loss, adapters, batches, query = mlp32
    meta = perk.init_meta(adapters, T, lr=0.05)
    tasks_b = jax.tree.map(lambda x: jnp.stack([x, -x]), batches)
    tasks_q = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), query)
    tx = optax.sgd(1.0)
    step = perk.make_meta_step(loss, loss, tx, batched=True, first_order=True)
    new, _, metrics = step(meta, tx.init(meta), tasks_b, tasks_q)
    one = jax.jit(lambda b, q: perk.meta_grad(loss, loss, meta, b, q, first_order=True)[0])
    gs = [one(jax.tree.map(lambda x: x[i], tasks_b), jax.tree.map(lambda x: x[i], tasks_q)) for i in range(2)]
    want = jax.tree.map(lambda m, a, b: m - (a + b) / 2, meta, *gs)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert metrics["inner_losses"].shape == (T,)


CFG = llama.Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


@pytest.mark.slow  # ~7 s: one compile of a second-order Llama step (make test-all)
def test_llama_next_token_loss_and_second_order_meta_gradient():
    """Tiny Llama through lorajax.adapt: the weighted next-token loss by its definition; one SGD inner step,
    remat: ∂L/∂φ₀ = ∇ℓ_Q(φ₁) − lr·H_ℓ(φ₀)∇ℓ_Q(φ₁) (forward-over-reverse Hessian-vector product) and
    ∂L/∂log_lr = −lr ⟨∇ℓ(φ₀), ∇ℓ_Q(φ₁)⟩."""
    model = llama.LlamaForCausalLM(CFG, attention="dense")
    params = jax.jit(model.init)(jax.random.key(0), *llama.example_inputs(CFG))
    spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["q_proj", "v_proj"], init_weights=False)
    adapters = jax.jit(lambda p, k: lorajax.init(spec, p, k))(params, jax.random.key(1))
    fwd = lorajax.adapt(model.apply, spec)
    loss = perk.next_token_loss(fwd, params)
    ctx = perk.chunk_context(jax.random.randint(jax.random.key(2), (16,), 0, 16), 8)  # [2 chunks, 8]
    ids = jax.random.randint(jax.random.key(3), (2, 4), 0, 16)
    w = jnp.zeros((2, 3)).at[:, -1].set(1.0)  # only the last token counts (an "answer")
    query = {"input_ids": ids, "weights": w}
    meta = perk.init_meta(adapters, 1, lr=0.5)
    batches = perk.repeat_steps({"input_ids": ctx}, 1)

    @jax.jit
    def both(meta):
        g, _ = perk.meta_grad(loss, loss, meta, batches, query, tx=optax.identity(), remat=True)
        lr, phi0, c = jnp.exp(meta["log_lr"][0]), meta["init"], {"input_ids": ctx}
        g0 = jax.grad(loss)(phi0, c)
        phi1 = jax.tree.map(lambda p, q: p - lr * q, phi0, g0)
        gq = jax.grad(loss)(phi1, query)
        hv = jax.jvp(lambda p: jax.grad(loss)(p, c), (phi0,), (gq,))[1]
        want = jax.tree.map(lambda a, b: a - lr * b, gq, hv)
        dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(gq)))
        logits = fwd(params, phi0, ids)
        return g, want, -lr * dot, loss(phi0, query), jnp.mean(cross_entropy(logits[:, 2], ids[:, 3]))

    g, want, want_lr, got_loss, want_loss = both(meta)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g["init"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(g["log_lr"][0], want_lr, rtol=1e-4)
    assert float(jnp.abs(want_lr)) > 0


def test_bad_inputs_raise(mlp32):
    loss, adapters, batches, query = mlp32
    meta = perk.init_meta(adapters, T)
    with pytest.raises(ValueError, match=r"log_lr.*shape \(2,\).*T = 3"):
        perk.inner_loop(loss, perk.init_meta(adapters, 2), batches)
    with pytest.raises(ValueError, match=r"log_lr'\]\[.*lora_A'\] has shape"):
        per_leaf = perk.init_meta(adapters, T, per_leaf=True)
        per_leaf["log_lr"] = jax.tree.map(lambda x: x[:2], per_leaf["log_lr"])
        perk.inner_loop(loss, per_leaf, batches)
    with pytest.raises(ValueError, match="same leading inner-step axis"):
        perk.inner_loop(loss, meta, {"x": batches["x"], "y": batches["y"][:2]})
    with pytest.raises(ValueError, match=r"unroll_last must be an int in \[0, T=3\]"):
        perk.inner_loop(loss, meta, batches, unroll_last=4)
    with pytest.raises(ValueError, match="not both"):
        perk.inner_loop(loss, meta, batches, first_order=True, unroll_last=1)
    with pytest.raises(ValueError, match="meta must be"):
        perk.inner_loop(loss, {"init": adapters}, batches)
    with pytest.raises(TypeError, match="optax GradientTransformation"):
        perk.inner_loop(loss, meta, batches, tx=optax.sgd)
    with pytest.raises(TypeError, match="outer_tx must be an optax GradientTransformation"):
        perk.make_meta_step(loss, loss, optax.adam)
    with pytest.raises(ValueError, match="inner loss must return a scalar"):
        perk.inner_loop(lambda a, b: jnp.ones(2) * loss(a, b), meta, batches)
    with pytest.raises(ValueError, match="chunk_len=5"):
        perk.chunk_context(jnp.arange(16), 5)
    with pytest.raises(ValueError, match="steps must be"):
        perk.init_meta(adapters, 0)
    with pytest.raises(ValueError, match="empty tree"):
        perk.init_meta({}, 2)
