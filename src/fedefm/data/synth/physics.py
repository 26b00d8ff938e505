"""Materials and the acquisition chain: attenuation, collimation, detector exposure, display and burnt-in text."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from fedefm.data.synth.geometry import _upsample


# Linear attenuation per mm at an effective energy near 60 keV; bone, contrast and metal are the
# excess over the soft tissue they displace, air the deficit.
_MU_TISSUE = 0.020
_MU_CORTICAL = 0.035
_MU_TRABECULAR = 0.008
_MU_AIR = -0.019
_MU_LEAD_SHUTTER = 14.0  # total line integral of a lead collimator blade: no quanta get through


def _collimation(size: int, rng: np.random.Generator, p_shutters: float, p_round: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Lead shutters and a round image-intensifier field: extra attenuation (H, W) and the exposed pixels (H, W)."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    blocked = np.zeros((size, size), bool)
    for side in range(4):
        if rng.random() < p_shutters:
            depth = rng.uniform(0.03, 0.17) * size
            tilt = np.tan(np.deg2rad(rng.uniform(-4, 4)))
            across, along = (rows, cols) if side % 2 == 0 else (cols, rows)
            edge = depth + tilt * (along - size / 2)
            blocked |= (across < edge) if side < 2 else (across > size - 1 - edge)
    if rng.random() < p_round:
        radius = rng.uniform(0.5, 0.64) * size
        blocked |= np.hypot(rows - size / 2 + 0.5, cols - size / 2 + 0.5) > radius
    return blocked.astype(np.float32) * _MU_LEAD_SHUTTER, ~blocked


@functools.lru_cache(maxsize=8)
def _font(height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``height`` px."""
    return ImageFont.load_default(size=height)


def _burn_in_text(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Overlay the annotations a cath-lab monitor burns in (angles, frame rate, counters) -> (H, W) uint8."""
    size = image.shape[0]
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(size // 22, 7))
    texts = [f"{rng.choice(['LAO', 'RAO'])} {rng.integers(0, 46)}  {rng.choice(['CRA', 'CAU'])} {rng.integers(0, 31)}",
             f"{rng.choice([7.5, 15, 30])} fps", f"F {rng.integers(1, 300):03d}", f"{rng.integers(60, 110)} kV",
             f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}:{rng.integers(0, 60):02d}",
             str(rng.choice(["L", "R", "FL", "DSA", "ROADMAP"]))]
    corners = [(0.02, 0.02), (0.02, 0.7), (0.9, 0.02), (0.9, 0.7)]
    shade = int(rng.integers(180, 256))
    for k in rng.choice(len(corners), size=int(rng.integers(1, 5)), replace=False):
        row, col = corners[int(k)]
        text = texts[int(rng.integers(len(texts)))]
        draw.text((col * size, row * size), text, fill=shade, font=font)
    return np.asarray(canvas)


@dataclass(frozen=True)
class _Detector:
    """Acquisition and display chain: quanta per pixel, blurs (px), scatter share, display processing."""

    dose: float
    psf_px: float
    correlation_px: float
    scatter: float
    heel: float
    range_compression: float
    edge_enhancement: float


def _lowpass(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass (H, W) for large ``sigma`` px: blurred on a block-averaged grid, then interpolated back."""
    f = max(int(sigma // 4), 1)
    h, w = x.shape[0] // f, x.shape[1] // f
    small = x[: h * f, : w * f].reshape(h, f, w, f).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small, sigma / f, mode="nearest")
    return _upsample(small, x.shape)


def _expose(p: np.ndarray, detector: _Detector, rng: np.random.Generator) -> np.ndarray:
    """Line integrals (H, W) -> estimated line integrals -log(I / I0) (H, W) after Beer-Lambert, blur and quanta."""
    size = p.shape[0]
    primary = np.exp(-p)
    if detector.scatter > 0:
        primary += detector.scatter * _lowpass(primary, 0.12 * size)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    # Heel effect: the anode side of the field gets fewer quanta; the anode-cathode axis runs along the rows.
    primary *= 1 + detector.heel * ramp[:, None]
    if detector.psf_px > 0.05:
        primary = ndimage.gaussian_filter(primary, detector.psf_px, truncate=3.0)
    counts = rng.poisson(detector.dose * primary).astype(np.float32)
    if detector.correlation_px > 0.05:
        counts = ndimage.gaussian_filter(counts, detector.correlation_px, truncate=3.0)
    return -np.log(np.maximum(counts, 0.5) / detector.dose)


def _process(log_image: np.ndarray, detector: _Detector) -> np.ndarray:
    """Monitor processing of the log image (H, W): dynamic-range compression and unsharp masking."""
    size = log_image.shape[0]
    out = log_image
    if detector.range_compression > 0:
        out = out - detector.range_compression * _lowpass(out, 0.1 * size)
    if detector.edge_enhancement > 0:
        out = out + detector.edge_enhancement * (out - ndimage.gaussian_filter(out, 0.008 * size + 0.8, truncate=3.0))
    return out


def _soft_clip(x: np.ndarray, knee: float = 0.75) -> np.ndarray:
    """Map any values (H, W) into [0, 1]: identity between 1 - knee and knee, exponential roll-off beyond.

    A monitor's tone curve: structures beyond the window (a guidewire inside dense contrast) stay
    a little darker than their surroundings instead of clipping to the same black.
    """
    room = 1.0 - knee
    high = knee + room * (1.0 - np.exp(-(np.maximum(x, knee) - knee) / room))
    low = room * np.exp(-(room - np.minimum(x, room)) / room)
    return np.where(x > knee, high, np.where(x < room, low, x)).astype(np.float32)


def _to_display(values: np.ndarray, rng: np.random.Generator, valid: np.ndarray | None = None,
                dark_is_high: bool = True) -> np.ndarray:
    """Window any image (H, W) the same way for every class -> uint8 (H, W), brightness jittered per image.

    The window spans random low/high percentiles of the valid pixels plus some headroom, and a soft
    knee keeps what lies beyond it distinguishable (a guidewire inside dense contrast). A mild gamma
    centres the mid-tones, then a contrast and offset set the mean of the valid pixels to a random
    level in [0.3, 0.7], so that no class can be told apart by its mean brightness.
    """
    valid = valid if valid is not None and valid.any() else np.ones(values.shape, bool)
    lo, hi = np.percentile(values[valid], [rng.uniform(0.2, 2.0), rng.uniform(98.0, 99.8)])
    span = max(float(hi - lo), 1e-6)
    lo, hi = lo - rng.uniform(0.0, 0.1) * span, hi + rng.uniform(0.05, 0.2) * span
    x = _soft_clip((values - lo) / (hi - lo))
    if dark_is_high:
        x = 1.0 - x
    x = x ** float(np.clip(np.log(0.5) / np.log(np.clip(x[valid].mean(), 0.03, 0.97)), 0.7, 1.4))
    mean = float(np.clip(x[valid].mean(), 0.01, 0.99))
    target = rng.uniform(0.3, 0.7)
    contrast = min(rng.uniform(0.6, 1.0), target / mean, (1 - target) / (1 - mean))
    return np.round(255 * np.clip(target + contrast * (x - mean), 0.0, 1.0)).astype(np.uint8)
