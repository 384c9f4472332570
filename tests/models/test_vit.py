"""ViT encoder against transformers' ViTModel (a tiny random checkpoint), bad pixel shapes, LoRA on its MLP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lorajax  # noqa: E402
from lorajax.models import from_pretrained  # noqa: E402

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
MLP = r".*encoder\.layer\.\d+\.(intermediate|output)\.dense"  # not attention.output.dense


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random ViTModel (weights moved off their init, so each one matters) saved as safetensors."""
    torch.manual_seed(0)
    hf = transformers.ViTModel(transformers.ViTConfig(**TINY)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("vit")
    hf.save_pretrained(folder, safe_serialization=True)
    model, params = from_pretrained(folder)
    return hf, model, params


def test_hidden_states_and_pooler_match_transformers(checkpoint):
    hf, model, params = checkpoint
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)  # channels-last
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
    hidden, pooled = jax.jit(lambda p, x: model.apply({"params": p}, x, output_pooled=True))(params, x)
    assert hidden.shape == (2, 1 + 16, 32) and pooled.shape == (2, 32)
    np.testing.assert_allclose(np.asarray(hidden), ref.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 24, 24, 3), (1, 32, 32, 1), (1, 3, 32, 32), (32, 32, 3)])
def test_wrong_image_shape_raises(checkpoint, shape):
    _, model, params = checkpoint
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 32, 32, 3\]"):
        model.apply({"params": params}, jnp.zeros(shape))


def test_lora_on_mlp_factored_equals_merged(checkpoint):
    """LoRA on intermediate/output dense only (TopoLoRA-SAM's targets): factored == merged, and the count."""
    _, model, params = checkpoint
    spec = lorajax.Spec("lora", rank=8, alpha=16, targets=MLP)
    adapters = lorajax.init(spec, {"params": params}, jax.random.key(0))
    adapters = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), adapters)  # B != 0
    names = sorted(lorajax.selection.Selection(MLP).resolve(params), key=lambda w: w.name)
    want = [f"encoder.layer.{i}.{n}.dense" for i in (0, 1) for n in ("intermediate", "output")]
    assert [w.name for w in names] == want
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    fac = lorajax.adapt(model.apply, spec, mode="factored")({"params": params}, adapters, x)
    mer = lorajax.adapt(model.apply, spec, mode="merged")({"params": params}, adapters, x)
    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(fac), np.asarray(mer), atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(fac - base).max()) > 1e-3  # the adapters change the output
    d = 32
    assert lorajax.count_params(spec, {"params": params}, adapters)["trainable"] == 2 * 2 * 8 * (d + 2 * d)
