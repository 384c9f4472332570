"""LoRA on embeddings and convolutions (`lorajax.layer_kinds`) against Hugging Face PEFT.

One tiny torch network (``nn.Embedding(32, 8)``, an ``nn.Conv1d`` over the embedded tokens, an
``nn.Conv2d(3, 4, 3, padding=1, stride=2)`` on an image and a ``Linear`` head) and its linen twin with the
same parameter names. PEFT's adapter folder is read with `lorajax.peft.load`; outputs in both modes, merged
weights and gradients equal PEFT's; lorajax's own adapters written with `lorajax.peft.save` load in
``PeftModel.from_pretrained`` with equal outputs. Then the defining equations on random inputs, the
embedding's adapter gradient without a ``[vocab, d]`` array, PEFT's init, and the errors.
"""

import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import flax.linen as fnn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _torch_models import assert_close, get_leaf_dict, to_np  # noqa: E402
from torch import nn  # noqa: E402

import lorajax  # noqa: E402
from lorajax import layer_kinds, registry  # noqa: E402

VOCAB, D, C1, C_IMG, C2, OUT = 32, 8, 6, 3, 4, 5
L, H = 7, 6  # tokens, image side
TARGETS = ["embed", "conv1", "conv2", "proj"]
MODES = ("merged", "factored")


class TorchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.conv1 = nn.Conv1d(D, C1, 3, padding=1)
        self.conv2 = nn.Conv2d(C_IMG, C2, 3, padding=1, stride=2)
        self.proj = nn.Linear(C1 + C2, OUT)

    def forward(self, ids, img):
        c1 = self.conv1(self.embed(ids).transpose(1, 2))  # [B, C1, L]
        c2 = self.conv2(img)  # [B, C2, H/2, H/2]
        head = self.proj(torch.cat([c1.mean(-1), c2.mean((-2, -1))], 1))
        return torch.cat([c1.flatten(1), c2.flatten(1), head], 1)


class FlaxNet(fnn.Module):
    @fnn.compact
    def __call__(self, ids, img):  # img: NHWC
        c1 = fnn.Conv(C1, (3,), padding=1, name="conv1")(fnn.Embed(VOCAB, D, name="embed")(ids))  # [B, L, C1]
        c2 = fnn.Conv(C2, (3, 3), padding=1, strides=2, name="conv2")(img)  # [B, H/2, H/2, C2]
        head = fnn.Dense(OUT, name="proj")(jnp.concatenate([c1.mean(1), c2.mean((1, 2))], 1))
        b = ids.shape[0]
        flat1 = jnp.transpose(c1, (0, 2, 1)).reshape(b, -1)  # channels first, as torch flattens
        flat2 = jnp.transpose(c2, (0, 3, 1, 2)).reshape(b, -1)
        return jnp.concatenate([flat1, flat2, head], 1)


def torch_variables(net: TorchNet) -> dict:
    """The linen twin's params: torch ``[out, in, *k]`` -> Flax ``[*k, in, out]``."""

    def conv(m):
        w = to_np(m.weight)
        return {"kernel": jnp.asarray(np.moveaxis(w, (0, 1), (-1, -2))), "bias": jnp.asarray(to_np(m.bias))}

    return {
        "params": {
            "embed": {"embedding": jnp.asarray(to_np(net.embed.weight))},
            "conv1": conv(net.conv1),
            "conv2": conv(net.conv2),
            "proj": {"kernel": jnp.asarray(to_np(net.proj.weight).T), "bias": jnp.asarray(to_np(net.proj.bias))},
        }
    }


def make_net(seed=0) -> TorchNet:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    return TorchNet().eval()


def data(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, L)).astype(np.int64)
    img = rng.standard_normal((batch, C_IMG, H, H)).astype(np.float32)
    return ids, img


def torch_out(model, ids, img) -> np.ndarray:
    with torch.no_grad():
        return to_np(model(torch.from_numpy(ids), torch.from_numpy(img)))


def flax_args(ids, img):
    return jnp.asarray(ids, jnp.int32), jnp.asarray(np.transpose(img, (0, 2, 3, 1)))


def conv_axes(variables):
    return layer_kinds.conv_in_axes(FlaxNet().apply, variables, *flax_args(*data()))


def out_and_grads(fwd, variables, adapters, args, g):
    """``fwd``'s output and the adapter gradients of ``sum(out * g)``, in one jitted vjp."""

    @jax.jit
    def run(a):
        out, vjp = jax.vjp(lambda a: fwd(variables, a, *args), a)
        return out, vjp(jnp.asarray(g))[0]

    return run(adapters)


@pytest.fixture(scope="module")
def peft_case(tmp_path_factory):
    """PEFT model with random non-zero adapters on all four layers, its folder, and the linen twin's variables."""
    net = make_net(0)
    variables = torch_variables(net)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False)
    peft_model = peft.get_peft_model(net, config).eval()
    with torch.no_grad():  # PEFT leaves lora_B random with init_lora_weights=False; make the table's B clearly so
        peft_model.base_model.model.embed.lora_embedding_B["default"].normal_()
    folder = tmp_path_factory.mktemp("peft_embed_conv")
    peft_model.save_pretrained(str(folder))
    return peft_model, variables, folder


def test_peft_folder_loads_with_equal_outputs_and_gradients(peft_case):
    peft_model, variables, folder = peft_case
    spec, adapters = lorajax.peft.load(folder, variables)
    assert sorted(t.name for t in lorajax.select(spec, variables)) == sorted(TARGETS)
    assert dict(spec.in_axes) == {"conv1": 2, "conv2": 3}  # conv kernels viewed as [prod(k)·in, out]
    for name in ("embed", "conv1", "conv2"):  # same factors as PEFT's, in lorajax's layout
        mod = peft_model.base_model.model.get_submodule(name)
        a = get_leaf_dict(adapters, ("params", name, "embedding" if name == "embed" else "kernel"))["lora_A"]
        want = to_np(mod.lora_embedding_A["default"]).T if name == "embed" else None
        if want is None:  # [r, in, *k] -> [*k, in, r] -> [prod(k)·in, r]
            w = to_np(mod.lora_A["default"].weight)
            want = np.moveaxis(w, (0, 1), (-1, -2)).reshape(-1, w.shape[0])
        assert_close(a, want, what=f"{name} lora_A")

    ids, img = data(1)
    want = torch_out(peft_model, ids, img)
    assert np.abs(want - np.asarray(FlaxNet().apply(variables, *flax_args(ids, img)))).max() > 1e-2
    g = np.random.default_rng(3).standard_normal(want.shape).astype(np.float32)
    peft_model.zero_grad()
    (peft_model(torch.from_numpy(ids), torch.from_numpy(img)) * torch.from_numpy(g)).sum().backward()
    for mode in MODES:  # outputs and adapter gradients (one vjp), the gradients compared in PEFT's layout
        fwd = lorajax.adapt(FlaxNet().apply, spec, mode=mode)
        got, grads = out_and_grads(fwd, variables, adapters, flax_args(ids, img), g)
        assert_close(got, want, what=mode)
        for t in lorajax.select(spec, variables):
            mod = peft_model.base_model.model.get_submodule(t.name)
            gt = get_leaf_dict(grads, t.keys)
            if t.name == "embed":
                theirs = (mod.lora_embedding_A["default"].grad, mod.lora_embedding_B["default"].grad)
            else:
                theirs = (mod.lora_A["default"].weight.grad, mod.lora_B["default"].weight.grad)
            if layer_kinds.layer_kind(t) == "linear":
                ours = (gt["lora_A"].T, gt["lora_B"].T)
            else:
                ours = (layer_kinds.to_peft(gt["lora_A"], "a", t), layer_kinds.to_peft(gt["lora_B"], "b", t))
            for side, o, p in zip("AB", ours, theirs):
                assert_close(o, to_np(p), what=f"{mode} d{side} {t.name}")

    merged = lorajax.merge(spec, variables, adapters)
    want_merged = torch_variables(peft.PeftModel.from_pretrained(make_net(0), str(folder)).merge_and_unload())
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(want_merged), strict=True):
        assert_close(a, b, what="merge vs merge_and_unload")


def test_lorajax_adapters_save_to_a_folder_peft_loads(tmp_path):
    variables = torch_variables(make_net(0))
    spec = lorajax.Spec("lora", rank=2, alpha=3, targets=TARGETS, in_axes=conv_axes(variables), init_weights=False)
    adapters = lorajax.init(spec, variables, jax.random.key(7))
    ids, img = data(4)
    ours = jax.jit(lorajax.adapt(FlaxNet().apply, spec, mode="factored"))(variables, adapters, *flax_args(ids, img))
    lorajax.peft.save(tmp_path, spec, adapters, variables)
    loaded = peft.PeftModel.from_pretrained(make_net(0), str(tmp_path)).eval()
    assert sorted(n for n, m in loaded.named_modules() if hasattr(m, "lora_A") and n.count(".") == 2) == sorted(
        f"base_model.model.{n}" for n in TARGETS
    )
    want = torch_out(loaded, ids, img)
    assert np.abs(want - torch_out(make_net(0), ids, img)).max() > 1e-2
    assert_close(ours, want, what="lorajax -> PEFT folder")
    spec2, back = lorajax.peft.load(tmp_path, variables)  # and back, unchanged
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert spec2.in_axes == spec.in_axes


# ----------------------------------------------------------------------------- defining equations


@pytest.fixture(scope="module")
def random_case():
    variables = torch_variables(make_net(1))
    spec = lorajax.Spec("lora", rank=2, alpha=5, targets=TARGETS, in_axes=conv_axes(variables), init_weights=False)
    adapters = lorajax.init(spec, variables, jax.random.key(2))
    return spec, variables, adapters


class TiedLM(fnn.Module):
    """An embedding whose table is also the output head (``attend``)."""

    @fnn.compact
    def __call__(self, ids):
        emb = fnn.Embed(VOCAB, D, name="embed")
        h = emb(ids)
        return h, emb.attend(h)


class Conv(fnn.Module):
    """One conv named ``conv`` with the given settings."""

    features: int = C2
    kernel: tuple = (3, 3)
    kw: tuple = ()

    @fnn.compact
    def __call__(self, x):
        return fnn.Conv(self.features, self.kernel, name="conv", **dict(self.kw))(x)


def test_embedding_and_tied_head_equations(random_case):
    """Both modes: ``W[ids] + s·A[ids] B`` and the tied head ``q W'ᵀ`` with ``W' = W + s·A B``."""
    _, variables, adapters = random_case
    w = variables["params"]["embed"]["embedding"]
    ad = adapters["params"]["embed"]["embedding"]
    a, b, s = ad["lora_A"], ad["lora_B"], 5 / 2
    ids, _ = flax_args(*data(5))
    spec = lorajax.Spec("lora", rank=2, alpha=5, targets=["embed"])
    want_h = w[ids] + s * (a[ids] @ b)
    for mode in MODES:
        h, logits = lorajax.adapt(TiedLM().apply, spec, mode=mode)(
            {"params": {"embed": {"embedding": w}}}, {"params": {"embed": {"embedding": ad}}}, ids
        )
        assert_close(h, want_h, what=f"{mode}: W[ids] + s A[ids] B")
        assert_close(logits, want_h @ (w + s * a @ b).T, what=f"{mode}: attend = q W'^T")


@pytest.mark.parametrize(
    "kernel, kw, pad",
    [
        ((3, 3), (("padding", 1), ("strides", 2)), ((1, 1), (1, 1))),
        ((3, 3), (("padding", "VALID"), ("kernel_dilation", 2)), "VALID"),
        ((3,), (("padding", "CAUSAL"),), ((2, 0),)),
    ],
    ids=["stride2", "dilation2", "causal1d"],
)
def test_conv_equation(kernel, kw, pad):
    """Both modes: ``conv(x, W + s·(A B).reshape(*k, in, out)) + bias`` (lax, written out), and equal gradients."""
    n = len(kernel)
    x = jax.random.normal(jax.random.key(0), (2,) + (7,) * n + (C_IMG,))
    model = Conv(kernel=kernel, kw=kw)
    variables = model.init(jax.random.key(1), x)
    w, bias = variables["params"]["conv"]["kernel"], variables["params"]["conv"]["bias"]
    spec = lorajax.Spec("lora", rank=2, alpha=5, targets=["conv"], in_axes={"conv": n + 1}, init_weights=False)
    adapters = lorajax.init(spec, variables, jax.random.key(2))
    ad = adapters["params"]["conv"]["kernel"]
    w_new = w + 5 / 2 * (ad["lora_A"] @ ad["lora_B"]).reshape(w.shape)
    opts = dict(kw)
    xp = jnp.pad(x, ((0, 0), *pad, (0, 0))) if opts.get("padding") == "CAUSAL" else x
    spatial = "HW"[:n] if n == 2 else "W"
    dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    want = jax.lax.conv_general_dilated(
        xp,
        w_new,
        (opts.get("strides", 1),) * n,
        "VALID" if opts.get("padding") == "CAUSAL" else pad,
        rhs_dilation=(opts.get("kernel_dilation", 1),) * n,
        dimension_numbers=dn,
    )
    want = want + bias.reshape((1,) * (n + 1) + (-1,))
    g = jax.random.normal(jax.random.key(3), want.shape)
    grads = {}
    for mode in MODES:
        out, grads[mode] = out_and_grads(lorajax.adapt(model.apply, spec, mode=mode), variables, adapters, (x,), g)
        assert_close(out, want, what=f"{mode} conv(x, W')")
    for g_m, g_f in zip(jax.tree_util.tree_leaves(grads["merged"]), jax.tree_util.tree_leaves(grads["factored"])):
        assert_close(g_f, g_m, tol=1e-4, what="factored vs merged gradient")


def test_embedding_gradient_has_no_vocab_by_d_array(random_case):
    """The factored adapter gradient of a table forms no ``[V, d]`` array (A's is ``[V, r]``); merged mode does."""
    _, variables, adapters = random_case
    table = {"params": {"embed": {"embedding": variables["params"]["embed"]["embedding"]}}}
    ad = {"params": {"embed": {"embedding": adapters["params"]["embed"]["embedding"]}}}
    spec = lorajax.Spec("lora", rank=2, alpha=5, targets=["embed"])
    ids = jnp.asarray(data(6)[0], jnp.int32)
    shape = f"[{VOCAB},{D}]"
    found = {}
    for mode in MODES:
        fwd = lorajax.adapt(TiedLM().apply, spec, mode=mode)

        def loss(a):
            return jnp.sum(jnp.tanh(fwd(table, a, ids)[0]))

        text = jax.jit(jax.grad(loss)).lower(ad).compile().as_text()
        lines = [ln for ln in text.splitlines() if "=" in ln and "parameter(" not in ln]
        found[mode] = [ln for ln in lines if f"{shape}" in ln.split("=", 1)[1].split("(", 1)[0]]
        grads = jax.grad(loss)(ad)["params"]["embed"]["embedding"]
        assert grads["lora_A"].shape == (VOCAB, 2) and float(jnp.abs(grads["lora_A"]).max()) > 0
    assert found["factored"] == [], found["factored"][:3]
    assert found["merged"], "the check finds the merged table W + s·A B"


def test_init_matches_peft():
    """Tables: A = 0, B ~ N(0, 1) (PEFT's Embedding); convs: A ~ U(±1/√(prod(k)·in)), B = 0; model unchanged."""
    net = make_net(0)
    peft_model = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    variables = torch_variables(make_net(0))
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=TARGETS, in_axes=conv_axes(variables))
    ours = lorajax.init(spec, variables, jax.random.key(3))
    emb = ours["params"]["embed"]["embedding"]
    peft_emb = peft_model.base_model.model.embed
    for a in (np.asarray(emb["lora_A"]), to_np(peft_emb.lora_embedding_A["default"])):
        assert not a.any()
    for b in (np.asarray(emb["lora_B"]), to_np(peft_emb.lora_embedding_B["default"])):
        assert b.size == 4 * D and 0.5 < b.std() < 1.6
    for name, fan_in in (("conv1", 3 * D), ("conv2", 9 * C_IMG)):
        ad = ours["params"][name]["kernel"]
        mod = peft_model.base_model.model.get_submodule(name)
        for a, b in ((ad["lora_A"], ad["lora_B"]), (mod.lora_A["default"].weight, mod.lora_B["default"].weight)):
            a, b = (np.asarray(v) if isinstance(v, jax.Array) else to_np(v) for v in (a, b))
            bound = 1 / np.sqrt(fan_in)
            assert 0.5 * bound < np.abs(a).max() <= bound and not b.any(), name
    ids, img = data(7)
    out = lorajax.adapt(FlaxNet().apply, spec, mode="factored")(variables, ours, *flax_args(ids, img))
    assert_close(out, torch_out(peft_model, ids, img), what="identity at init")


# ----------------------------------------------------------------------------- selection and errors


def test_selection_rules():
    variables = torch_variables(make_net(0))
    names = lambda spec: sorted(t.name for t in lorajax.select(spec, variables))  # noqa: E731
    assert names(lorajax.Spec("lora", rank=2, targets="all-linear")) == ["proj"]  # no table, no conv (as PEFT)
    assert names(lorajax.Spec("lora", rank=2, targets=".*")) == ["conv1", "conv2", "proj"]  # a regex picks no table
    assert names(lorajax.Spec("lora", rank=2, targets=["embed"])) == ["embed"]
    with pytest.raises(ValueError, match="selected only by a targets list"):
        lorajax.select(lorajax.Spec("lora", targets="emb.*"), variables)
    assert [k[-2] for k, _ in lorajax.targets.weight_leaves(variables)] == ["conv1", "conv2", "embed", "proj"]


def test_clear_errors(random_case, tmp_path):
    spec, variables, adapters = random_case
    ids, img = flax_args(*data(8))
    # a conv kernel made with the default in_axes=1
    bad = lorajax.Spec("lora", rank=2, targets=["conv1"])
    bad_adapters = lorajax.init(bad, variables, jax.random.key(0))
    with pytest.raises(ValueError, match=r"in_axes=1; set Spec\(in_axes=\{'conv1': 2\}\)"):
        lorajax.adapt(FlaxNet().apply, bad, mode="factored")(variables, bad_adapters, ids, img)
    # a grouped conv
    x = jnp.ones((1, 5, 4))
    grouped = Conv(features=4, kernel=(3,), kw=(("feature_group_count", 2),))
    gv = grouped.init(jax.random.key(0), x)
    gspec = lorajax.Spec("lora", rank=2, targets=["conv"], in_axes={"conv": 2})
    with pytest.raises(ValueError, match="feature_group_count=2"):
        lorajax.adapt(grouped.apply, gspec, mode="factored")(gv, lorajax.init(gspec, gv, 0), x)
    # a mergeable variant whose update is not exactly s·A·B: refused in factored mode, fine merged, not saved
    name = next(
        n
        for n in registry.with_capability("factors")
        if not registry.get(n).factors.exact and registry.get(n).mergeable and registry.get(n).peft is not None
    )
    other = spec.replace(variant=name)
    other_adapters = lorajax.init(other, variables, jax.random.key(0))
    with pytest.raises(ValueError, match="mode='merged'"):
        lorajax.adapt(FlaxNet().apply, other, mode="factored")(variables, other_adapters, ids, img)
    lorajax.adapt(FlaxNet().apply, other, mode="merged")(variables, other_adapters, ids, img)
    with pytest.raises(ValueError, match="only for plain LoRA"):
        lorajax.peft.save(tmp_path / "other", other, other_adapters, variables)
    # a PEFT folder whose conv tensor has the wrong shape
    folder = lorajax.peft.save(tmp_path / "ok", spec, adapters, variables)
    tensors = safetensors.numpy.load_file(str(folder / "adapter_model.safetensors"))
    key = "base_model.model.conv2.lora_B.weight"
    tensors[key] = np.concatenate([tensors[key]] * 2, 0)
    safetensors.numpy.save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"conv2.lora_B.weight.*shape \(8, 2, 1, 1\), expected \(4, 2, 1, 1\)"):
        lorajax.peft.load(folder, variables)
