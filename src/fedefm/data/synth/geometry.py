"""Geometry of the generator: paths, views (anatomy units to px), disc splats and their exact projection."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage, special


# One anatomy unit is 220 mm: at zoom 1 the image spans 220 mm, about a fluoroscopy field of view.
_UNIT_MM = 220.0

# Radius levels (px) of the disc splatting: a disc between two levels is shared between them, which
# blurs its edge by about the level spacing. Narrow discs use geometric levels on the full grid;
# wide ones finer levels on a half-resolution grid (radii in half-resolution px).
_WIDE_DISC_PX = 3.0
_NARROW_LEVELS = 0.4 * 1.5 ** np.arange(7)
_WIDE_LEVELS = 1.5 * 1.15 ** np.arange(50)
_ANTIALIAS_SIGMA = 0.55
# Devices are thinner than a pixel: their discs get about a pixel's own aperture (a 1 px box has
# sigma 0.29 px) instead, so a wire's profile is as deep as the detector would record it.
_DEVICE_ANTIALIAS_SIGMA = 0.3
_ANTIALIAS_SIGMA_HALF = 0.4

DiscSplats = tuple[np.ndarray, np.ndarray, np.ndarray]


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


def _project(splats: Sequence[DiscSplats], size: int, antialias: float = _ANTIALIAS_SIGMA) -> np.ndarray:
    """Sum of all disc splats on the (size, size) grid: the tubes' attenuation line integrals.

    ``antialias`` (px) is the Gaussian that narrow discs are smoothed with (_DEVICE_ANTIALIAS_SIGMA for devices).

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
                                  antialias)
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


def _paint_tube(shape: tuple[int, int], points: np.ndarray, radius: float | np.ndarray) -> np.ndarray:
    """Pixels whose centre lies within ``radius`` px of the centreline (N, 2): a device's or vessel's mask (H, W).

    ``radius`` is one value, or one per centreline point (N,) for a vessel that tapers.
    """
    mask = np.zeros(shape, bool)
    if len(points) < 2:
        return mask
    centres, index = _resample(points, 0.35)
    radii = np.interp(index, np.arange(len(points), dtype=float), np.broadcast_to(radius, len(points)))
    reach = int(np.ceil(radii.max())) + 1
    inside = ((centres >= -reach) & (centres < np.array(shape) + reach)).all(axis=1)
    centres, radii = centres[inside], radii[inside]
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1].reshape(2, -1)
    base = np.round(centres).astype(int)
    rows, cols = base[:, :1] + dy, base[:, 1:] + dx
    near = (rows - centres[:, :1]) ** 2 + (cols - centres[:, 1:]) ** 2 <= radii[:, None] ** 2
    near &= (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    mask[rows[near], cols[near]] = True
    return mask


def _smooth_offsets(n: int, rng: np.random.Generator, wavelength_px: tuple[float, float]) -> np.ndarray:
    """Smooth random values (n,) in [-1, 1]: where a device runs across its vessel's lumen, mostly to one side."""
    s = np.arange(n, dtype=float)
    waves = sum(np.sin(2 * np.pi * s / rng.uniform(*wavelength_px) + rng.uniform(0, 2 * np.pi)) for _ in range(2))
    return np.clip(rng.uniform(-0.7, 0.7) + 0.3 * waves, -1.0, 1.0)


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
