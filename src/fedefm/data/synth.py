"""Physically grounded synthetic X-ray images: fluoroscopy with catheter/guidewire masks, and vessel images.

A fluoroscopy frame is a projection, not a drawing. Every structure adds its attenuation line
integral (mu * path length) to a map P: soft tissue and lungs as smooth ellipsoid thicknesses,
ribs and vertebrae as hollow cortical shells, contrast-filled vessel trees, a hollow polymer
catheter and a solid steel guidewire. The detector sees I0 * exp(-P) (Beer-Lambert) plus
scatter, blurred by the focal spot, counts Poisson quanta at a dose I0 that depends on the
domain, and the display shows -log(I / I0) through a percentile window, so that, as on a real
monitor, more attenuation is darker. Masks come from the same device centrelines as the pixels.

Curved tubes are projected exactly and fast: a tube of radius r is the sum of uniform discs of
radius r splatted along its centreline, since integrating a disc of unit height along the tube
gives 2 * sqrt(r^2 - d^2) at distance d, the chord of the cylinder. Discs are splatted into a few
radius levels and convolved with the analytic disc spectrum by FFT. A hollow tube is a disc of the
outer radius minus one of the inner radius.

Every image draws everything from its own generator, so a dataset is reproducible byte for byte
and an image does not depend on how many others are written.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import fft, ndimage, special

from fedefm.errors import ConfigError, choose
from fedefm.files import write_json

GENERATOR_VERSION = "1.0.0"
DOMAINS: tuple[str, ...] = ("clinical", "animal", "phantom", "simulation")
PRETRAIN_CLASSES: tuple[str, ...] = DOMAINS + ("fundus", "ct_slice")
LABEL_NAMES: tuple[str, ...] = ("background", "catheter", "guidewire")
# Catheter tip positions of the downstream position task (sorted, as class folders are read back).
POSITION_CLASSES: tuple[str, ...] = ("aortic_arch", "descending_aorta", "looped", "supra_aortic")
_SUPRA_AORTIC = ("brachiocephalic", "right_common_carotid", "right_subclavian", "left_common_carotid",
                 "left_subclavian")
_POSITION_SEGMENTS = {"aortic_arch": ("aortic_arch",), "descending_aorta": ("descending_aorta",),
                      "supra_aortic": _SUPRA_AORTIC}
_POSITION_TRIES = 50

logger = logging.getLogger(__name__)

# One anatomy unit is 220 mm: at zoom 1 the image spans 220 mm, about a fluoroscopy field of view.
_UNIT_MM = 220.0
# Linear attenuation per mm at an effective energy near 60 keV; bone, contrast and metal are the
# excess over the soft tissue they displace, air the deficit.
_MU_TISSUE = 0.020
_MU_CORTICAL = 0.035
_MU_TRABECULAR = 0.008
_MU_AIR = -0.019
_MU_LEAD_SHUTTER = 14.0  # total line integral of a lead collimator blade: no quanta get through

# Radius levels (px) of the disc splatting: a disc between two levels is shared between them, which
# blurs its edge by about the level spacing. Narrow discs use geometric levels on the full grid;
# wide ones finer levels on a half-resolution grid (radii in half-resolution px).
_WIDE_DISC_PX = 3.0
_NARROW_LEVELS = 0.4 * 1.5 ** np.arange(7)
_WIDE_LEVELS = 1.5 * 1.15 ** np.arange(50)
_ANTIALIAS_SIGMA = 0.55
_ANTIALIAS_SIGMA_HALF = 0.4

DiscSplats = tuple[np.ndarray, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- geometry


def _resample(points: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Evenly spaced points along a polyline (N, 2) -> points (M, 2) and their source index (M,) in [0, N-1]."""
    seg = np.hypot(*np.diff(points, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    m = max(int(np.ceil(arc[-1] / spacing)), 1) + 1
    pos = np.interp(np.linspace(0.0, arc[-1], m), arc, np.arange(len(points), dtype=float))
    i = np.minimum(pos.astype(int), len(points) - 2)
    f = (pos - i)[:, None]
    return points[i] * (1 - f) + points[i + 1] * f, pos


def _catmull_rom(ctrl: np.ndarray, n: int) -> np.ndarray:
    """Catmull-Rom curves through control points (..., K, 2), n samples per interval -> (..., (K-1) n + 1, 2)."""
    k = ctrl.shape[-2]
    ext = np.concatenate([2 * ctrl[..., :1, :] - ctrl[..., 1:2, :], ctrl, 2 * ctrl[..., -1:, :] - ctrl[..., -2:-1, :]],
                         axis=-2)
    p0, p1, p2, p3 = (ext[..., i : i + k - 1, None, :] for i in range(4))
    t = (np.arange(n) / n)[:, None]
    curve = 0.5 * (
        2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3
    )
    return np.concatenate([curve.reshape(*ctrl.shape[:-2], -1, 2), ctrl[..., -1:, :]], axis=-2)


def _smooth_path(ctrl: np.ndarray, spacing: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Catmull-Rom curve through control points (K, 2), every ``spacing`` px -> points (M, 2), control index (M,)."""
    k = len(ctrl)
    longest = np.hypot(*np.diff(ctrl, axis=0).T).max()
    n = int(np.clip(np.ceil(2 * longest / spacing), 4, 4000))
    dense = _catmull_rom(ctrl, n)
    dense_index = np.concatenate([(np.arange(k - 1)[:, None] + np.arange(n)[None, :] / n).ravel(), [k - 1.0]])
    points, pos = _resample(dense, spacing)
    return points, np.interp(pos, np.arange(len(dense), dtype=float), dense_index)


def _wander(start: np.ndarray, heading: float, length: float, bend: float, rng: np.random.Generator) -> np.ndarray:
    """Control points (6, 2) of a random smooth path: ``length`` px from ``start`` (row, col), heading in rad."""
    turns = heading + np.cumsum(rng.normal(0.0, bend, 5))
    steps = (length / 5) * np.stack([np.sin(turns), np.cos(turns)], axis=1)
    return np.concatenate([start[None], start + np.cumsum(steps, axis=0)])


def _normals(points: np.ndarray) -> np.ndarray:
    """Unit normals (N, 2) of a polyline (N, 2), N >= 2."""
    tangent = np.gradient(points, axis=0)
    tangent /= np.maximum(np.hypot(*tangent.T), 1e-9)[:, None]
    return np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)


def _curl(path: np.ndarray, radius: float, turn: float, side: float) -> np.ndarray:
    """Extend a path (N, 2) by an arc of ``radius`` px turning ``turn`` rad (J-tip, pigtail) -> (N + M, 2)."""
    tangent = path[-1] - path[-min(len(path), 4)]
    tangent /= max(float(np.hypot(*tangent)), 1e-9)
    normal = side * np.array([-tangent[1], tangent[0]])
    centre = path[-1] + radius * normal
    a = np.linspace(0.0, turn, max(int(abs(turn) * radius), 4) + 1)[1:, None]
    return np.concatenate([path, centre + radius * (np.sin(a) * tangent - np.cos(a) * normal)])


def _loop_at(path: np.ndarray, index: int, radius: float, side: float) -> np.ndarray:
    """Insert one full loop of ``radius`` px into a path (N, 2) at ``index``, as a catheter that buckles."""
    head = _curl(path[: index + 1], radius, 2 * np.pi, side)
    return np.concatenate([head, path[index + 1 :]])


@dataclass(frozen=True)
class _View:
    """Where anatomy sits in the image: px = size/2 + scale * rot(angle) @ (p - centre), p (row, col) in units."""

    size: int
    centre: np.ndarray
    scale: float
    angle: float

    @property
    def mm_per_px(self) -> float:
        """Detector pixel size projected into the patient."""
        return _UNIT_MM / self.scale

    @property
    def half_extent(self) -> float:
        """Half the image diagonal in anatomy units: anything farther from the centre is out of view."""
        return 0.72 * self.size / self.scale

    def anatomy(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel rows and columns (broadcastable) -> anatomy rows and columns in units."""
        c, s = float(np.cos(self.angle)), float(np.sin(self.angle))
        dr, dc = (rows - self.size / 2) / self.scale, (cols - self.size / 2) / self.scale
        return float(self.centre[0]) + c * dr + s * dc, float(self.centre[1]) - s * dr + c * dc

    def vec(self, d: np.ndarray) -> np.ndarray:
        """Anatomy-unit displacements (..., 2) -> px displacements (..., 2)."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        d = np.asarray(d, dtype=float)
        return self.scale * np.stack([c * d[..., 0] - s * d[..., 1], s * d[..., 0] + c * d[..., 1]], axis=-1)

    def px(self, p: np.ndarray) -> np.ndarray:
        """Anatomy points (..., 2) -> pixel (row, col) (..., 2)."""
        return self.size / 2 + self.vec(np.asarray(p, dtype=float) - self.centre)


def _random_view(size: int, rng: np.random.Generator, zoom: tuple[float, float], centre_rows: tuple[float, float],
                 max_angle_deg: float) -> _View:
    """A field of view: zoom, pan and a small rotation of the C-arm."""
    centre = np.array([rng.uniform(*centre_rows), rng.uniform(-0.07, 0.07)])
    angle = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg))
    return _View(size, centre, size * rng.uniform(*zoom), float(angle))


# --------------------------------------------------------------------------- projection


def _tube(points: np.ndarray, radius: float | np.ndarray, mu_px: float) -> DiscSplats:
    """Disc splats (centres (M, 2), radii (M,), weights (M,)) projecting a cylinder of attenuation ``mu_px`` per px.

    Discs sit a quarter radius apart (the sum then ripples by under 2% along the tube), so a wide
    vessel needs few; each weighs the arc length it stands for.
    """
    radius = np.broadcast_to(np.asarray(radius, dtype=float), (len(points),))
    seg = np.hypot(*np.diff(points, axis=0).T)
    step = np.clip(0.25 * radius, 0.3, 2.0)
    warped = np.concatenate([[0.0], np.cumsum(seg / (0.5 * (step[:-1] + step[1:])))])
    index = np.arange(len(points), dtype=float)
    pos = np.interp(np.linspace(0.0, warped[-1], max(int(np.ceil(warped[-1])), 1) + 1), warped, index)
    i = np.minimum(pos.astype(int), len(points) - 2)
    f = (pos - i)[:, None]
    centres = points[i] * (1 - f) + points[i + 1] * f
    arc = np.interp(pos, index, np.concatenate([[0.0], np.cumsum(seg)]))
    weight = np.zeros(len(arc))
    weight[1:] += 0.5 * np.diff(arc)
    weight[:-1] += 0.5 * np.diff(arc)
    return centres, np.interp(pos, index, radius), mu_px * weight


def _curve_tubes(ctrl: np.ndarray, radius: np.ndarray, mu_px: np.ndarray) -> DiscSplats:
    """Disc splats of R tubes at once: control points (R, K, 2) px, radius (R,) px, attenuation (R,) per px.

    Samples are not evenly spaced along a Catmull-Rom curve, so each disc weighs its own arc length.
    """
    longest = float(np.hypot(*np.moveaxis(np.diff(ctrl, axis=-2), -1, 0)).max())
    curves = _catmull_rom(ctrl, int(np.clip(np.ceil(longest / (0.5 * max(float(radius.min()), 0.6))), 2, 400)))
    seg = np.hypot(*np.moveaxis(np.diff(curves, axis=1), -1, 0))
    arc = np.zeros(curves.shape[:2])
    arc[:, 1:] += seg / 2
    arc[:, :-1] += seg / 2
    m = curves.shape[1]
    return curves.reshape(-1, 2), np.repeat(radius, m), (arc * mu_px[:, None]).ravel()


def _hollow_tube(points: np.ndarray, outer: float | np.ndarray, inner: float | np.ndarray, mu_wall_px: float,
                 mu_lumen_px: float = 0.0) -> list[DiscSplats]:
    """A tube with a wall: chord 2(sqrt(R^2-d^2) - sqrt(r^2-d^2)), so its edges are darker than its centre."""
    return [_tube(points, outer, mu_wall_px), _tube(points, inner, mu_lumen_px - mu_wall_px)]


def _disc(centre: np.ndarray, radius: float, weight: float) -> DiscSplats:
    """One disc splat: a uniform disc of ``radius`` px and height ``weight``, e.g. a sphere-like blob or a CT dot."""
    return np.asarray(centre, dtype=float)[None], np.array([radius]), np.array([weight])


@functools.lru_cache(maxsize=128)
def _disc_spectrum(n: int, radius: float, antialias: float) -> np.ndarray:
    """Spectrum (n, n // 2 + 1) of a unit-height disc of ``radius`` px on an (n, n) grid, Gaussian-smoothed."""
    k = np.hypot(fft.fftfreq(n)[:, None], fft.rfftfreq(n)[None, :])
    arg = 2 * np.pi * k * radius
    airy = np.where(arg > 0, 2 * special.j1(arg) / np.maximum(arg, 1e-12), 1.0)
    return (np.pi * radius**2 * airy * np.exp(-2 * (np.pi * antialias * k) ** 2)).astype(np.float32)


def _splat_levels(y: np.ndarray, x: np.ndarray, radii: np.ndarray, weights: np.ndarray, n: int,
                  levels: np.ndarray, antialias: float) -> np.ndarray:
    """Spectrum (n, n // 2 + 1) of the sum of discs (M,) on a periodic (n, n) grid.

    Each disc is shared between its two nearest radius levels so that its mass (area x height) is
    kept; a disc smaller than the first level takes that level's shape. Centres are splatted
    bilinearly; one FFT per level in use, whatever the number of discs.
    """
    weights = weights * np.minimum(radii / levels[0], 1.0) ** 2
    radii = np.clip(radii, levels[0], levels[-1])
    lower = np.clip(np.searchsorted(levels, radii, side="right") - 1, 0, len(levels) - 2)
    r1, r2 = levels[lower], levels[lower + 1]
    upper_share = np.clip((radii**2 - r1**2) / (r2**2 - r1**2), 0.0, 1.0)
    used, slot = np.unique(np.concatenate([lower, lower + 1]), return_inverse=True)
    shares = np.concatenate([weights * (1 - upper_share), weights * upper_share])
    y, x = np.tile(y, 2), np.tile(x, 2)
    i, j = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - i, x - j
    base = slot * (n * n) + i * n + j
    index = np.concatenate([base, base + 1, base + n, base + n + 1])
    corner = np.concatenate([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
    density = np.zeros(len(used) * n * n, np.float32)
    np.add.at(density, index, (corner * np.tile(shares, 4)).astype(np.float32))
    spectra = fft.rfft2(density.reshape(len(used), n, n), overwrite_x=True)
    total = spectra[0] * _disc_spectrum(n, float(levels[used[0]]), antialias)
    for spectrum, level in zip(spectra[1:], used[1:]):
        total += spectrum * _disc_spectrum(n, float(levels[level]), antialias)
    return total


@functools.lru_cache(maxsize=8)
def _half_grid_shift(n: int) -> np.ndarray:
    """Phase (n // 2, n // 4 + 1) that moves half-grid samples, taken at full-grid 2j + 0.5, onto the full grid."""
    ky = fft.fftfreq(n // 2, d=2.0)[:, None]
    kx = fft.rfftfreq(n // 2, d=2.0)[None, :]
    return (4 * np.exp(-1j * np.pi * (ky + kx))).astype(np.complex64)


def _project(splats: Sequence[DiscSplats], size: int) -> np.ndarray:
    """Sum of all disc splats on the (size, size) grid: the tubes' attenuation line integrals.

    Discs narrower than _WIDE_DISC_PX go on the full grid; wider ones on a half-resolution grid with
    finer radius levels (a quarter of the cost per level), whose spectrum is zero-padded into the
    full one, so wide vessels' edges stay within about a pixel of the analytic chord.
    """
    if not splats:
        return np.zeros((size, size), np.float32)
    centres = np.concatenate([s[0] for s in splats])
    radii = np.concatenate([s[1] for s in splats])
    weights = np.concatenate([s[2] for s in splats])
    # A fixed padding per size keeps the FFT size, and so the cached disc spectra, the same for every
    # image; discs never reach across the padding, so nothing wraps around into view.
    n = 4 * fft.next_fast_len(int(0.31 * size) + 1, real=True)
    pad = (n - size) // 2
    y, x = centres[:, 0] + pad, centres[:, 1] + pad
    keep = (y >= 1) & (y < n - 2) & (x >= 1) & (x < n - 2) & (weights != 0)
    narrow = keep & (radii < _WIDE_DISC_PX)
    wide = keep & ~narrow
    spectrum = np.zeros((n, n // 2 + 1), np.complex64)
    if narrow.any():
        spectrum += _splat_levels(y[narrow], x[narrow], radii[narrow], weights[narrow], n, _NARROW_LEVELS,
                                  _ANTIALIAS_SIGMA)
    if wide.any():
        h = n // 2
        levels = _WIDE_LEVELS[: max(int(np.searchsorted(_WIDE_LEVELS, pad / 2, side="right")), 2)]
        half = _splat_levels((y[wide] - 0.5) / 2, (x[wide] - 0.5) / 2, radii[wide] / 2, weights[wide], h,
                             levels, _ANTIALIAS_SIGMA_HALF) * _half_grid_shift(n)
        # The half grid's Nyquist row and column have no unique place on the full grid; they are dropped.
        spectrum[: h // 2, : h // 2] += half[: h // 2, : h // 2]
        spectrum[n - h // 2 + 1 :, : h // 2] += half[h // 2 + 1 :, : h // 2]
    return fft.irfft2(spectrum, s=(n, n))[pad : pad + size, pad : pad + size].astype(np.float32)


def _add_ellipsoid(p: np.ndarray, centre: np.ndarray, axes: tuple[float, float], angle: float, peak: float,
                   power: float = 2.0) -> None:
    """Add peak * sqrt(1 - |u|^power - |v|^power), the thickness of an ellipsoid-like body, to p (H, W) in place."""
    # Python floats keep the arithmetic in float32 (NumPy scalars would promote it to float64).
    a, b, peak = max(float(axes[0]), 0.5), max(float(axes[1]), 0.5), float(peak)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    half_r, half_c = np.hypot(a * c, b * s), np.hypot(a * s, b * c)
    r0, r1 = max(int(centre[0] - half_r), 0), min(int(centre[0] + half_r) + 2, p.shape[0])
    c0, c1 = max(int(centre[1] - half_c), 0), min(int(centre[1] + half_c) + 2, p.shape[1])
    if r0 >= r1 or c0 >= c1:
        return
    dy = np.arange(r0, r1, dtype=np.float32)[:, None] - float(centre[0])
    dx = np.arange(c0, c1, dtype=np.float32)[None, :] - float(centre[1])
    u = np.abs(dy * c + dx * s) / a
    v = np.abs(dx * c - dy * s) / b
    q = 1 - u * u - v * v if power == 2.0 else 1 - u**power - v**power
    p[r0:r1, c0:c1] += peak * np.sqrt(np.maximum(q, 0.0))


def _smooth_noise(size: int, rng: np.random.Generator, correlation_px: float) -> np.ndarray:
    """Zero-mean, unit-std random field (size, size) with Gaussian correlation length ``correlation_px``."""
    f = max(int(correlation_px // 2), 1)
    coarse = ndimage.gaussian_filter(rng.standard_normal((-(-size // f),) * 2, dtype=np.float32), correlation_px / f,
                                     mode="wrap")
    field = _upsample(coarse, (size, size))
    return field / max(float(field.std()), 1e-9)


def _paint_tube(shape: tuple[int, int], points: np.ndarray, radius: float) -> np.ndarray:
    """Pixels whose centre lies within ``radius`` px of the centreline (N, 2): a device's geometric mask (H, W)."""
    mask = np.zeros(shape, bool)
    if len(points) < 2:
        return mask
    centres, _ = _resample(points, 0.35)
    reach = int(np.ceil(radius)) + 1
    inside = ((centres >= -reach) & (centres < np.array(shape) + reach)).all(axis=1)
    centres = centres[inside]
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1].reshape(2, -1)
    base = np.round(centres).astype(int)
    rows, cols = base[:, :1] + dy, base[:, 1:] + dx
    near = (rows - centres[:, :1]) ** 2 + (cols - centres[:, 1:]) ** 2 <= radius**2
    near &= (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    mask[rows[near], cols[near]] = True
    return mask


# --------------------------------------------------------------------------- vessel trees


@dataclass
class _Vessel:
    """One vessel in px: centreline (N, 2) about 1 px apart, radius (N,), the named segment at each point."""

    name: str
    points: np.ndarray
    radius: np.ndarray
    segment: np.ndarray
    parent: int
    attach: int
    contrast: float


def _vessel_from_ctrl(ctrl_px: np.ndarray, radius_units: Sequence[float], segments: Sequence[str], view: _View,
                      name: str, parent: int, attach: int, contrast: float) -> _Vessel:
    """A vessel through control points (K, 2) px with radius per control point and name per control interval."""
    points, index = _smooth_path(ctrl_px)
    radius = np.interp(index, np.arange(len(radius_units), dtype=float), np.asarray(radius_units) * view.scale)
    seg_index = np.minimum(index.astype(int), len(segments) - 1)
    return _Vessel(name, points, radius, np.asarray(segments)[seg_index], parent, attach, contrast)


def _add_branch(tree: list[_Vessel], view: _View, rng: np.random.Generator, parent: int, at: float,
                offsets: Sequence[tuple[float, float]], radius: tuple[float, float], name: str,
                jitter: float) -> int:
    """Append a named branch leaving ``tree[parent]`` at arc fraction ``at`` along ``offsets`` (units); its index."""
    host = tree[parent]
    attach = int(np.clip(round(at * (len(host.points) - 1)), 1, len(host.points) - 2))
    steps = np.asarray(offsets, dtype=float) + rng.normal(0.0, jitter, (len(offsets), 2))
    ctrl = np.concatenate([host.points[attach][None], host.points[attach] + view.vec(np.cumsum(steps, axis=0))])
    radii = np.linspace(radius[0], radius[1], len(ctrl))
    contrast = host.contrast * rng.uniform(0.7, 1.0)
    tree.append(_vessel_from_ctrl(ctrl, radii, [name], view, name, parent, attach, contrast))
    return len(tree) - 1


def _add_side_branches(tree: list[_Vessel], host: int, count: int, rng: np.random.Generator,
                       length_px: tuple[float, float], depth: int = 1) -> None:
    """Append small unnamed tapering branches (devices never enter them) to ``tree[host]``, recursively."""
    parent = tree[host]
    if len(parent.points) < 8:
        return
    normals = _normals(parent.points)
    for _ in range(count):
        attach = int(rng.integers(2, len(parent.points) - 2))
        side = rng.choice([-1.0, 1.0])
        tangent = np.array([normals[attach, 1], -normals[attach, 0]])
        direction = np.arctan2(tangent[0], tangent[1]) + side * rng.uniform(0.6, 1.4)
        ctrl = _wander(parent.points[attach], direction, rng.uniform(*length_px), 0.35, rng)
        r0 = parent.radius[attach] * rng.uniform(0.25, 0.5)
        points, index = _smooth_path(ctrl)
        radius = np.maximum(r0 * (1 - 0.6 * index / index[-1]), 0.35)
        contrast = parent.contrast * rng.uniform(0.6, 1.0)
        tree.append(_Vessel("", points, radius, np.full(len(points), ""), host, attach, contrast))
        if depth > 1 and rng.random() < 0.6:
            _add_side_branches(tree, len(tree) - 1, 1, rng, (length_px[0] * 0.5, length_px[1] * 0.5), depth - 1)


def _thorax_tree(view: _View, rng: np.random.Generator, species: str, jitter: float, side_branches: bool
                 ) -> list[_Vessel]:
    """Aorta with named arch branches: human (3 arch branches) or pig (2, with a bicarotid trunk)."""
    w, h, top = rng.uniform(0.12, 0.22), rng.uniform(0.08, 0.15), rng.uniform(-0.32, -0.2)
    dc, ac = w / 2 + rng.uniform(-0.01, 0.02), -w / 2
    ctrl = np.array([(1.1, dc + 0.01), (0.55, dc), (0.15, dc), (top + 0.9 * h, dc), (top + 0.3 * h, 0.8 * dc),
                     (top, 0.05 * w), (top + 0.25 * h, 0.85 * ac), (top + 0.8 * h, ac),
                     (top + h + 0.12, 0.95 * ac), (top + h + 0.24, 0.4 * ac)])
    ctrl[1:-1] += rng.normal(0.0, jitter, (len(ctrl) - 2, 2))
    segments = ["descending_aorta"] * 3 + ["aortic_arch"] * 4 + ["ascending_aorta"] * 2
    radii = np.array([0.042, 0.044, 0.045, 0.047, 0.049, 0.05, 0.052, 0.055, 0.056, 0.058]) * rng.uniform(0.8, 1.15)
    tree = [_vessel_from_ctrl(view.px(ctrl), radii, segments, view, "aorta", -1, 0, 1.0)]
    arch = np.flatnonzero(tree[0].segment == "aortic_arch")
    n = len(tree[0].points) - 1

    def at(fraction: float) -> float:
        return (arch[0] + fraction * (arch[-1] - arch[0])) / n

    rs = rng.uniform(0.85, 1.15)
    if species == "human":
        bct = _add_branch(tree, view, rng, 0, at(0.72), [(-0.035, -0.01), (-0.04, -0.012)], (0.024 * rs, 0.021 * rs),
                          "brachiocephalic", jitter)
        _add_branch(tree, view, rng, bct, 0.97, [(-0.1, 0.0), (-0.12, 0.01), (-0.2, 0.0)], (0.014 * rs, 0.012 * rs),
                    "right_common_carotid", jitter)
        _add_branch(tree, view, rng, bct, 0.97, [(-0.03, -0.05), (0.0, -0.1), (0.04, -0.12), (0.06, -0.15)],
                    (0.017 * rs, 0.013 * rs), "right_subclavian", jitter)
        _add_branch(tree, view, rng, 0, at(0.5), [(-0.08, 0.005), (-0.12, 0.0), (-0.2, 0.01)],
                    (0.014 * rs, 0.012 * rs), "left_common_carotid", jitter)
    else:
        bct = _add_branch(tree, view, rng, 0, at(0.65), [(-0.05, -0.01), (-0.08, -0.015)], (0.026 * rs, 0.022 * rs),
                          "brachiocephalic", jitter)
        _add_branch(tree, view, rng, bct, 0.6, [(-0.02, -0.06), (0.01, -0.11), (0.05, -0.13)],
                    (0.016 * rs, 0.012 * rs), "right_subclavian", jitter)
        bic = _add_branch(tree, view, rng, bct, 0.97, [(-0.06, 0.0), (-0.04, 0.0)], (0.017 * rs, 0.016 * rs),
                          "bicarotid_trunk", jitter)
        _add_branch(tree, view, rng, bic, 0.97, [(-0.1, -0.02), (-0.2, -0.02)], (0.012 * rs, 0.011 * rs),
                    "right_common_carotid", jitter)
        _add_branch(tree, view, rng, bic, 0.97, [(-0.1, 0.02), (-0.2, 0.02)], (0.012 * rs, 0.011 * rs),
                    "left_common_carotid", jitter)
    _add_branch(tree, view, rng, 0, at(0.3), [(-0.06, 0.02), (-0.04, 0.08), (0.0, 0.12), (0.04, 0.14), (0.06, 0.15)],
                (0.018 * rs, 0.014 * rs), "left_subclavian", jitter)
    if side_branches:
        length = (0.05 * view.scale, 0.16 * view.scale)
        descending = np.flatnonzero(tree[0].segment == "descending_aorta")
        for _ in range(int(rng.integers(3, 9))):
            _add_intercostal(tree, int(rng.choice(descending[2:-2])), rng, length)
        for host in range(1, len(tree)):
            if tree[host].name:
                _add_side_branches(tree, host, int(rng.integers(0, 3)), rng, length, depth=2)
    return tree


def _add_intercostal(tree: list[_Vessel], attach: int, rng: np.random.Generator, length_px: tuple[float, float]
                     ) -> None:
    """Append a thin artery leaving the descending aorta sideways, as intercostal arteries do."""
    host = tree[0]
    heading = 0.0 if rng.random() < 0.5 else np.pi
    ctrl = _wander(host.points[attach], heading + rng.normal(0.0, 0.25), rng.uniform(*length_px), 0.25, rng)
    points, index = _smooth_path(ctrl)
    radius = np.maximum(host.radius[attach] * rng.uniform(0.1, 0.16) * (1 - 0.5 * index / index[-1]), 0.35)
    tree.append(_Vessel("", points, radius, np.full(len(points), ""), 0, attach, rng.uniform(0.4, 0.9)))


def _abdomen_tree(view: _View, rng: np.random.Generator, jitter: float, side_branches: bool) -> list[_Vessel]:
    """Abdominal aorta entered from the right iliac, with renal, mesenteric, coeliac and left iliac branches."""
    ac = rng.uniform(0.0, 0.05)
    bif = rng.uniform(0.35, 0.5)
    ctrl = np.array([(1.1, -0.24), (0.8, -0.16), (bif + 0.12, -0.07), (bif, ac), (0.2, ac), (-0.1, ac + 0.01),
                     (-0.45, ac), (-1.0, ac)])
    ctrl[1:-1] += rng.normal(0.0, jitter, (len(ctrl) - 2, 2))
    segments = ["right_iliac"] * 3 + ["abdominal_aorta"] * 4
    radii = np.array([0.026, 0.028, 0.03, 0.036, 0.04, 0.042, 0.045, 0.046]) * rng.uniform(0.85, 1.15)
    tree = [_vessel_from_ctrl(view.px(ctrl), radii, segments, view, "aorta", -1, 0, 1.0)]
    aorta = np.flatnonzero(tree[0].segment == "abdominal_aorta")
    n = len(tree[0].points) - 1

    def at(row: float) -> float:
        return aorta[0] / n + (bif - row) / (bif + 1.0) * (aorta[-1] - aorta[0]) / n

    _add_branch(tree, view, rng, 0, aorta[0] / n, [(0.12, 0.07), (0.2, 0.07), (0.3, 0.08)], (0.03, 0.026),
                "left_common_iliac", jitter)
    rr = rng.uniform(-0.12, 0.0)
    _add_branch(tree, view, rng, 0, at(rr), [(0.0, -0.06), (0.03, -0.06), (0.03, -0.05)], (0.013, 0.01),
                "right_renal", jitter)
    _add_branch(tree, view, rng, 0, at(rr - 0.04), [(0.0, 0.06), (0.02, 0.06), (0.03, 0.05)], (0.013, 0.01),
                "left_renal", jitter)
    _add_branch(tree, view, rng, 0, at(rr - 0.1), [(0.05, -0.01), (0.15, -0.02), (0.2, -0.03)], (0.012, 0.008),
                "superior_mesenteric", jitter)
    coeliac = _add_branch(tree, view, rng, 0, at(rr - 0.17), [(-0.02, 0.0), (-0.01, 0.01)], (0.012, 0.011),
                          "coeliac", jitter)
    _add_branch(tree, view, rng, coeliac, 0.95, [(-0.02, -0.08), (0.02, -0.1)], (0.009, 0.007), "hepatic", jitter)
    _add_branch(tree, view, rng, coeliac, 0.95, [(-0.03, 0.1), (0.01, 0.1)], (0.009, 0.007), "splenic", jitter)
    if side_branches:
        length = (0.04 * view.scale, 0.12 * view.scale)
        for host in range(len(tree)):
            _add_side_branches(tree, host, int(rng.integers(1, 4)), rng, length, depth=2)
    return tree


def _tree_splats(tree: Sequence[_Vessel], mu_px: float) -> list[DiscSplats]:
    """Disc splats of contrast-filled vessels: each a solid cylinder of ``mu_px`` times its contrast share."""
    return [_tube(v.points, v.radius, mu_px * v.contrast) for v in tree]


# --------------------------------------------------------------------------- anatomy


def _spine(p: np.ndarray, view: _View, rng: np.random.Generator, rows: np.ndarray, col: float, half_width: float,
           height: float, depth_mm: float) -> None:
    """Add vertebrae at ``rows`` (units) in column ``col`` to p (H, W) in place.

    Each vertebra is a cortical shell around a trabecular core (a boxy ellipsoid minus a slightly
    smaller one), with pedicle rings, transverse and spinous processes. Vertebrae do not overlap,
    so every pixel of the spine's strip is computed once, against its nearest vertebra.
    """
    if len(rows) == 0:
        return
    corners = view.px(np.array([[rows[0] - height, col], [rows[-1] + height, col]]))
    reach = 1.8 * half_width * view.scale
    r0, r1 = max(int(corners[:, 0].min() - reach), 0), min(int(corners[:, 0].max() + reach) + 1, p.shape[0])
    c0, c1 = max(int(corners[:, 1].min() - reach), 0), min(int(corners[:, 1].max() + reach) + 1, p.shape[1])
    if r0 >= r1 or c0 >= c1:
        return
    a_row, a_col = view.anatomy(np.arange(r0, r1, dtype=np.float32)[:, None],
                                np.arange(c0, c1, dtype=np.float32)[None, :])
    k = np.clip(np.round((a_row - rows[0]) / height).astype(int), 0, len(rows) - 1)
    widths = (half_width * rng.uniform(0.92, 1.08, len(rows))).astype(np.float32)
    tilts = rng.normal(0.0, 0.03, len(rows)).astype(np.float32)
    du = (a_col - col) / widths[k]
    dv = (a_row - rows.astype(np.float32)[k]) / height - tilts[k] * (a_col - col) / height

    def lump(cv: float, cu: float, av: float, au: float, power: float = 2.0) -> np.ndarray:
        return np.sqrt(np.maximum(1 - np.abs((dv - cv) / av) ** power - np.abs((du - cu) / au) ** power, 0.0))

    shell = 0.93
    bone = (_MU_CORTICAL + _MU_TRABECULAR) * depth_mm * lump(0.0, 0.0, 0.41, 1.0, 3.0)
    bone -= _MU_CORTICAL * shell * depth_mm * lump(0.0, 0.0, 0.41 * shell, shell, 3.0)
    for side in (-1.0, 1.0):
        bone += _MU_CORTICAL * (8 * lump(-0.12, 0.62 * side, 0.2, 0.12) - 5.5 * lump(-0.12, 0.62 * side, 0.14, 0.08))
        bone += _MU_CORTICAL * 5 * lump(-0.1, 1.25 * side, 0.13, 0.35)
    bone += _MU_CORTICAL * 6 * lump(0.28, 0.0, 0.2, 0.12)
    p[r0:r1, c0:c1] += bone


def _ribs(view: _View, rng: np.random.Generator, rows: np.ndarray, spine_col: float, spine_half_width: float,
          reach: float, drop: float, radius_mm: float) -> list[DiscSplats]:
    """Ribs as hollow cortical tubes: posterior arcs from the spine outwards, fainter anterior arcs back in."""
    mm = view.mm_per_px
    row = np.repeat(rows, 2)[:, None]
    side = np.tile([-1.0, 1.0], len(rows))[:, None]
    x0 = spine_half_width * 1.2
    post_rows = row + np.array([-0.02, -0.05, -0.04, 0.25 * drop, 0.6 * drop, drop])
    post_cols = side * np.array([x0, x0 + 0.08, 0.55 * reach, 0.82 * reach, 0.97 * reach, reach])
    post_cols = post_cols + np.linspace(spine_col, 0.3 * spine_col, 6)
    ant_rows = row + np.array([drop, 1.4 * drop, 1.75 * drop, 1.95 * drop])
    ant_cols = side * np.array([reach, 0.95 * reach, 0.7 * reach, 0.42 * reach]) + 0.3 * spine_col
    post = np.stack([post_rows, post_cols], axis=-1)
    ant = np.stack([ant_rows, ant_cols], axis=-1)
    post[:, 1:] += rng.normal(0.0, 0.006, post[:, 1:].shape)
    ant[:, 1:] += rng.normal(0.0, 0.006, ant[:, 1:].shape)
    ant[:, 0] = post[:, -1]
    r = radius_mm * rng.uniform(0.85, 1.15, len(row)) / mm
    inner = r * rng.uniform(0.62, 0.75, len(row))
    cortical, core = np.full(len(row), _MU_CORTICAL * mm), np.full(len(row), (_MU_TRABECULAR - _MU_CORTICAL) * mm)
    post_px, ant_px = view.px(post), view.px(ant)
    return [_curve_tubes(post_px, r, cortical), _curve_tubes(post_px, inner, core),
            _curve_tubes(ant_px, 0.8 * r, 0.6 * cortical), _curve_tubes(ant_px, 0.8 * inner, 0.6 * core)]


def _thorax_anatomy(view: _View, rng: np.random.Generator, species: str, spine_col: float
                    ) -> tuple[np.ndarray, list[DiscSplats]]:
    """Chest attenuation (H, W) and bone/airway splats: body, lungs, heart, spine, ribs, clavicles, trachea.

    ``spine_col`` shifts the posterior structures sideways, as an oblique (LAO/RAO) C-arm angle does.
    """
    size, s, mm = view.size, view.scale, view.mm_per_px
    human = species == "human"
    p = np.zeros((size, size), np.float32)
    body_half = rng.uniform(0.5, 0.7) if human else rng.uniform(0.3, 0.42)
    depth = rng.uniform(200, 270) if human else rng.uniform(170, 230)
    _add_ellipsoid(p, view.px([0.0, rng.uniform(-0.02, 0.02)]), (50 * s, body_half * s), view.angle,
                   _MU_TISSUE * depth)
    air = np.zeros_like(p)
    lung_x, lung_w = (0.21, 0.16) if human else (0.15, 0.11)
    for side in (-1, 1):
        _add_ellipsoid(air, view.px([rng.uniform(-0.08, 0.0), side * lung_x * rng.uniform(0.9, 1.1)]),
                       (rng.uniform(0.34, 0.42) * s, lung_w * rng.uniform(0.9, 1.15) * s),
                       view.angle + side * rng.uniform(0.0, 0.15), rng.uniform(110, 150))
    heart = np.zeros_like(p)
    heart_row, heart_col = rng.uniform(0.12, 0.22), rng.uniform(-0.04, 0.04)
    _add_ellipsoid(heart, view.px([heart_row + 0.03, heart_col + 0.06]),
                   (rng.uniform(0.13, 0.17) * s, rng.uniform(0.12, 0.16) * s), view.angle + rng.uniform(0.3, 0.8),
                   rng.uniform(120, 170))
    _add_ellipsoid(heart, view.px([heart_row - 0.02, heart_col - 0.05]),
                   (rng.uniform(0.09, 0.12) * s, rng.uniform(0.07, 0.1) * s), view.angle, rng.uniform(100, 150))
    _add_ellipsoid(heart, view.px([-0.1, 0.0]), (0.3 * s, 0.06 * s), view.angle, 110)
    p += _MU_AIR * np.maximum(air - heart, 0.0)
    p += rng.uniform(0.05, 0.12) * _smooth_noise(size, rng, 0.03 * s)
    height = rng.uniform(0.1, 0.125) if human else rng.uniform(0.075, 0.09)
    half_width = rng.uniform(0.075, 0.09) if human else rng.uniform(0.05, 0.062)
    reach = body_half * rng.uniform(0.78, 0.9)
    drop = rng.uniform(0.1, 0.16) if human else rng.uniform(0.14, 0.2)
    top, bottom = view.centre[0] - view.half_extent - height, view.centre[0] + view.half_extent + height
    rows = np.arange(top - 2 * drop + rng.uniform(0, height), bottom, height)
    _spine(p, view, rng, rows[rows >= top], spine_col, half_width, height, rng.uniform(26, 32))
    splats = _ribs(view, rng, rows[rows < 0.45], spine_col, half_width, reach, drop, 4.5 if human else 3.5)
    trachea = np.array([(-1.2, 0.0), (-0.6, 0.005), (-0.3, 0.0)]) + rng.normal(0.0, 0.01, (3, 2))
    splats.append(_tube(_smooth_path(view.px(trachea), 2.0)[0], 8.0 / mm, _MU_AIR * mm))
    for side in (-1, 1):
        bronchus = np.array([trachea[-1], trachea[-1] + (0.08, side * 0.06), trachea[-1] + (0.16, side * 0.1)])
        splats.append(_tube(_smooth_path(view.px(bronchus), 2.0)[0], 5.0 / mm, _MU_AIR * mm))
        if human:
            clavicle = np.array([(-0.5, side * 0.06), (-0.53, side * 0.18), (-0.5, side * 0.3), (-0.54, side * 0.42)])
            clavicle += rng.normal(0.0, 0.01, clavicle.shape)
            points = _smooth_path(view.px(clavicle), 2.0)[0]
            splats += _hollow_tube(points, 6.0 / mm, 4.2 / mm, _MU_CORTICAL * mm, _MU_TRABECULAR * mm)
    gas = view.px([rng.uniform(0.3, 0.45), rng.uniform(0.12, 0.25)])
    _add_ellipsoid(p, gas, (rng.uniform(0.03, 0.07) * s, rng.uniform(0.05, 0.09) * s), view.angle,
                   _MU_AIR * rng.uniform(10, 50))
    return p, splats


def _abdomen_anatomy(view: _View, rng: np.random.Generator) -> tuple[np.ndarray, list[DiscSplats]]:
    """Abdominal attenuation (H, W) and bone splats: body, bowel gas, lumbar spine, lower ribs, iliac crests."""
    size, s, mm = view.size, view.scale, view.mm_per_px
    p = np.zeros((size, size), np.float32)
    _add_ellipsoid(p, view.px([0.0, 0.0]), (50 * s, rng.uniform(0.55, 0.75) * s), view.angle,
                   _MU_TISSUE * rng.uniform(220, 300))
    p += rng.uniform(0.05, 0.12) * _smooth_noise(size, rng, 0.03 * s)
    for _ in range(int(rng.integers(4, 16))):
        centre = view.px([rng.uniform(-0.2, 0.6), rng.uniform(-0.45, 0.45)])
        _add_ellipsoid(p, centre, (rng.uniform(0.02, 0.07) * s, rng.uniform(0.02, 0.08) * s),
                       rng.uniform(0, np.pi), _MU_AIR * rng.uniform(8, 40))
    for side in (-1, 1):
        kidney = view.px([rng.uniform(-0.15, -0.05), side * rng.uniform(0.18, 0.24)])
        _add_ellipsoid(p, kidney, (0.1 * s, 0.05 * s), view.angle - side * 0.3, _MU_TISSUE * 0.1 * 60)
    height = rng.uniform(0.13, 0.16)
    half_width = rng.uniform(0.09, 0.11)
    top, bottom = view.centre[0] - view.half_extent - height, view.centre[0] + view.half_extent + height
    rows = np.arange(top + rng.uniform(0, height), min(bottom, 0.5), height)
    _spine(p, view, rng, rows, -0.03, half_width, height, rng.uniform(30, 36))
    splats: list[DiscSplats] = []
    for side in (-1.0, 1.0):
        for k, row in enumerate((-0.55, -0.45)):
            rib = np.array([(row, side * 0.12), (row + 0.06, side * 0.25), (row + 0.14, side * (0.33 - 0.06 * k))])
            points = _smooth_path(view.px(rib + rng.normal(0.0, 0.01, rib.shape)), 2.0)[0]
            splats += _hollow_tube(points, 4.0 / mm, 2.8 / mm, _MU_CORTICAL * mm, _MU_TRABECULAR * mm)
        crest = np.array([(0.75, side * 0.12), (0.55, side * 0.25), (0.45, side * 0.38), (0.5, side * 0.5),
                          (0.7, side * 0.55)])
        points = _smooth_path(view.px(crest + rng.normal(0.0, 0.01, crest.shape)), 2.0)[0]
        splats += _hollow_tube(points, 9.0 / mm, 7.0 / mm, _MU_CORTICAL * mm, _MU_TRABECULAR * mm)
    return p, splats


def _phantom_body(view: _View, rng: np.random.Generator) -> np.ndarray:
    """Homogeneous silicone block (H, W): flat thickness, sharp edges, no bone, no air."""
    p = np.zeros((view.size, view.size), np.float32)
    centre = view.px([rng.uniform(-0.1, 0.2), rng.uniform(-0.1, 0.1)])
    axes = (rng.uniform(0.55, 0.9) * view.scale, rng.uniform(0.35, 0.6) * view.scale)
    _add_ellipsoid(p, centre, axes, view.angle, 0.025 * rng.uniform(60, 120), power=12.0)
    return p


# --------------------------------------------------------------------------- devices and distractors


def _smooth_offsets(n: int, rng: np.random.Generator, wavelength_px: tuple[float, float]) -> np.ndarray:
    """Smooth random values (n,) in [-1, 1]: where a device runs across its vessel's lumen, mostly to one side."""
    s = np.arange(n, dtype=float)
    waves = sum(np.sin(2 * np.pi * s / rng.uniform(*wavelength_px) + rng.uniform(0, 2 * np.pi)) for _ in range(2))
    return np.clip(rng.uniform(-0.7, 0.7) + 0.3 * waves, -1.0, 1.0)


def _route(tree: Sequence[_Vessel], vessel: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centreline from the tree's entry to ``tree[vessel].points[index]``: points (N, 2), radius (N,), segment (N,)."""
    chain = []
    while vessel >= 0:
        chain.append((vessel, index))
        vessel, index = tree[vessel].parent, tree[vessel].attach
    parts = [(tree[v].points[: i + 1], tree[v].radius[: i + 1],
              np.where(tree[v].segment[: i + 1] == "", tree[v].name, tree[v].segment[: i + 1]))
             for v, i in reversed(chain)]
    return tuple(np.concatenate([part[k] if n == 0 else part[k][1:] for n, part in enumerate(parts)])
                 for k in range(3))


def _tip_candidates(tree: Sequence[_Vessel], size: int, segments: Collection[str] | None = None
                    ) -> list[tuple[int, np.ndarray]]:
    """(vessel index, point indices) per named segment where a device tip may stop, at least 10% inside the image.

    A trunk vessel contributes one candidate per named segment, a branch one under its own name;
    ``segments`` keeps only those names.
    """
    margin = 0.1 * size
    candidates = []
    for v, vessel in enumerate(tree):
        if not vessel.name:
            continue
        inside = np.flatnonzero(((vessel.points > margin) & (vessel.points < size - margin)).all(axis=1))
        inside = inside[inside >= 3]
        for name in np.unique(vessel.segment[inside]) if v == 0 else [vessel.name]:
            where = inside[vessel.segment[inside] == name] if v == 0 else inside
            if len(where) and (segments is None or name in segments):
                candidates.append((v, where))
    return candidates


def _pick_tip(tree: Sequence[_Vessel], size: int, rng: np.random.Generator,
              segments: Collection[str] | None = None) -> tuple[int, int]:
    """A named vessel and point index inside the image where a device tip stops (in ``segments`` when given).

    Each segment of the trunk (descending aorta, arch, ...) is as likely as all branches together,
    so that tip positions are spread over the classes a tip-position task would ask about.
    """
    candidates = _tip_candidates(tree, size, segments)
    if not candidates:
        return 0, int(rng.integers(3, len(tree[0].points)))
    n_branches = sum(v != 0 for v, _ in candidates)
    weights = np.array([1.0 if v == 0 else 1.0 / n_branches for v, _ in candidates])
    v, where = candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]
    return v, int(rng.choice(where))


def _devices(tree: Sequence[_Vessel], view: _View, rng: np.random.Generator, guidewire_only: float,
             catheter_only: float, tip_segments: Collection[str] | None = None, loop: bool | None = None,
             wall_mu: tuple[float, float] = (0.3, 0.7)) -> tuple[list[DiscSplats], np.ndarray, dict]:
    """Catheter and guidewire inside the vessel tree: splats, label mask (H, W) in {0, 1, 2}, and their info.

    Both devices enter at the tree's entry and share one centreline; the guidewire runs through the
    catheter and leads beyond its tip. The mask is painted from those centrelines (pixel centre
    within the device radius), catheter over guidewire where both lie. ``tip_segments`` restricts
    where the tip may stop; ``loop`` forces a buckled catheter (True) or a plain one without loop
    or pigtail (False) instead of drawing that by chance (None). ``wall_mu`` bounds the catheter wall's
    excess attenuation per mm (higher for barium-striped, radiopaque lines).
    """
    size, mm = view.size, view.mm_per_px
    draw = rng.random()
    has_catheter, has_guidewire = draw >= guidewire_only, draw < 1 - catheter_only
    vessel, tip = _pick_tip(tree, size, rng, tip_segments)
    # Operators keep the guidewire tip on screen: its lead over the catheter stops at the image edge.
    ahead = tree[vessel].points[tip : tip + int(rng.uniform(0.06, 0.3) * size * has_catheter) + 1]
    in_view = ((ahead > 2) & (ahead < size - 2)).all(axis=1)
    end = tip + (max(int(np.argmin(in_view)) - 1, 0) if not in_view.all() else len(ahead) - 1)
    points, radius, segment = _route(tree, vessel, end)
    n_tip = len(points) - 1 - (end - tip)
    cath_r = max(rng.uniform(0.9, 1.5) / mm, 1.0)
    cath_inner = cath_r * rng.uniform(0.55, 0.75)
    wire_r = max(rng.uniform(0.3, 0.5) / mm, 0.4)
    lateral = _smooth_offsets(len(points), rng, (0.6 * size, 3.0 * size)) * 0.85
    room = ndimage.gaussian_filter1d(np.maximum(radius - (cath_r if has_catheter else wire_r), 0.0), 8.0)
    # A device cannot turn a corner where a branch leaves its parent: smoothing rounds it off.
    centreline = ndimage.gaussian_filter1d(points + _normals(points) * (lateral * room)[:, None],
                                           max(0.3 * float(np.median(radius)), 2.0), axis=0, mode="nearest")
    catheter = centreline[: n_tip + 1]
    looped = has_catheter and (rng.random() < 0.07 if loop is None else loop)
    loop_info = {}
    if looped and loop is None:
        catheter = _loop_at(catheter, int(rng.integers(len(catheter) // 3, len(catheter))),
                            rng.uniform(5, 12) / mm, rng.choice([-1.0, 1.0]))
    elif looped:
        # A forced buckle lies in view and is about as wide as the aortic lumen it forms in.
        in_view = np.flatnonzero(((catheter > 0.1 * size) & (catheter < 0.9 * size)).all(axis=1))
        at = int(rng.choice(in_view)) if len(in_view) else len(catheter) - 1
        catheter = _loop_at(catheter, at, rng.uniform(8, 14) / mm, rng.choice([-1.0, 1.0]))
        loop_info = {"loop_at": [round(float(catheter[at, 0]), 2), round(float(catheter[at, 1]), 2)]}
    pigtail = has_catheter and loop is None and rng.random() < 0.06
    if pigtail:
        # A pigtail catheter curls once its guidewire is pulled back behind the curl.
        wire = catheter
        catheter = _curl(catheter, rng.uniform(3, 5) / mm, rng.uniform(1.7, 2.3) * np.pi, rng.choice([-1.0, 1.0]))
        tip_shape = "straight"
    else:
        wire = np.concatenate([catheter[:-1], centreline[n_tip:]]) if has_catheter else catheter
        beyond = rng.uniform(0, 0.08) * size
        if beyond > 2 and len(wire) > 4:
            heading = float(np.arctan2(*(wire[-1] - wire[-4])))
            wire = np.concatenate([wire, _smooth_path(_wander(wire[-1], heading, beyond, 0.2, rng))[0][1:]])
        tip_shape = str(rng.choice(["j", "angled", "straight"], p=[0.45, 0.35, 0.2]))
        if tip_shape != "straight":
            curl = (2.5, 5.0, 0.8 * np.pi, 1.2 * np.pi) if tip_shape == "j" else (4.0, 8.0, 0.3, 0.7)
            wire = _curl(wire, rng.uniform(*curl[:2]) / mm, rng.uniform(*curl[2:]), rng.choice([-1.0, 1.0]))
    splats: list[DiscSplats] = []
    mask = np.zeros((size, size), np.uint8)
    info: dict = {"tip_segment": str(segment[n_tip]), "looped": bool(looped or pigtail), **loop_info}
    if has_guidewire:
        splats.append(_tube(wire, wire_r, rng.uniform(1.5, 3.0) * mm))
        mask[_paint_tube(mask.shape, wire, max(wire_r, 0.7))] = 2
        info["guidewire"] = _describe_device(wire, wire_r, size) | {"tip_shape": tip_shape}
    else:
        info["guidewire"] = {"present": False}
    if has_catheter:
        wall, lumen = rng.uniform(*wall_mu) * mm, (rng.uniform(0.0, 0.05) * mm if rng.random() < 0.3 else 0.0)
        splats += _hollow_tube(catheter, cath_r, cath_inner, wall, lumen)
        if rng.random() < 0.35:
            # Radiopaque marker band at the tip.
            splats.append(_tube(catheter[-max(int(2.5 * cath_r), 3) :], cath_r, rng.uniform(0.3, 0.6) * mm))
        mask[_paint_tube(mask.shape, catheter, cath_r)] = 1
        info["catheter"] = _describe_device(catheter, cath_r, size) | {"inner_radius_px": round(float(cath_inner), 2)}
    else:
        info["catheter"] = {"present": False}
    return splats, mask, info


def _describe_device(path: np.ndarray, radius_px: float, size: int) -> dict:
    """JSON facts about a device centreline (N, 2) px: tip (row, col), whether it is in view, lengths, radius."""
    inside = ((path >= 0) & (path < size)).all(axis=1)
    step = np.hypot(*np.diff(path, axis=0).T)
    return {"present": True, "tip": [round(float(path[-1, 0]), 2), round(float(path[-1, 1]), 2)],
            "tip_in_view": bool(inside[-1]), "length_px": round(float(step.sum()), 1),
            "visible_length_px": round(float(step[inside[1:] & inside[:-1]].sum()), 1),
            "radius_px": round(float(radius_px), 2)}


def _ecg_leads(view: _View, rng: np.random.Generator, count: int) -> list[DiscSplats]:
    """ECG electrodes (metal snap ring, carbon pad) with their lead wires running out of the field."""
    mm, size = view.mm_per_px, view.size
    splats: list[DiscSplats] = []
    for _ in range(count):
        at = rng.uniform(0.05, 0.95, 2) * size
        splats.append(_disc(at, 10 / mm, 0.02 * 2 * 3))
        ring = _curl(np.array([at + (0, -2.5 / mm), at + (0.1, -2.5 / mm)]), 2.5 / mm, 2 * np.pi, 1.0)
        splats.append(_tube(ring, 0.6 / mm, 0.8 * mm))
        lead = _smooth_path(_wander(at, rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.2) * size, 0.5, rng))[0]
        splats += _hollow_tube(lead, 1.0 / mm, 0.4 / mm, 0.04 * mm, rng.uniform(0.4, 0.9) * mm)
    return splats


def _metal_clutter(view: _View, rng: np.random.Generator, sternal_wires: bool, clips: int) -> list[DiscSplats]:
    """Sternal wire loops along the midline and surgical clips: metal that is not a device."""
    mm = view.mm_per_px
    splats: list[DiscSplats] = []
    if sternal_wires:
        col = rng.uniform(-0.03, 0.03)
        for row in np.linspace(-0.35, 0.15, int(rng.integers(4, 7))) + rng.normal(0, 0.01):
            centre = view.px([row, col])
            loop = _curl(np.array([centre - (0, 4 / mm), centre - (-0.1, 4 / mm)]), 4 / mm, 2.1 * np.pi, 1.0)
            loop = centre + (loop - centre) * np.array([0.5, 1.0])
            splats.append(_tube(loop, 0.5 / mm, 0.9 * mm))
            splats.append(_disc(centre + (0, 4 / mm), 1.2 / mm, 0.9 * mm * 2))
    for _ in range(clips):
        at = view.px([rng.uniform(-0.4, 0.5), rng.uniform(-0.4, 0.4)])
        heading = rng.uniform(0, np.pi)
        for arm in (-0.2, 0.2):
            tip = at + 6 / mm * np.array([np.sin(heading + arm), np.cos(heading + arm)])
            splats.append(_tube(np.array([at, tip]), 0.6 / mm, rng.uniform(0.4, 0.8) * mm))
    return splats


def _pacemaker_lead(view: _View, rng: np.random.Generator) -> list[DiscSplats]:
    """A pacing lead from the upper chest into the heart: a coiled metal tube that is not a catheter."""
    mm = view.mm_per_px
    ctrl = view.px(np.array([(-0.55, -0.35), (-0.45, -0.2), (-0.3, -0.08), (0.0, -0.08), (0.2, 0.0),
                             (0.3, rng.uniform(0.02, 0.12))]) + rng.normal(0, 0.02, (6, 2)))
    points = _smooth_path(ctrl)[0]
    return [_tube(points, 1.0 / mm, 0.45 * mm), _tube(points[-int(8 / mm) :], 1.3 / mm, 0.6 * mm)]


def _endotracheal_tube(view: _View, rng: np.random.Generator) -> list[DiscSplats]:
    """Plastic endotracheal tube down the trachea, with its radiopaque stripe."""
    mm = view.mm_per_px
    ctrl = view.px(np.array([(-1.2, 0.01), (-0.7, 0.0), (-0.4, rng.uniform(-0.01, 0.01))]))
    points = _smooth_path(ctrl)[0]
    stripe = points + _normals(points) * 3.0 / mm
    return _hollow_tube(points, 4.0 / mm, 3.2 / mm, 0.012 * mm) + [_tube(stripe, 0.5 / mm, 0.5 * mm)]


def _phantom_fittings(view: _View, rng: np.random.Generator) -> list[DiscSplats]:
    """Screws, bolts and connector tubing around a silicone phantom."""
    mm, size = view.mm_per_px, view.size
    splats: list[DiscSplats] = []
    for _ in range(int(rng.integers(0, 5))):
        at = rng.uniform(0.0, 1.0, 2) * size
        splats += _hollow_tube(np.array([at, at + (0.01, 0.01)]), 3 / mm, 1.5 / mm, 0.3 * mm)
        splats.append(_disc(at, 3.0 / mm, 0.4 * 6))
    for _ in range(int(rng.integers(0, 3))):
        start = rng.uniform(0.0, 1.0, 2) * size
        tubing = _smooth_path(_wander(start, rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.8) * size, 0.2, rng))[0]
        splats += _hollow_tube(tubing, 4.0 / mm, 3.0 / mm, 0.03 * mm)
    return splats


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


# --------------------------------------------------------------------------- detector and display


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


def _upsample(small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation of a coarse grid (h, w) onto a fine grid ``shape`` spanning the same extent.

    Written as two gathers rather than matrix products: BLAS threads would fight other work for the cores.
    """
    out = small
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lower = np.minimum(pos.astype(int), max(n_in - 2, 0))
        upper = np.minimum(lower + 1, n_in - 1)
        frac = (pos - lower).astype(np.float32)
        frac = frac[:, None] if axis == 0 else frac[None, :]
        out = np.take(out, lower, axis=axis) * (1 - frac) + np.take(out, upper, axis=axis) * frac
    return out


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


# --------------------------------------------------------------------------- domains


@dataclass
class _Scene:
    """What a domain contributes before the devices: anatomy, vessel tree, distractors, acquisition."""

    tissue: np.ndarray
    splats: list[DiscSplats]
    tree: list[_Vessel]
    vessel_mu_px: float
    vessel_cap_px: float | None
    detector: _Detector
    collimator: np.ndarray
    exposed: np.ndarray
    text: bool
    device_odds: tuple[float, float]
    view: _View
    info: dict


def _contrast_mu(rng: np.random.Generator, p_none: float, high: float) -> float:
    """Excess attenuation per mm of iodinated blood: from none (plain fluoroscopy) to a dense injection."""
    return 0.0 if rng.random() < p_none else float(rng.uniform(0.03, high))


def _clinical_scene(size: int, rng: np.random.Generator, anatomy: str | None = None) -> _Scene:
    """Human chest (aortic arch) or abdomen, at low dose, with leads, wires, clips, shutters and burnt-in text.

    ``anatomy`` ("thorax" or "abdomen") fixes the body part instead of drawing it.
    """
    anatomy = anatomy or ("thorax" if rng.random() < 0.65 else "abdomen")
    view = _random_view(size, rng, (0.85, 1.5), (-0.2, 0.15) if anatomy == "thorax" else (-0.15, 0.3), 12)
    mm = view.mm_per_px
    distractors = []
    if anatomy == "thorax":
        tissue, splats = _thorax_anatomy(view, rng, "human", rng.uniform(-0.14, 0.14))
        tree = _thorax_tree(view, rng, "human", 0.012, True)
        if rng.random() < 0.25:
            splats += _metal_clutter(view, rng, True, 0)
            distractors.append("sternal_wires")
        if rng.random() < 0.1:
            splats += _pacemaker_lead(view, rng)
            distractors.append("pacemaker_lead")
    else:
        tissue, splats = _abdomen_anatomy(view, rng)
        tree = _abdomen_tree(view, rng, 0.012, True)
    if rng.random() < 0.6:
        splats += _ecg_leads(view, rng, int(rng.integers(1, 5)))
        distractors.append("ecg_leads")
    if rng.random() < 0.25:
        splats += _metal_clutter(view, rng, False, int(rng.integers(1, 6)))
        distractors.append("clips")
    collimator, exposed = _collimation(size, rng, 0.45, 0.25)
    detector = _Detector(dose=float(np.exp(rng.uniform(np.log(3e3), np.log(4e4)))),
                         psf_px=rng.uniform(0.3, 0.7) / mm, correlation_px=rng.uniform(0.4, 0.8),
                         scatter=rng.uniform(0.1, 0.5), heel=rng.uniform(-0.25, 0.25),
                         range_compression=rng.uniform(0.3, 0.7), edge_enhancement=rng.uniform(0.2, 1.0))
    mu = _contrast_mu(rng, 0.12, 0.15)
    return _Scene(tissue=tissue, splats=splats, tree=tree, vessel_mu_px=mu * mm, vessel_cap_px=None,
                  detector=detector, collimator=collimator, exposed=exposed, text=rng.random() < 0.7,
                  device_odds=(0.12, 0.08), view=view,
                  info={"anatomy": anatomy, "contrast_mu_per_mm": mu, "distractors": distractors})


def _animal_scene(size: int, rng: np.random.Generator) -> _Scene:
    """Pig chest: narrower body, more and steeper ribs, no clavicles, two arch branches, endotracheal tube."""
    view = _random_view(size, rng, (1.0, 1.6), (-0.22, 0.12), 15)
    mm = view.mm_per_px
    tissue, splats = _thorax_anatomy(view, rng, "pig", rng.uniform(-0.1, 0.1))
    tree = _thorax_tree(view, rng, "pig", 0.015, True)
    distractors = []
    if rng.random() < 0.7:
        splats += _endotracheal_tube(view, rng)
        distractors.append("endotracheal_tube")
    if rng.random() < 0.5:
        splats += _ecg_leads(view, rng, int(rng.integers(1, 4)))
        distractors.append("ecg_leads")
    collimator, exposed = _collimation(size, rng, 0.35, 0.15)
    detector = _Detector(dose=float(np.exp(rng.uniform(np.log(4e3), np.log(6e4)))),
                         psf_px=rng.uniform(0.3, 0.8) / mm, correlation_px=rng.uniform(0.4, 0.9),
                         scatter=rng.uniform(0.1, 0.4), heel=rng.uniform(-0.25, 0.25),
                         range_compression=rng.uniform(0.2, 0.6), edge_enhancement=rng.uniform(0.0, 0.8))
    mu = _contrast_mu(rng, 0.12, 0.15)
    return _Scene(tissue=tissue, splats=splats, tree=tree, vessel_mu_px=mu * mm, vessel_cap_px=None,
                  detector=detector, collimator=collimator, exposed=exposed, text=rng.random() < 0.15,
                  device_odds=(0.12, 0.08), view=view,
                  info={"anatomy": "thorax", "contrast_mu_per_mm": mu, "distractors": distractors})


def _constant_radius(tree: list[_Vessel]) -> list[_Vessel]:
    """The same tree with each vessel's radius set to its mean, as moulded or meshed vessels are."""
    for vessel in tree:
        vessel.radius = np.full(len(vessel.radius), float(vessel.radius.mean()))
    return tree


def _phantom_scene(size: int, rng: np.random.Generator) -> _Scene:
    """Silicone phantom: homogeneous block, no bone, sharp-edged channels holding contrast or water, high dose."""
    anatomy = "thorax" if rng.random() < 0.6 else "abdomen"
    view = _random_view(size, rng, (0.8, 1.3), (-0.2, 0.15) if anatomy == "thorax" else (-0.1, 0.3), 20)
    mm = view.mm_per_px
    tissue = _phantom_body(view, rng)
    if anatomy == "thorax":
        tree = _constant_radius(_thorax_tree(view, rng, "human", 0.006, False))
    else:
        tree = _constant_radius(_abdomen_tree(view, rng, 0.006, False))
    collimator, exposed = _collimation(size, rng, 0.3, 0.0)
    detector = _Detector(dose=float(np.exp(rng.uniform(np.log(2e4), np.log(3e5)))),
                         psf_px=rng.uniform(0.25, 0.6) / mm, correlation_px=rng.uniform(0.2, 0.5),
                         scatter=rng.uniform(0.05, 0.2), heel=rng.uniform(-0.15, 0.15),
                         range_compression=rng.uniform(0.0, 0.3), edge_enhancement=rng.uniform(0.0, 0.5))
    water = rng.random() < 0.3
    # Water is slightly less attenuating than silicone, so water-filled channels show up light.
    mu = -0.004 if water else float(rng.uniform(0.02, 0.08))
    return _Scene(tissue=tissue, splats=_phantom_fittings(view, rng), tree=tree, vessel_mu_px=mu * mm,
                  vessel_cap_px=None, detector=detector, collimator=collimator, exposed=exposed,
                  text=rng.random() < 0.1, device_odds=(0.12, 0.08), view=view,
                  info={"anatomy": f"silicone_{anatomy}", "contrast_mu_per_mm": mu,
                        "distractors": ["fittings"], "channels": "water" if water else "contrast"})


def _simulation_scene(size: int, rng: np.random.Generator) -> _Scene:
    """CathSim-like rendering: aortic arch model on a flat background, flat-topped vessels, no noise to speak of."""
    view = _random_view(size, rng, (0.8, 1.25), (-0.2, 0.1), 8)
    mm = view.mm_per_px
    arch = str(rng.choice(["human", "pig"]))
    tree = _constant_radius(_thorax_tree(view, rng, arch, 0.004, False))
    detector = _Detector(dose=float(np.exp(rng.uniform(np.log(3e5), np.log(3e6)))),
                         psf_px=rng.uniform(0.0, 0.25) / mm, correlation_px=0.0, scatter=0.0, heel=0.0,
                         range_compression=0.0, edge_enhancement=0.0)
    mu = float(rng.uniform(0.006, 0.025))
    return _Scene(tissue=np.full((size, size), rng.uniform(0.3, 1.5), np.float32), splats=[], tree=tree,
                  vessel_mu_px=mu * mm, vessel_cap_px=mu * rng.uniform(3, 7), detector=detector,
                  collimator=np.zeros((size, size), np.float32), exposed=np.ones((size, size), bool), text=False,
                  device_odds=(0.25, 0.05), view=view,
                  info={"anatomy": f"{arch}_arch_model", "contrast_mu_per_mm": mu, "distractors": []})


_SCENES = {"clinical": _clinical_scene, "animal": _animal_scene, "phantom": _phantom_scene,
           "simulation": _simulation_scene}


# --------------------------------------------------------------------------- public API


def _check_size(size: int) -> None:
    """Raise ConfigError unless ``size`` is an integer of at least 32 px."""
    if int(size) != size or size < 32:
        raise ConfigError(f"--size {size}: images must be at least 32 px; pass --size 32 or more (default 256)")


def render_fluoro(domain: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """Render one fluoroscopy frame of ``domain``.

    Args:
        domain: one of DOMAINS.
        size: image side in px (>= 32).
        rng: the image's own generator; nothing else is random.

    Returns:
        image: (size, size) uint8, more attenuation darker.
        mask: (size, size) uint8 labels, 0 background, 1 catheter, 2 guidewire (catheter wins where both lie).
        info: JSON-serialisable acquisition and device facts: dose, zoom, tip positions (row, col) in px,
            path lengths, the named vessel segment where the catheter (or lone guidewire) tip lies, loops.

    Raises:
        ConfigError: unknown domain or size below 32.
    """
    choose("--domain", domain, DOMAINS)
    _check_size(size)
    scene = _SCENES[domain](size, rng)
    device_splats, mask, device_info = _devices(scene.tree, scene.view, rng, *scene.device_odds)
    image = _film(scene, device_splats, rng)
    # Devices behind a collimator blade are invisible, so they are not labelled there.
    mask[~scene.exposed] = 0
    return image, mask, _frame_info(domain, size, scene, device_info)


def _film(scene: _Scene, device_splats: list[DiscSplats], rng: np.random.Generator) -> np.ndarray:
    """Project the scene and its devices, expose the detector and display the frame: (H, W) uint8."""
    size = scene.view.size
    vessel_splats = _tree_splats(scene.tree, scene.vessel_mu_px)
    if scene.vessel_cap_px is None:
        p = _project(scene.splats + vessel_splats + device_splats, size)
    else:
        p = np.minimum(_project(vessel_splats, size), scene.vessel_cap_px)
        p += _project(scene.splats + device_splats, size)
    p += scene.tissue + scene.collimator
    log_image = _process(_expose(p, scene.detector, rng), scene.detector)
    image = _to_display(log_image, rng, ndimage.binary_erosion(scene.exposed, iterations=2))
    return _burn_in_text(image, rng) if scene.text else image


def _frame_info(domain: str, size: int, scene: _Scene, device_info: dict) -> dict:
    """JSON facts of a rendered frame: acquisition, view, the scene's own facts and the devices'."""
    info = {"domain": domain, "size": size, "dose": round(scene.detector.dose, 1),
            "psf_sigma_px": round(scene.detector.psf_px, 3), "zoom": round(scene.view.scale / size, 4),
            "view_angle_deg": round(float(np.rad2deg(scene.view.angle)), 2),
            "mm_per_px": round(scene.view.mm_per_px, 4), "exposed_fraction": round(float(scene.exposed.mean()), 4),
            **scene.info, **device_info}
    info["contrast_mu_per_mm"] = round(float(info["contrast_mu_per_mm"]), 5)
    return info


@functools.lru_cache(maxsize=1)
def _retina() -> np.ndarray:
    """Green channel (vessels darkest) of scikit-image's fundus photograph: (1411, 1411) float32 in [0, 1]."""
    # Imported here: scikit-image's data module is slow to import and only this class needs it.
    from skimage import data

    return data.retina()[..., 1].astype(np.float32) / 255


@functools.lru_cache(maxsize=1)
def _retina_half() -> np.ndarray:
    """The fundus green channel at half size (706, 706), low-passed first so that zoomed-out crops do not alias."""
    return ndimage.zoom(ndimage.gaussian_filter(_retina(), 1.0), 0.5, order=1)


def _render_fundus(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of a real fundus photograph (vessels dark): scale, rotation, flip, blur and noise -> uint8."""
    full = _retina()
    side = rng.uniform(0.22, 0.75) * full.shape[0]
    source = _retina_half() if side / size > 2.5 else full
    k = source.shape[0] / full.shape[0]
    disc_radius = 0.46 * full.shape[0]
    reach = max(disc_radius - 0.45 * side, 0.0) * np.sqrt(rng.uniform(0, 1))
    direction = rng.uniform(0, 2 * np.pi)
    centre = full.shape[0] / 2 + reach * np.array([np.sin(direction), np.cos(direction)])
    angle = rng.uniform(0, 2 * np.pi)
    flip = rng.choice([-1.0, 1.0])
    grid = (np.arange(size, dtype=np.float32) - size / 2 + 0.5) * (side / size)
    rr, cc = np.meshgrid(grid, flip * grid, indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    coords = np.stack([centre[0] + c * rr - s * cc, centre[1] + s * rr + c * cc]) * k
    image = ndimage.map_coordinates(source, coords, order=1, mode="constant", cval=0.0)
    image = ndimage.gaussian_filter(image, rng.uniform(0.0, 1.0))
    image += rng.uniform(0.003, 0.02) * rng.standard_normal(image.shape, dtype=np.float32)
    return _to_display(image, rng, dark_is_high=False)


def _ellipse(shape: tuple[int, int], centre: np.ndarray, axes: tuple[float, float], angle: float,
             power: float = 2.0) -> np.ndarray:
    """Boolean mask (H, W) of a rotated (super)ellipse."""
    thickness = np.zeros(shape, np.float32)
    _add_ellipsoid(thickness, centre, axes, angle, 1.0, power)
    return thickness > 0


def _ct_chest(hu: np.ndarray, at: Callable[[float, float], np.ndarray], body: tuple[float, float], contrast: float,
              rng: np.random.Generator) -> list[DiscSplats]:
    """Paint a chest level into hu (H, W): lungs with vessels and bronchi, heart chambers, great vessels, ribs."""
    size = hu.shape[0]
    u = size / 256
    splats: list[DiscSplats] = []
    for side in (-1, 1):
        centre = at(-0.08, side * rng.uniform(0.42, 0.48))
        axes = (rng.uniform(0.62, 0.75) * body[0], rng.uniform(0.33, 0.38) * body[1])
        lung = _ellipse(hu.shape, centre, axes, side * rng.uniform(0.1, 0.3), 2.3)
        hu[lung] = -860.0 + 40.0 * _smooth_noise(size, rng, 3 * u)[lung]
        for _ in range(int(rng.integers(40, 110))):
            where = centre + rng.uniform(-0.85, 0.85, 2) * np.array(axes)
            splats.append(_disc(where, min(rng.exponential(0.9) + 0.4, 3.5) * u, 900.0))
        for _ in range(int(rng.integers(2, 6))):
            start = centre + rng.uniform(-0.5, 0.5, 2) * np.array(axes)
            path = _smooth_path(_wander(start, rng.uniform(0, 2 * np.pi), rng.uniform(8, 25) * u, 0.4, rng))[0]
            splats.append(_tube(path, rng.uniform(0.6, 1.5) * u, 900.0 / (2 * 1.2 * u)))
        bronchus = at(-0.1, side * 0.2)
        splats += [_disc(bronchus, 4.5 * u, 900.0), _disc(bronchus, 3.5 * u, -1000.0 - 40.0)]
    heart = _ellipse(hu.shape, at(-0.28, -0.06), (0.36 * body[0], 0.3 * body[1]), 0.6)
    hu[heart] = 40.0
    chambers = [(-0.32, -0.15, 0.14, 0.1), (-0.2, 0.05, 0.13, 0.09), (-0.1, -0.18, 0.1, 0.08)]
    for row, col, a, b in chambers:
        hu[_ellipse(hu.shape, at(row, col), (a * body[0], b * body[1]), 0.6)] = contrast * rng.uniform(0.5, 1.0)
    for row, col, r in ((-0.05, -0.16, 0.1), (0.3, 0.12, 0.07), (-0.02, 0.08, 0.09)):
        hu[_ellipse(hu.shape, at(row, col), (r * body[0], r * 0.8 * body[1]), 0.0)] = contrast
    for k in range(int(rng.integers(7, 11))):
        t = np.pi * (0.12 + 0.76 * k / 10) * rng.choice([-1, 1]) + rng.normal(0, 0.04)
        rib = at(-0.93 * np.cos(t), 0.93 * np.sin(t))
        hu[_ellipse(hu.shape, rib, (0.03 * size, 0.012 * size), t)] = 850.0
        hu[_ellipse(hu.shape, rib, (0.02 * size, 0.006 * size), t)] = 250.0
    for side in (-1, 1):
        scapula = _ellipse(hu.shape, at(0.62, side * 0.55), (0.2 * body[0], 0.02 * size), side * 1.0)
        hu[scapula] = 700.0
    return splats


def _ct_abdomen(hu: np.ndarray, at: Callable[[float, float], np.ndarray], body: tuple[float, float],
                contrast: float, rng: np.random.Generator) -> list[DiscSplats]:
    """Paint an abdominal level into hu (H, W): fat, liver with vessels, spleen, kidneys, bowel, aorta and IVC."""
    size = hu.shape[0]
    u = size / 256
    splats: list[DiscSplats] = []
    inner = _ellipse(hu.shape, at(-0.05, 0.0), (0.8 * body[0], 0.85 * body[1]), 0.0)
    hu[inner] = -90.0 + 30.0 * _smooth_noise(size, rng, 4 * u)[inner]
    liver_centre, liver_axes = at(-0.1, -0.42), (0.62 * body[0], 0.42 * body[1])
    liver = _ellipse(hu.shape, liver_centre, liver_axes, 0.3, 2.5)
    hu[liver] = 60.0 + 8.0 * _smooth_noise(size, rng, 2 * u)[liver]
    for _ in range(int(rng.integers(3, 8))):
        start = liver_centre + rng.uniform(-0.4, 0.4, 2) * np.array(liver_axes)
        path = _smooth_path(_wander(start, rng.uniform(0, 2 * np.pi), rng.uniform(10, 35) * u, 0.5, rng))[0]
        splats.append(_tube(path, rng.uniform(0.8, 2.2) * u, (contrast - 60.0) / (2 * 1.5 * u)))
    hu[_ellipse(hu.shape, at(-0.2, 0.55), (0.3 * body[0], 0.16 * body[1]), -0.4)] = 55.0
    for side in (-1, 1):
        kidney = at(0.3, side * 0.4)
        hu[_ellipse(hu.shape, kidney, (0.2 * body[0], 0.1 * body[1]), side * 0.5)] = contrast * 0.7
        hu[_ellipse(hu.shape, kidney, (0.1 * body[0], 0.045 * body[1]), side * 0.5)] = 30.0
        hu[_ellipse(hu.shape, at(0.42, side * 0.17), (0.12 * body[0], 0.07 * body[1]), side * 0.2)] = 50.0
    for _ in range(int(rng.integers(6, 16))):
        loop = at(rng.uniform(-0.65, 0.15), rng.uniform(-0.25, 0.6))
        r = rng.uniform(0.03, 0.07) * size
        content = float(rng.choice([-1000.0, 15.0, contrast]))
        hu[_ellipse(hu.shape, loop, (r, r * rng.uniform(0.7, 1.0)), rng.uniform(0, np.pi))] = 45.0
        hu[_ellipse(hu.shape, loop, (0.8 * r, 0.75 * r), rng.uniform(0, np.pi))] = content
    hu[_ellipse(hu.shape, at(0.22, 0.1), (0.065 * body[0], 0.05 * body[1]), 0.0)] = contrast
    hu[_ellipse(hu.shape, at(0.2, -0.12), (0.075 * body[0], 0.06 * body[1]), 0.0)] = 0.6 * contrast
    return splats


def _render_ct_slice(size: int, rng: np.random.Generator) -> np.ndarray:
    """Axial CT-like slice: an attenuation map in HU (body, fat, organs, spine, contrast vessels), CT noise -> uint8."""
    u = size / 256
    hu = np.full((size, size), -1000.0, np.float32)
    centre = size / 2 + rng.uniform(-0.05, 0.05, 2) * size
    body = (rng.uniform(0.3, 0.4) * size, rng.uniform(0.4, 0.47) * size)
    angle = rng.uniform(-0.06, 0.06)

    def at(row: float, col: float) -> np.ndarray:
        c, s = np.cos(angle), np.sin(angle)
        return centre + np.array([c * row * body[0] - s * col * body[1], s * row * body[0] + c * col * body[1]])

    rows, cols = np.mgrid[0:size, 0:size]
    table_top = centre[0] + body[0] * rng.uniform(1.05, 1.2)
    curve = table_top - 0.4 * ((cols - centre[1]) / size) ** 2 * size
    hu[(rows > curve) & (rows < curve + 0.012 * size)] = 150.0
    hu[_ellipse(hu.shape, centre, body, angle, rng.uniform(2.0, 2.6))] = -100.0
    fat = rng.uniform(0.02, 0.06) * size
    hu[_ellipse(hu.shape, centre, (body[0] - fat, body[1] - fat), angle, 2.2)] = 45.0
    contrast = rng.uniform(150, 400)
    if rng.random() < 0.6:
        splats = _ct_chest(hu, at, body, contrast, rng)
    else:
        splats = _ct_abdomen(hu, at, body, contrast, rng)
    for side in (-1, 1):
        hu[_ellipse(hu.shape, at(0.68, side * 0.2), (0.2 * body[0], 0.14 * body[1]), side * 0.3)] = 50.0
    spine = at(0.45, 0.0)
    hu[_ellipse(hu.shape, spine, (0.17 * body[0], 0.13 * body[1]), angle)] = 900.0
    hu[_ellipse(hu.shape, spine, (0.14 * body[0], 0.11 * body[1]), angle)] = 230.0 + 40 * rng.standard_normal()
    hu[_ellipse(hu.shape, at(0.72, 0.0), (0.12 * body[0], 0.1 * body[1]), angle)] = 900.0
    hu[_ellipse(hu.shape, at(0.7, 0.0), (0.07 * body[0], 0.055 * body[1]), angle)] = 20.0
    hu[_ellipse(hu.shape, at(0.9, 0.0), (0.08 * body[0], 0.02 * size), angle + np.pi / 2)] = 800.0
    hu += _project(splats, size)
    hu = ndimage.gaussian_filter(hu, rng.uniform(0.4, 0.9) * u)
    hu += rng.uniform(8, 35) * _smooth_noise(size, rng, rng.uniform(0.6, 1.2) * u)
    window = str(rng.choice(["soft", "lung", "bone"], p=[0.6, 0.3, 0.1]))
    level, width = {"soft": (rng.uniform(30, 60), rng.uniform(300, 500)), "lung": (-600.0, 1500.0),
                    "bone": (400.0, 1800.0)}[window]
    return _to_display(np.clip(hu, level - width / 2, level + width / 2), rng, dark_is_high=False)


def render_pretrain(cls: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one image of pre-training class ``cls`` (a data type, as in the paper's label space) -> uint8 (H, W).

    Raises:
        ConfigError: unknown class or size below 32.
    """
    choose("class", cls, PRETRAIN_CLASSES)
    _check_size(size)
    if cls in DOMAINS:
        return render_fluoro(cls, size, rng)[0]
    if cls == "fundus":
        return _render_fundus(size, rng)
    return _render_ct_slice(size, rng)


def catheter_position(info: dict) -> str | None:
    """The position class of a frame's catheter from its geometry (render_fluoro's info), None if it has none.

    A catheter that buckles into a loop is malpositioned ("looped") wherever its tip lies; otherwise
    the named vessel segment at the tip decides: aortic arch, descending aorta or a supra-aortic branch.
    """
    if not info["catheter"]["present"]:
        return None
    if info["looped"]:
        return "looped"
    return next((cls for cls, names in _POSITION_SEGMENTS.items() if info["tip_segment"] in names), None)


def _is_exposed(exposed: np.ndarray, point: Sequence[float]) -> bool:
    """Whether pixel (row, col) lies in the image and outside the collimator blades."""
    row, col = (int(round(v)) for v in point)
    return 0 <= row < exposed.shape[0] and 0 <= col < exposed.shape[1] and bool(exposed[row, col])


def render_position(cls: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """Render a clinical chest frame whose catheter tip lies in position ``cls`` (one of POSITION_CLASSES).

    The tip is steered into the class's vessel segments (looped: any of them, with a buckle in the
    catheter), and a frame is kept only when :func:`catheter_position` of its geometry gives ``cls``
    and the tip (and the loop) lie in the exposed field, not behind a collimator blade. A catheter
    alone, radiopaque, without guidewire, and no or faint contrast, as on a check film after placement.

    Returns:
        image (size, size) uint8, mask (size, size) uint8 labels as render_fluoro, info with ``position``.

    Raises:
        ConfigError: unknown class or size below 32.
    """
    choose("class", cls, POSITION_CLASSES)
    _check_size(size)
    segments = sum(_POSITION_SEGMENTS.values(), ()) if cls == "looped" else _POSITION_SEGMENTS[cls]
    for _ in range(_POSITION_TRIES):
        scene = _clinical_scene(size, rng, anatomy="thorax")
        if not _tip_candidates(scene.tree, size, segments):
            continue
        # Check films are plain or taken with a faint test injection: the catheter must show against the aorta.
        mu = _contrast_mu(rng, 0.5, 0.03)
        scene.vessel_mu_px, scene.info["contrast_mu_per_mm"] = mu * scene.view.mm_per_px, mu
        device_splats, mask, device_info = _devices(scene.tree, scene.view, rng, 0.0, 1.0, segments,
                                                    loop=cls == "looped", wall_mu=(0.8, 1.6))
        seen = [device_info["catheter"]["tip"], *([device_info["loop_at"]] if "loop_at" in device_info else [])]
        if all(_is_exposed(scene.exposed, point) for point in seen) and catheter_position(device_info) == cls:
            image = _film(scene, device_splats, rng)
            mask[~scene.exposed] = 0
            info = _frame_info("clinical", size, scene, device_info)
            return image, mask, info | {"position": cls}
    raise AssertionError(f"no frame with the catheter tip in {cls} after {_POSITION_TRIES} scenes")


def _image_rng(seed: int, kind: int, group: int, index: int) -> np.random.Generator:
    """The generator of one image: independent of the order and number of images. kind 0 seg, 1 pretrain, 2 position."""
    return np.random.default_rng([seed, kind, group, index])


def _check_out(out: Path) -> None:
    """Raise ConfigError when OUT exists and is not an empty folder, so nothing is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already exists and is not an empty folder; choose another folder or delete it")


def _check_counts(value: int, option: str, seed: int) -> None:
    """Raise ConfigError unless ``value`` >= 1 and the seed is a non-negative integer."""
    if int(value) != value or value < 1:
        raise ConfigError(f"{option} {value}: need at least 1 image; pass {option} 1 or more")
    if int(seed) != seed or seed < 0:
        raise ConfigError(f"--seed {seed}: the seed must be a non-negative integer")


def _save_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 (H, W) array as a greyscale PNG."""
    Image.fromarray(array).save(path, format="PNG")


def _write_atomically(out: Path, fill: Callable[[Path], dict]) -> dict:
    """Build a dataset in a sibling temporary folder with ``fill(tmp) -> manifest`` and rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (unlike tempfile.mkdtemp, which makes it private) gives the folder the user's usual permissions.
    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = fill(tmp)
        write_json(tmp / "manifest.json", manifest)
        _check_out(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def write_seg_dataset(out: Path, domain: str, n: int, size: int = 256, seed: int = 0) -> dict:
    """Write ``n`` fluoroscopy frames of ``domain`` with masks: OUT/images, OUT/masks, OUT/manifest.json.

    Returns:
        The manifest: generator_version, kind "seg", domain, n, size, seed, and per image its name,
        label_counts {background, catheter, guidewire} and info (see render_fluoro).

    Raises:
        ConfigError: unknown domain, n < 1, size < 32, negative seed, or OUT exists and is not empty.
    """
    out = Path(out)
    choose("--domain", domain, DOMAINS)
    _check_counts(n, "--n", seed)
    _check_size(size)
    _check_out(out)
    group = DOMAINS.index(domain)

    def fill(tmp: Path) -> dict:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        images = []
        for i in range(n):
            image, mask, info = render_fluoro(domain, size, _image_rng(seed, 0, group, i))
            name = f"img_{i:05d}.png"
            _save_png(tmp / "images" / name, image)
            _save_png(tmp / "masks" / name, mask)
            counts = np.bincount(mask.ravel(), minlength=3)
            images.append({"name": name, "label_counts": dict(zip(LABEL_NAMES, map(int, counts))), "info": info})
        return {"generator_version": GENERATOR_VERSION, "kind": "seg", "domain": domain, "n": n, "size": size,
                "seed": seed, "images": images}

    manifest = _write_atomically(out, fill)
    logger.info("wrote %d %s frames to %s", n, domain, out)
    return manifest


def write_pretrain_corpus(out: Path, per_class: int, size: int = 256, seed: int = 0,
                          classes: Sequence[str] = PRETRAIN_CLASSES) -> dict:
    """Write ``per_class`` images of each class to OUT/CLASS/img_NNNNN.png plus OUT/manifest.json.

    Returns:
        The manifest: generator_version, kind "pretrain", classes, per_class, size, seed, counts per class.

    Raises:
        ConfigError: unknown or repeated class, no classes, per_class < 1, size < 32, negative seed,
            or OUT exists and is not empty.
    """
    out = Path(out)
    classes = list(classes)
    if not classes:
        raise ConfigError(f"classes: none given; pass some of {', '.join(PRETRAIN_CLASSES)}")
    for cls in classes:
        choose("class", cls, PRETRAIN_CLASSES)
    if len(set(classes)) != len(classes):
        raise ConfigError(f"classes {classes}: a class is listed twice; list each once")
    _check_counts(per_class, "--per-class", seed)
    _check_size(size)
    _check_out(out)

    def fill(tmp: Path) -> dict:
        for cls in classes:
            (tmp / cls).mkdir()
            group = PRETRAIN_CLASSES.index(cls)
            for i in range(per_class):
                _save_png(tmp / cls / f"img_{i:05d}.png", render_pretrain(cls, size, _image_rng(seed, 1, group, i)))
        return {"generator_version": GENERATOR_VERSION, "kind": "pretrain", "classes": classes,
                "per_class": per_class, "size": size, "seed": seed, "counts": {cls: per_class for cls in classes}}

    manifest = _write_atomically(out, fill)
    logger.info("wrote %d images per class for %d classes to %s", per_class, len(classes), out)
    return manifest


def write_position_dataset(out: Path, n: int, size: int = 256, seed: int = 0) -> dict:
    """Write ``n`` chest frames, balanced over POSITION_CLASSES, to OUT/CLASS/img_NNNNN.png plus OUT/manifest.json.

    Class k gets ``n // 4`` images, one more for the first ``n % 4`` classes.

    Returns:
        The manifest: generator_version, kind "position", classes, n, size, seed, counts per class, and
        per image its class, name and info (see render_position).

    Raises:
        ConfigError: n below the number of classes, size < 32, negative seed, or OUT exists and is not empty.
    """
    out = Path(out)
    _check_counts(n, "--n", seed)
    if n < len(POSITION_CLASSES):
        raise ConfigError(f"--n {n}: the position task has {len(POSITION_CLASSES)} classes; "
                          f"pass --n {len(POSITION_CLASSES)} or more")
    _check_size(size)
    _check_out(out)
    counts = {cls: n // len(POSITION_CLASSES) + (k < n % len(POSITION_CLASSES))
              for k, cls in enumerate(POSITION_CLASSES)}

    def fill(tmp: Path) -> dict:
        images = []
        for group, (cls, count) in enumerate(counts.items()):
            (tmp / cls).mkdir()
            for i in range(count):
                image, _, info = render_position(cls, size, _image_rng(seed, 2, group, i))
                name = f"img_{i:05d}.png"
                _save_png(tmp / cls / name, image)
                images.append({"class": cls, "name": name, "info": info})
        return {"generator_version": GENERATOR_VERSION, "kind": "position", "classes": list(POSITION_CLASSES),
                "n": n, "size": size, "seed": seed, "counts": counts, "images": images}

    manifest = _write_atomically(out, fill)
    logger.info("wrote %d position frames (%s) to %s", n, ", ".join(POSITION_CLASSES), out)
    return manifest
