"""Inference fast paths compute what the release computes, to float32 round-off."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.fast import fold_batchnorm, optimize_for_inference, use_release_compute


@pytest.fixture(scope="module")
def reference(reference_dir):
    return np.load(reference_dir / "official_forward_seed0_256x256.npz")


@pytest.mark.parametrize("channels_last", [False, True])
def test_optimized_model_matches_reference(release_weights_model, reference, channels_last):
    model = optimize_for_inference(release_weights_model(), channels_last=channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules() if m is not model.sff.bn_out)
    assert model.memory_format == (torch.channels_last if channels_last else torch.contiguous_format)
    x = torch.from_numpy(reference["input"])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        p1 = model.predict(x)
        outputs = model(x)
    assert np.abs(p1.numpy() - reference["P1"]).max() < 1e-4
    for name, out in zip(("P1", "P2", "P3", "P4", "frequency"), outputs):
        assert np.abs(out.numpy() - reference[name]).max() < 1e-4, name


def test_release_compute_matches_reference(release_weights_model, reference):
    model = use_release_compute(release_weights_model())
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    with torch.inference_mode():
        p1 = model(torch.from_numpy(reference["input"]))[0]
    assert np.abs(p1.numpy() - reference["P1"]).max() < 1e-4


def test_folding_needs_eval_mode(release_weights_model):
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(release_weights_model().train())


def test_weights_cast_for_autocast_give_identical_maps(release_weights_model):
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    plain = optimize_for_inference(release_weights_model())
    cast = optimize_for_inference(release_weights_model(), autocast_dtype=torch.bfloat16)
    assert cast.head.conv_up1.weight.dtype == torch.bfloat16
    assert cast.rgb_encoder.body.stages[0].norm.weight.dtype == torch.float32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = plain.predict(x), cast.predict(x)
    assert torch.equal(got, expected)
