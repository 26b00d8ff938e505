"""Devices and distractors: catheter and guidewire routed through a vessel tree with their mask, and metal clutter."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fedefm.data.synth.anatomy import _Vessel
from fedefm.data.synth.physics import _mixture_mu_per_mm
from fedefm.data.synth.geometry import (
    _curl,
    _disc,
    DiscSplats,
    _hollow_tube,
    _loop_at,
    _normals,
    _paint_tube,
    _smooth_offsets,
    _smooth_path,
    _tube,
    _View,
    _wander,
)


# How the guidewire is labelled where it runs inside the catheter: "lead" labels only the wire's
# lead beyond the catheter (catheter wins where both lie, the default, as a reader of the frame
# would draw it); "full" labels the whole wire path, so the guidewire label runs down the middle of
# the catheter's.
WIRE_LABELS: tuple[str, ...] = ("lead", "full")

_INCH_MM = 25.4
# Products in use for aortic, peripheral and coronary work, and how often each is drawn.
_WIRE_DIAMETERS_INCH = (0.014, 0.018, 0.025, 0.032, 0.035, 0.038)
_WIRE_ODDS = (0.15, 0.1, 0.05, 0.1, 0.5, 0.1)
_CATHETER_FRENCH = (4, 5, 6, 7)
_CATHETER_ODDS = (0.2, 0.4, 0.25, 0.15)
# Mask radius floors (px): a sub-pixel device is still labelled as a connected band.
_WIRE_MASK_MIN_PX = 0.7
_CATHETER_MASK_MIN_PX = 1.0


@dataclass(frozen=True)
class _Guidewire:
    """A guidewire product: diameter, core metal, metal share of its cross-section, radiopaque tip coil length."""

    diameter_inch: float
    core: str
    metal_fill: float
    tip_coil_mm: float

    @property
    def radius_mm(self) -> float:
        """Outer radius in mm."""
        return self.diameter_inch * _INCH_MM / 2


@dataclass(frozen=True)
class _Catheter:
    """A catheter product: French size (outer diameter Fr / 3 mm), wall, barium filler, steel braid, marker band."""

    french: int
    wall_mm: float
    baso4: float
    braid: float
    marker_band: bool

    @property
    def radius_mm(self) -> float:
        """Outer radius in mm."""
        return self.french / 3 / 2


def _draw_guidewire(rng: np.random.Generator) -> _Guidewire:
    """A guidewire as sold: 0.014-0.038 inch, a steel spring coil over a steel core, or a nitinol core in a jacket.

    Steel wires are 60-80% metal across; hydrophilic nitinol wires 35-60%, the rest a polymer jacket.
    Most small (0.014-0.018 inch) wires and some larger ones end in a 2-4 cm platinum coil.
    """
    diameter = float(rng.choice(_WIRE_DIAMETERS_INCH, p=_WIRE_ODDS))
    core = "steel" if rng.random() < 0.55 else "nitinol"
    fill = rng.uniform(0.6, 0.8) if core == "steel" else rng.uniform(0.35, 0.6)
    coil = rng.uniform(20.0, 40.0) if rng.random() < (0.6 if diameter <= 0.018 else 0.3) else 0.0
    return _Guidewire(diameter, core, float(fill), float(coil))


def _draw_catheter(rng: np.random.Generator, radiopaque: bool) -> _Catheter:
    """A catheter as sold: 4-5 Fr diagnostic (wall 0.2-0.3 mm) or 6-7 Fr guiding (thin braided wall 0.12-0.2 mm).

    The polymer holds 20-40% barium sulfate by mass (35-45% for a ``radiopaque`` line on a check
    film); guiding catheters and half the diagnostic ones carry a steel braid (8-15% of the wall).
    """
    french = int(rng.choice(_CATHETER_FRENCH, p=_CATHETER_ODDS))
    wall = rng.uniform(0.2, 0.3) if french <= 5 else rng.uniform(0.12, 0.2)
    baso4 = rng.uniform(0.35, 0.45) if radiopaque else rng.uniform(0.2, 0.4)
    braid = rng.uniform(0.08, 0.15) if french >= 6 or rng.random() < 0.5 else 0.0
    return _Catheter(french, float(wall), float(baso4), float(braid), bool(rng.random() < 0.35))


def _arc_from_end(path: np.ndarray) -> np.ndarray:
    """Arc length (px) from each point of a path (N, 2) to its last point (N,)."""
    step = np.hypot(*np.diff(path, axis=0).T)
    return np.concatenate([np.cumsum(step[::-1])[::-1], [0.0]])


def _guidewire_splats(path: np.ndarray, wire: _Guidewire, mm: float, kev: float) -> list[DiscSplats]:
    """Disc splats of a guidewire along ``path`` (N, 2) px with ``mm`` per px at beam energy ``kev``.

    The wire is a solid tube whose attenuation is its cross-section's mean: metal share times the
    core metal's, the rest jacket (nitinol wires: polyurethane loaded with a tungsten filler, counted as
    barium sulfate of equal weight). A tip coil adds platinum over its length.
    """
    radius = wire.radius_mm / mm
    jacket = 0.0 if wire.core == "steel" else _mixture_mu_per_mm({"baso4": 0.25, "polymer": 0.75}, kev)
    body = wire.metal_fill * _mixture_mu_per_mm({wire.core: 1.0}, kev) + (1 - wire.metal_fill) * jacket
    splats = [_tube(path, radius, body * mm)]
    if wire.tip_coil_mm > 0:
        coil = path[_arc_from_end(path) <= wire.tip_coil_mm / mm]
        if len(coil) >= 2:
            # The coil (about 60% platinum across) replaces the shaft's metal where it is wound.
            splats.append(_tube(coil, radius, (0.6 * _mixture_mu_per_mm({"platinum": 1.0}, kev) - body) * mm))
    return splats


def _catheter_splats(path: np.ndarray, catheter: _Catheter, mm: float, kev: float, lumen_mu_px: float
                     ) -> list[DiscSplats]:
    """Disc splats of a catheter along ``path`` (N, 2) px: a hollow tube of filled polymer and braid, and its band.

    The wall's attenuation is its volume mean: barium-filled polymer, with the braid's share steel.
    A platinum-iridium marker band (1-1.5 mm long, 0.05 mm thick) sits at the tip when the product has one.
    """
    outer = catheter.radius_mm / mm
    inner = (catheter.radius_mm - catheter.wall_mm) / mm
    polymer = _mixture_mu_per_mm({"baso4": catheter.baso4, "polymer": 1 - catheter.baso4}, kev)
    wall = (1 - catheter.braid) * polymer + catheter.braid * _mixture_mu_per_mm({"steel": 1.0}, kev)
    splats = _hollow_tube(path, outer, inner, wall * mm, lumen_mu_px)
    if catheter.marker_band:
        band = path[_arc_from_end(path) <= 1.25 / mm]
        if len(band) < 2:
            band = path[-2:]
        band_inner = (catheter.radius_mm - 0.05) / mm
        splats += _hollow_tube(band, outer, band_inner, _mixture_mu_per_mm({"platinum": 1.0}, kev) * mm)
    return splats


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
             catheter_only: float, kev: float, tip_segments: Collection[str] | None = None,
             loop: bool | None = None, radiopaque: bool = False, wire_label: str = "lead"
             ) -> tuple[list[DiscSplats], np.ndarray, dict]:
    """Catheter and guidewire inside the vessel tree: splats, label mask (H, W) in {0, 1, 2}, and their info.

    Both devices enter at the tree's entry and share one centreline; the guidewire runs through the
    catheter and leads beyond its tip. Sizes and materials are real products' (_draw_guidewire,
    _draw_catheter), attenuating at the beam's effective energy ``kev``. The mask is painted from
    those centrelines (pixel centre within the device radius, at least _WIRE_MASK_MIN_PX and
    _CATHETER_MASK_MIN_PX); where both lie, ``wire_label`` decides (see WIRE_LABELS). ``tip_segments``
    restricts where the tip may stop; ``loop`` forces a buckled catheter (True) or a plain one without
    loop or pigtail (False) instead of drawing that by chance (None); ``radiopaque`` makes the catheter
    a densely barium-filled line, as on a check film.
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
    guidewire, catheter_product = _draw_guidewire(rng), _draw_catheter(rng, radiopaque)
    cath_r, wire_r = catheter_product.radius_mm / mm, guidewire.radius_mm / mm
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
    wire_mask = _paint_tube(mask.shape, wire, max(wire_r, _WIRE_MASK_MIN_PX)) if has_guidewire else None
    if has_guidewire:
        splats += _guidewire_splats(wire, guidewire, mm, kev)
        mask[wire_mask] = 2
        info["guidewire"] = _describe_device(wire, wire_r, size) | {
            "tip_shape": tip_shape, "diameter_inch": guidewire.diameter_inch, "core": guidewire.core,
            "tip_coil_mm": round(guidewire.tip_coil_mm, 1)}
    else:
        info["guidewire"] = {"present": False}
    if has_catheter:
        # A contrast-flushed lumen holds iodine; otherwise saline, which attenuates as tissue does.
        lumen = rng.uniform(0.0, 0.05) * mm if rng.random() < 0.3 else 0.0
        splats += _catheter_splats(catheter, catheter_product, mm, kev, lumen)
        mask[_paint_tube(mask.shape, catheter, max(cath_r, _CATHETER_MASK_MIN_PX))] = 1
        inner = cath_r - catheter_product.wall_mm / mm
        info["catheter"] = _describe_device(catheter, cath_r, size) | {
            "inner_radius_px": round(float(inner), 2), "french": catheter_product.french,
            "baso4": round(catheter_product.baso4, 3), "braided": catheter_product.braid > 0}
    else:
        info["catheter"] = {"present": False}
    if wire_label == "full" and wire_mask is not None:
        mask[wire_mask] = 2
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
