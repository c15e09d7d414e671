"""Foreground colour estimation for cutouts: approximate fast foreground colour estimation (blur fusion).

Marco Forte and François Pitié, "Approximate Fast Foreground Colour Estimation", ICIP 2021
(arXiv:2006.14970). Where alpha is fractional (hair, wires, meshes), a photo pixel is
I = alpha F + (1 - alpha) B: its RGB still holds the old background. Blur fusion estimates F from
alpha-weighted box-filter means of the foreground and background near each pixel and puts the
residual of the compositing equation back into F; it runs twice, with a large then a small radius
(90 and 6 pixels, the paper's and BiRefNet's values). Two box filters per pass: cost independent of
the radius.

Values are the photo's own sRGB code values scaled to [0, 1]: the equation is applied as the photo
stores it (gamma-encoded), which is how DIS masks and matting datasets define alpha and how the
cutouts are composited again (utils.cutout).
"""
from __future__ import annotations

import cv2
import numpy as np

RADII = (90, 6)  # the paper's two passes: a large radius for the colours, a small one to sharpen them
_EPS = 1e-5  # keeps the weighted means finite where a window holds no foreground (or no background)


def _box(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a radius x radius window (reflected borders), float32, same shape as `image`."""
    out = cv2.blur(image, (radius, radius))
    return out if out.ndim == image.ndim else out[..., None]


def _blur_fusion(image: np.ndarray, foreground: np.ndarray, background: np.ndarray, alpha: np.ndarray,
                 radius: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass of the paper's Eq. 5-7: (refined foreground, blurred background), all H x W x 3 float32."""
    blurred_alpha = _box(alpha, radius)
    blurred_f = _box(foreground * alpha, radius) / (blurred_alpha + _EPS)
    blurred_b = _box(background * (1.0 - alpha), radius) / (1.0 - blurred_alpha + _EPS)
    refined = blurred_f + alpha * (image - alpha * blurred_f - (1.0 - alpha) * blurred_b)
    return np.clip(refined, 0.0, 1.0, out=refined), blurred_b


def estimate_foreground(rgb: np.ndarray, alpha: np.ndarray, radii: tuple[int, ...] = RADII) -> np.ndarray:
    """H x W x 3 uint8 foreground colours of the photo `rgb` under the 8-bit `alpha`.

    Opaque pixels (alpha 255) keep the photo's RGB exactly; fully transparent ones get the estimate
    (their colour is invisible in a cutout, but a later blur or resize may reach them).
    """
    if rgb.shape[:2] != alpha.shape[:2]:
        raise ValueError(f"alpha of size {alpha.shape[:2]} does not fit an image of size {rgb.shape[:2]}")
    image = rgb.astype(np.float32) / 255.0
    a = (alpha.astype(np.float32) / 255.0)[..., None]
    foreground, background = image, image
    for radius in radii:
        foreground, background = _blur_fusion(image, foreground, background, a, radius)
    out = np.rint(foreground * 255.0).astype(np.uint8)
    opaque = alpha == 255
    out[opaque] = rgb[opaque]
    return out
