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

# Device materials: density (g/cm^3) and mass attenuation (cm^2/g, with coherent scattering) at 40, 50
# and 60 keV, the effective energies of fluoroscopy beams at 60-90 kV (NIST XCOM; alloys and compounds
# by mass fraction: stainless steel as iron, nitinol 56% Ni 44% Ti, the tip coil as platinum, the
# catheter filler as 30-40% BaSO4 in a polymer that attenuates like water). Anatomy keeps the
# calibrated values above; devices see the domain's tube voltage.
_KEV = np.array([40.0, 50.0, 60.0])
_MATERIALS = {
    "water": (1.0, (0.268, 0.227, 0.206)),
    "steel": (7.9, (3.63, 1.96, 1.21)),
    "nitinol": (6.45, (0.56 * 4.55 + 0.44 * 1.21, 0.56 * 2.45 + 0.44 * 0.70, 0.56 * 1.50 + 0.44 * 0.46)),
    "platinum": (21.45, (11.4, 6.4, 4.0)),
    "baso4": (4.5, (15.2, 8.5, 5.3)),
    "polymer": (1.1, (0.255, 0.216, 0.196)),
}
# Quanta per mm^2 per nGy of air kerma for a 70 kV beam behind 21 mm Al (IEC 62220-1 RQA5).
_QUANTA_PER_MM2_NGY = 29.65


def _mixture_mu_per_mm(weights: dict[str, float], kev: float) -> float:
    """Linear attenuation (1/mm) at ``kev`` (40-60 keV) of a mixture of materials by mass fraction, minus water's.

    The mixture's density follows from its parts' (volumes add); the excess over water is what a
    device adds to the soft tissue it displaces.
    """
    density = 1.0 / sum(w / _MATERIALS[name][0] for name, w in weights.items())
    mass = sum(w * np.exp(np.interp(kev, _KEV, np.log(_MATERIALS[name][1]))) for name, w in weights.items())
    water = np.exp(np.interp(kev, _KEV, np.log(_MATERIALS["water"][1])))
    return float(density * mass - water) / 10.0


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
    """Acquisition and display chain: quanta per pixel, blurs (px), scatter share, display processing, beam energy.

    ``dose`` is the number of detected quanta per pixel where the beam reaches the detector at the
    automatic exposure control's reference level (the median of the central field).
    """

    dose: float
    psf_px: float
    correlation_px: float
    scatter: float
    heel: float
    range_compression: float
    edge_enhancement: float
    kev: float
    magnification: float
    pitch_mm: float


@dataclass(frozen=True)
class _Equipment:
    """Ranges a domain's X-ray system draws its acquisition from (pairs are uniform bounds, kerma log-uniform).

    kerma_ngy: air kerma at the detector per frame (nGy), held there by automatic exposure control.
    kev: effective energy of the beam (keV) at the domain's tube voltage.
    magnification: source-to-detector over source-to-object distance.
    pitch_mm: detector pixel pitch as read out in fluoroscopy (binned), at the detector; 0 for a rendering.
    focal_mm: focal spot size (FWHM); motion_mm: blur of the patient's motion during a pulse (sigma, mm).
    dqe: detective quantum efficiency; the rest is the display chain as in _Detector.
    """

    kerma_ngy: tuple[float, float]
    kev: tuple[float, float]
    magnification: tuple[float, float]
    pitch_mm: tuple[float, float]
    focal_mm: tuple[float, float]
    motion_mm: tuple[float, float]
    dqe: tuple[float, float]
    scatter: tuple[float, float]
    heel: float
    range_compression: tuple[float, float]
    edge_enhancement: tuple[float, float]


def _detector(mm_per_px: float, equipment: _Equipment, rng: np.random.Generator) -> _Detector:
    """Draw an acquisition for image pixels of ``mm_per_px`` in the patient plane from a domain's equipment.

    Quanta per pixel follow the detector kerma and the pixel's area at the detector, so a smaller
    image (larger pixels) is less noisy per pixel, as a binned or downsampled real frame is. The blur
    adds the focal spot's penumbra f (M - 1) / M, the detector's spread (half a readout pixel, over M)
    and motion, all in the patient plane.
    """
    kerma = float(np.exp(rng.uniform(*np.log(equipment.kerma_ngy))))
    kev, m = rng.uniform(*equipment.kev), rng.uniform(*equipment.magnification)
    pitch, focal, motion = (rng.uniform(*equipment.pitch_mm), rng.uniform(*equipment.focal_mm),
                            rng.uniform(*equipment.motion_mm))
    quanta = kerma * _QUANTA_PER_MM2_NGY * rng.uniform(*equipment.dqe) * (mm_per_px * m) ** 2
    spread_mm = 0.5 * pitch / m
    blur_mm = float(np.sqrt((focal * (m - 1) / m / 2.355) ** 2 + spread_mm**2 + motion**2))
    return _Detector(dose=quanta, psf_px=blur_mm / mm_per_px, correlation_px=spread_mm / mm_per_px,
                     scatter=rng.uniform(*equipment.scatter), heel=rng.uniform(-equipment.heel, equipment.heel),
                     range_compression=rng.uniform(*equipment.range_compression),
                     edge_enhancement=rng.uniform(*equipment.edge_enhancement), kev=float(kev),
                     magnification=float(m), pitch_mm=float(pitch))


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
    # Automatic exposure control: the tube output puts ``dose`` quanta per pixel at the central field's median.
    centre = primary[size // 4 : size - size // 4, size // 4 : size - size // 4]
    i0 = detector.dose / max(float(np.median(centre)), 1e-6)
    counts = rng.poisson(i0 * primary).astype(np.float32)
    if detector.correlation_px > 0.05:
        counts = ndimage.gaussian_filter(counts, detector.correlation_px, truncate=3.0)
    return -np.log(np.maximum(counts, 0.5) / i0)


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
