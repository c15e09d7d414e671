"""The frequency branch's input: a high-pass image made with an FFT and a circular mask."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# The release: radius 100 bins, tested at 992 x 992 (spectrum half-width 496), where the mask removes
# about 3% of the bins. The radius counts bins, not a share of the image, so small sizes lose the band.
RELEASE_RADIUS = 100.0
RELEASE_TESTSIZE = 992
# Below this share of bins kept, the frequency image is (nearly) empty and its encoder sees a constant.
MIN_KEPT_FRACTION = 0.05


def highpass_mask(height: int, width: int, radius: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """H x W mask: 0 within `radius` bins of the shifted spectrum's centre, 1 elsewhere."""
    rows = torch.arange(height, dtype=torch.float32, device=device).view(-1, 1)
    cols = torch.arange(width, dtype=torch.float32, device=device).view(1, -1)
    distance = torch.sqrt((rows - (height - 1) / 2) ** 2 + (cols - (width - 1) / 2) ** 2)
    return torch.where(distance <= radius, torch.zeros_like(distance), torch.ones_like(distance))


def kept_fraction(size: int, radius: float) -> float:
    """Share of an S x S spectrum's bins the mask keeps; 0 means the frequency image is all zero."""
    return float(highpass_mask(size, size, radius).mean())


def scaled_radius(size: int) -> float:
    """The radius that keeps the release's proportion (100 bins at 992) at size S: 100 * S / 992."""
    return round(RELEASE_RADIUS * size / RELEASE_TESTSIZE, 1)


def narrow_band_sizes(sizes: dict[str, int], radius: float) -> list[str]:
    """The named sizes at which `radius` keeps under MIN_KEPT_FRACTION of the bins, each with its share."""
    narrow = []
    for name, size in sizes.items():
        kept = kept_fraction(size, radius)
        if kept < MIN_KEPT_FRACTION:
            narrow.append(f"{name} {size} ({kept:.1%} of the bins kept)")
    return narrow


class FrequencyFilter(nn.Module):
    """High-pass filter of the RGB input, averaged over channels to a B x 1 x H x W image.

    As released: the spectrum is rolled by (H//2, W//2) and never rolled back (the final `abs`
    makes that harmless), and `radius` is an nn.Parameter that never receives a gradient because
    the mask is built with `torch.where`.
    """

    def __init__(self, radius: float = 100.0, cache_mask: bool = True) -> None:
        super().__init__()
        self.radius = nn.Parameter(torch.tensor([float(radius)]))
        self.cache_mask = cache_mask
        self._masks: dict[tuple, tuple] = {}
        self._fixed: torch.Tensor | None = None

    def _radius_version(self) -> int | None:
        """The radius' in-place write counter (None for inference tensors, which cannot be written)."""
        try:
            return self.radius._version
        except RuntimeError:
            return None

    def mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The mask for this size and device, built once per (H, W, radius, device)."""
        if self._fixed is not None:
            return self._fixed
        if not self.cache_mask:
            return highpass_mask(height, width, float(self.radius.detach().cpu()), device)
        # The version counter moves on every in-place write of the radius; only then is its value
        # read back (a device sync). DataParallel replicas get fresh copies at version 0 each call,
        # so they keep their masks; load_state_dict clears the cache (_load_from_state_dict).
        key = (height, width, str(device))
        stamp = self._radius_version()
        cached = self._masks.get(key)
        if cached is None or cached[0] != stamp:
            radius = float(self.radius.detach().cpu())
            if cached is None or cached[1] != radius:
                # Never an inference tensor: a mask first built under torch.inference_mode could not be
                # saved for backward by a later forward that needs gradients.
                with torch.inference_mode(False):
                    cached = (stamp, radius, highpass_mask(height, width, radius, device))
            else:
                cached = (stamp, radius, cached[2])
            self._masks[key] = cached
        return cached[2]

    @contextlib.contextmanager
    def fixed_mask(self, height: int, width: int) -> Iterator[None]:
        """Within: every call multiplies by the mask of this size and today's radius, held as a constant.

        For torch.export's non-strict tracer, which sees the radius as a symbolic value it cannot read.
        """
        self._fixed = highpass_mask(height, width, float(self.radius.detach().cpu()), self.radius.device)
        try:
            yield
        finally:
            self._fixed = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        """Load as usual, then forget masks built for the old radius (replicas share this cache)."""
        super()._load_from_state_dict(*args, **kwargs)
        self._masks.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x H x W image -> B x 1 x H x W high-pass magnitude (computed in float32)."""
        height, width = x.shape[-2:]
        with torch.autocast(device_type=x.device.type, enabled=False):
            spectrum = torch.fft.fft2(x.float(), dim=(-2, -1))
            spectrum = torch.roll(spectrum, shifts=(height // 2, width // 2), dims=(-2, -1))
            mask = self.mask(height, width, x.device)
            if not self.cache_mask:
                # The release builds the mask at the spectrum's full B x C x H x W size on every call.
                mask = mask.expand_as(spectrum).contiguous()
            spectrum = spectrum * mask
            image = torch.fft.ifft2(spectrum, dim=(-2, -1)).abs()
        return image.mean(dim=1, keepdim=True)
