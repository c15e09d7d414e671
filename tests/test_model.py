"""The model reproduces the authors' release and loads every checkpoint layout safely."""
from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torchvision.models import resnet50

from lib import CheckpointError, FSANet, fsanet_from_checkpoint, load_checkpoint, load_pretrained_encoders
from lib.checkpoint import convert_release_state_dict
from lib.frequency import highpass_mask

OUTPUTS = ("P1", "P2", "P3", "P4", "frequency")


@pytest.fixture(scope="module")
def model() -> FSANet:
    """One randomly initialised default model, shared to keep the suite fast."""
    return FSANet().eval()


@pytest.fixture(scope="module")
def target() -> FSANet:
    """A second model that tests load files into (every load overwrites all of its weights)."""
    return FSANet()


def test_parameter_count_matches_release(model):
    assert sum(p.numel() for p in model.parameters()) == 109_194_130
    assert len(model.state_dict()) == 1133


def test_release_keys_map_one_to_one(model, reference_dir, official_weights):
    release = official_weights.official_state_dict(seed=1, radius=100.0)
    converted = convert_release_state_dict(release)
    assert len(converted) == len(release) == 1133
    own = model.state_dict()
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)


def test_construction_touches_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access during model construction")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    FSANet()


def test_release_checkpoint_reproduces_reference_forward(model, release_checkpoint, reference_dir):
    load_checkpoint(model, release_checkpoint)
    ref = np.load(reference_dir / "official_forward_seed0_256x256.npz")
    with torch.no_grad():
        outputs = model(torch.from_numpy(ref["input"]))
    for name, out in zip(OUTPUTS, outputs):
        assert out.shape == ref[name].shape
        assert np.abs(out.numpy() - ref[name]).max() < 1e-4, name


def test_predict_equals_first_output_and_batches_are_independent(model, release_checkpoint):
    load_checkpoint(model, release_checkpoint)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = model(x)
        single = model(x[1:])
        p1 = model.predict(x)
    assert all(o.shape == (2, 1, 64, 96) for o in batched)
    torch.testing.assert_close(p1, batched[0], rtol=0, atol=1e-5)
    for a, b in zip(batched, single):
        torch.testing.assert_close(a[1:], b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape,radius", [((2, 3, 64, 96), 7.0), ((1, 3, 96, 64), 100.0), ((1, 3, 33, 50), 12.5)])
def test_frequency_image_matches_numpy(shape, radius):
    from lib.frequency import FrequencyFilter

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    height, width = shape[-2:]
    spectrum = np.roll(np.fft.fft2(x.double().numpy(), axes=(-2, -1)), (height // 2, width // 2), axis=(-2, -1))
    rows, cols = np.mgrid[0:height, 0:width]
    mask = np.hypot(rows - (height - 1) / 2, cols - (width - 1) / 2) > radius
    expected = np.abs(np.fft.ifft2(spectrum * mask, axes=(-2, -1))).mean(axis=1, keepdims=True)
    got = FrequencyFilter(radius)(x)
    assert got.shape == (shape[0], 1, height, width)
    assert np.abs(got.numpy() - expected).max() < 1e-4


def test_frequency_mask_is_cached_and_follows_the_radius():
    from lib.frequency import FrequencyFilter

    flt = FrequencyFilter(10.0)
    first = flt.mask(32, 48, torch.device("cpu"))
    assert flt.mask(32, 48, torch.device("cpu")) is first
    torch.testing.assert_close(first, highpass_mask(32, 48, 10.0))
    flt.load_state_dict({"radius": torch.tensor([3.0])})
    updated = flt.mask(32, 48, torch.device("cpu"))
    torch.testing.assert_close(updated, highpass_mask(32, 48, 3.0))
    assert updated.sum() > first.sum()


@pytest.mark.parametrize("cache_mask", [True, False])
def test_a_fixed_mask_gives_the_same_image_and_is_dropped_afterwards(cache_mask):
    from lib.frequency import FrequencyFilter

    flt = FrequencyFilter(6.0, cache_mask=cache_mask)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = flt(x)
    with flt.fixed_mask(32, 32):
        flt.load_state_dict({"radius": torch.tensor([2.0])})  # ignored inside: the graph's constant stays
        assert torch.equal(flt(x), expected)
    torch.testing.assert_close(flt.mask(32, 32, torch.device("cpu")), highpass_mask(32, 32, 2.0))
    assert not torch.equal(flt(x), expected)


def test_train_mode_gradients_and_fixed_radius():
    model = FSANet().train()
    outputs = model(torch.randn(2, 3, 64, 64))
    assert len(outputs) == 5 and all(o.shape[-2:] == (64, 64) for o in outputs)
    sum(o.mean() for o in outputs[:4]).backward()
    assert model.frequency.radius.grad is None
    assert model.rgb_encoder.body.patch_embed.proj.weight.grad is not None
    assert model.freq_encoder.conv1.weight.grad is not None


def test_res2net_frequency_encoder_runs():
    model = FSANet(freq_encoder="res2net50").eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape for o in outputs] == [(1, 1, 64, 64)] * 5
    with pytest.raises(ValueError, match="freq_encoder"):
        FSANet(freq_encoder="vgg")


@pytest.mark.parametrize("layout", ["ours", "bare", "module", "compiled", "ddp_compiled"])
def test_every_checkpoint_layout_loads(layout, model, target, tmp_path):
    source = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
              for k, v in model.state_dict().items()}
    prefix = {"ours": "", "bare": "", "module": "module.", "compiled": "_orig_mod.",
              "ddp_compiled": "module._orig_mod."}[layout]
    weights = {prefix + k: v for k, v in source.items()}
    blob = weights
    if layout == "ours":
        blob = {"model": weights, "optimizer": {"state": {}}, "epoch": 3, "format": "fsanet-train-v1"}
    torch.save(blob, tmp_path / "ckpt.pth")
    load_checkpoint(target, tmp_path / "ckpt.pth")
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source)


def test_a_model_built_from_a_checkpoint_equals_one_initialised_then_loaded(release_checkpoint, target):
    """test.py and export.py build the model straight from the checkpoint (no random draws to discard): the same
    tensors, on the CPU, and the caller's random stream untouched."""
    loaded = load_checkpoint(target, release_checkpoint).state_dict()
    rng = torch.random.get_rng_state()
    built = fsanet_from_checkpoint(release_checkpoint)
    assert torch.equal(torch.random.get_rng_state(), rng)
    state = built.state_dict()
    assert state.keys() == loaded.keys()
    assert all(v.device.type == "cpu" and torch.equal(v, loaded[k]) for k, v in state.items())


def _save_modified(model: FSANet, path: Path, change) -> Path:
    state = dict(model.state_dict())
    change(state)
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.pop("sff.conv_xy.weight"), r"missing: sff\.conv_xy\.weight"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), r"unexpected: extra\.weight"),
        (lambda s: s.__setitem__("head.conv2_1.bias", torch.zeros(2)), r"wrong shape: head\.conv2_1\.bias"),
    ],
)
def test_strict_loading_names_the_keys(model, target, tmp_path, change, message):
    path = _save_modified(model, tmp_path / "bad.pth", change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(target, path)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_bad_files_give_clear_errors(target, release_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(target, tmp_path / "nope.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(release_checkpoint.read_bytes()[: 1 << 20])
    with pytest.raises(CheckpointError, match="truncated.pth is a truncated or damaged PyTorch checkpoint"):
        load_checkpoint(target, truncated)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth"):
        load_checkpoint(target, text)
    marker = tmp_path / "code-ran"
    payload = _Payload()
    payload.marker = str(marker)
    evil = tmp_path / "evil.pth"
    torch.save({"model": payload}, evil)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(target, evil)
    assert not marker.exists()
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="holds no model weights"):
        load_checkpoint(target, tmp_path / "empty.pth")


def _original_pvt_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's PVT-v2 keys written back in the original PVT-v2 repository's layout."""
    out = {}
    for key, value in state.items():
        key = key.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        key = re.sub(r"^patch_embed\.", "patch_embed1.", key)
        key = re.sub(r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", key)
        key = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"block{int(m.group(1)) + 1}.", key)
        key = re.sub(r"^stages\.(\d)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", key)
        out[key] = value
    return out


def test_pretrained_encoders_load_original_layouts(tmp_path):
    pvt = timm.create_model("pvt_v2_b2", pretrained=False, num_classes=1000)
    pvt_file = tmp_path / "pvt_v2_b2.pth"
    torch.save(_original_pvt_layout(pvt.state_dict()), pvt_file)
    tv = resnet50(weights=None)
    resnet_file = tmp_path / "resnet50-0676ba61.pth"
    torch.save(tv.state_dict(), resnet_file)

    model = FSANet()
    load_pretrained_encoders(model, pvt_path=pvt_file, resnet_path=resnet_file)
    body = model.rgb_encoder.body
    assert torch.equal(body.stages[2].blocks[5].mlp.dwconv.weight, pvt.stages[2].blocks[5].mlp.dwconv.weight)
    assert torch.equal(body.stages[3].norm.weight, pvt.stages[3].norm.weight)
    freq = model.freq_encoder
    assert torch.equal(freq.layer3_1[5].conv2.weight, tv.layer3[5].conv2.weight)
    assert torch.equal(freq.bn1.running_var, tv.bn1.running_var)
    assert freq.conv1.weight.shape == (64, 1, 7, 7)
    assert 0.9 < freq.conv1.weight.std().item() < 1.1

    res2 = timm.create_model("res2net50d", pretrained=False)
    res2_file = tmp_path / "res2net50_v1b_26w_4s-3cf99910.pth"
    torch.save(res2.state_dict(), res2_file)
    model = FSANet(freq_encoder="res2net50")
    load_pretrained_encoders(model, res2net_path=res2_file)
    assert torch.equal(model.freq_encoder.body.layer2[1].convs[0].weight, res2.layer2[1].convs[0].weight)
    assert model.freq_encoder.body.conv1[0].weight.shape[1] == 1


def test_pretrained_file_errors_name_the_file_and_source(target, tmp_path):
    model = target
    with pytest.raises(CheckpointError, match=r"missing\.pth.*pvt_v2_b2\.pth"):
        load_pretrained_encoders(model, pvt_path=tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"resnet50\.pth.*download\.pytorch\.org"):
        load_pretrained_encoders(model, resnet_path=tmp_path / "resnet50.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save(resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(CheckpointError, match="wrong.pth does not fit"):
        load_pretrained_encoders(model, pvt_path=wrong)
