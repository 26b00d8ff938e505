"""Anatomy in the beam: named vessel trees (thorax, abdomen), bones, soft-tissue bodies and phantom blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedefm.data.synth.geometry import (
    _add_ellipsoid,
    _curve_tubes,
    DiscSplats,
    _hollow_tube,
    _normals,
    _smooth_noise,
    _smooth_path,
    _tube,
    _View,
    _wander,
)
from fedefm.data.synth.physics import _MU_AIR, _MU_CORTICAL, _MU_TISSUE, _MU_TRABECULAR


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


def _constant_radius(tree: list[_Vessel]) -> list[_Vessel]:
    """The same tree with each vessel's radius set to its mean, as moulded or meshed vessels are."""
    for vessel in tree:
        vessel.radius = np.full(len(vessel.radius), float(vessel.radius.mean()))
    return tree
