"""Devices and distractors: catheter and guidewire routed through a vessel tree with their mask, and metal clutter."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
from scipy import ndimage

from fedefm.data.synth.anatomy import _Vessel
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


LABEL_NAMES: tuple[str, ...] = ("background", "catheter", "guidewire")


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
