"""Scenes per domain and the renderers: fluoroscopy frames, fundus and CT-slice images, catheter position frames."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fedefm.data.labels import LABEL_NAMES
from fedefm.data.synth.anatomy import (
    _abdomen_anatomy,
    _abdomen_tree,
    _constant_radius,
    _phantom_body,
    _thorax_anatomy,
    _thorax_tree,
    _tree_splats,
    _Vessel,
)
from fedefm.data.synth.devices import (
    WIRE_LABELS,
    _devices,
    _ecg_leads,
    _endotracheal_tube,
    _metal_clutter,
    _pacemaker_lead,
    _phantom_fittings,
    _tip_candidates,
)
from fedefm.data.synth.geometry import (
    _DEVICE_ANTIALIAS_SIGMA,
    _add_ellipsoid,
    _disc,
    DiscSplats,
    _paint_tube,
    _project,
    _random_view,
    _smooth_noise,
    _smooth_path,
    _tube,
    _View,
    _wander,
)
from fedefm.data.synth.physics import (
    _burn_in_text,
    _collimation,
    _detector,
    _Detector,
    _Equipment,
    _expose,
    _process,
    _to_display,
)
from fedefm.errors import ConfigError, choose


DOMAINS: tuple[str, ...] = ("clinical", "animal", "phantom", "simulation")
PRETRAIN_CLASSES: tuple[str, ...] = DOMAINS + ("fundus", "ct_slice")
# The pre-training corpus's label table (labels.json): a mask pixel is an index into it.
PRETRAIN_LABELS: tuple[str, ...] = LABEL_NAMES + ("vessel",)
# The labels each data type's masks carry: what its generator knows and a real source of that kind would annotate
# (device masks in clinical and animal runs, vessel masks of phantoms and CT, both in simulators; a fundus
# photograph's geometry is unknown). In a masked frame 0 means none of its class's labels; others are unknown there.
PRETRAIN_ANNOTATED: dict[str, tuple[str, ...]] = {
    "clinical": ("catheter", "guidewire"), "animal": ("catheter", "guidewire"), "phantom": ("vessel",),
    "simulation": ("catheter", "guidewire", "vessel"), "fundus": (), "ct_slice": ("vessel",),
}

# Catheter tip positions of the downstream position task (sorted, as class folders are read back).
POSITION_CLASSES: tuple[str, ...] = ("aortic_arch", "descending_aorta", "looped", "supra_aortic")
_SUPRA_AORTIC = ("brachiocephalic", "right_common_carotid", "right_subclavian", "left_common_carotid",
                 "left_subclavian")
_POSITION_SEGMENTS = {"aortic_arch": ("aortic_arch",), "descending_aorta": ("descending_aorta",),
                      "supra_aortic": _SUPRA_AORTIC}
_POSITION_TRIES = 50


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


# The X-ray systems behind each domain. Clinical and animal: flat-panel angiography systems in
# low-dose pulsed fluoroscopy (8-80 nGy per frame at the detector, 0.15-0.2 mm pixels read out
# binned 2x2, 70-90 kV), with an anti-scatter grid (scatter 5-25% of the local mean primary, so the
# scatter-to-primary ratio stays near 1 behind the mediastinum and rises only behind dense contrast);
# phantom: a bench set-up at higher dose and lower kV through a thin block; simulation: a
# rendering, practically noise-free, with only a little blur.
_EQUIPMENT = {
    "clinical": _Equipment(kerma_ngy=(8.0, 60.0), kev=(45.0, 55.0), magnification=(1.2, 1.6), pitch_mm=(0.3, 0.4),
                           focal_mm=(0.3, 0.7), motion_mm=(0.0, 0.3), dqe=(0.55, 0.7), scatter=(0.05, 0.25), heel=0.25,
                           range_compression=(0.3, 0.7), edge_enhancement=(0.2, 1.0)),
    "animal": _Equipment(kerma_ngy=(10.0, 80.0), kev=(42.0, 52.0), magnification=(1.2, 1.5), pitch_mm=(0.3, 0.4),
                         focal_mm=(0.3, 0.7), motion_mm=(0.0, 0.3), dqe=(0.55, 0.7), scatter=(0.05, 0.2), heel=0.25,
                         range_compression=(0.2, 0.6), edge_enhancement=(0.0, 0.8)),
    "phantom": _Equipment(kerma_ngy=(50.0, 500.0), kev=(40.0, 50.0), magnification=(1.1, 1.4), pitch_mm=(0.15, 0.4),
                          focal_mm=(0.3, 0.6), motion_mm=(0.0, 0.0), dqe=(0.6, 0.75), scatter=(0.05, 0.2), heel=0.15,
                          range_compression=(0.0, 0.3), edge_enhancement=(0.0, 0.5)),
    "simulation": _Equipment(kerma_ngy=(5e3, 5e4), kev=(50.0, 50.0), magnification=(1.0, 1.0), pitch_mm=(0.0, 0.0),
                             focal_mm=(0.0, 0.0), motion_mm=(0.0, 0.25), dqe=(1.0, 1.0), scatter=(0.0, 0.0), heel=0.0,
                             range_compression=(0.0, 0.0), edge_enhancement=(0.0, 0.0)),
}


# Devices are navigated mostly under plain fluoroscopy, with contrast puffs or an injection in
# some frames: the share of clinical and animal frames without contrast.
_NO_CONTRAST = 0.35


def _contrast_mu(rng: np.random.Generator, p_none: float, high: float) -> float:
    """Excess attenuation per mm of iodinated blood: from none (plain fluoroscopy) to a dense injection."""
    return 0.0 if rng.random() < p_none else float(rng.uniform(0.03, high))


def _patient_scene(domain: str, view: _View, rng: np.random.Generator, tissue: np.ndarray,
                   splats: list[DiscSplats], tree: list[_Vessel], shutters: tuple[float, float], text_odds: float,
                   info: dict) -> _Scene:
    """A patient's scene (clinical or animal) from its anatomy: collimation (odds of shutters, of a round
    field), the domain's acquisition, contrast in the vessels, burnt-in text with ``text_odds``."""
    collimator, exposed = _collimation(view.size, rng, *shutters)
    detector = _detector(view.mm_per_px, _EQUIPMENT[domain], rng)
    mu = _contrast_mu(rng, _NO_CONTRAST, 0.15)
    return _Scene(tissue=tissue, splats=splats, tree=tree, vessel_mu_px=mu * view.mm_per_px, vessel_cap_px=None,
                  detector=detector, collimator=collimator, exposed=exposed, text=rng.random() < text_odds,
                  device_odds=(0.12, 0.08), view=view, info=info | {"contrast_mu_per_mm": mu})


def _clinical_scene(size: int, rng: np.random.Generator, anatomy: str | None = None) -> _Scene:
    """Human chest (aortic arch) or abdomen, at low dose, with leads, wires, clips, shutters and burnt-in text.

    ``anatomy`` ("thorax" or "abdomen") fixes the body part instead of drawing it.
    """
    anatomy = anatomy or ("thorax" if rng.random() < 0.65 else "abdomen")
    view = _random_view(size, rng, (0.85, 1.5), (-0.2, 0.15) if anatomy == "thorax" else (-0.15, 0.3), 12)
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
    return _patient_scene("clinical", view, rng, tissue, splats, tree, (0.45, 0.25), 0.7,
                          {"anatomy": anatomy, "distractors": distractors})


def _animal_scene(size: int, rng: np.random.Generator) -> _Scene:
    """Pig chest: narrower body, more and steeper ribs, no clavicles, two arch branches, endotracheal tube."""
    view = _random_view(size, rng, (1.0, 1.6), (-0.22, 0.12), 15)
    tissue, splats = _thorax_anatomy(view, rng, "pig", rng.uniform(-0.1, 0.1))
    tree = _thorax_tree(view, rng, "pig", 0.015, True)
    distractors = []
    if rng.random() < 0.7:
        splats += _endotracheal_tube(view, rng)
        distractors.append("endotracheal_tube")
    if rng.random() < 0.5:
        splats += _ecg_leads(view, rng, int(rng.integers(1, 4)))
        distractors.append("ecg_leads")
    return _patient_scene("animal", view, rng, tissue, splats, tree, (0.35, 0.15), 0.15,
                          {"anatomy": "thorax", "distractors": distractors})


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
    detector = _detector(mm, _EQUIPMENT["phantom"], rng)
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
    detector = _detector(mm, _EQUIPMENT["simulation"], rng)
    mu = float(rng.uniform(0.006, 0.025))
    return _Scene(tissue=np.full((size, size), rng.uniform(0.3, 1.5), np.float32), splats=[], tree=tree,
                  vessel_mu_px=mu * mm, vessel_cap_px=mu * rng.uniform(3, 7), detector=detector,
                  collimator=np.zeros((size, size), np.float32), exposed=np.ones((size, size), bool), text=False,
                  device_odds=(0.25, 0.05), view=view,
                  info={"anatomy": f"{arch}_arch_model", "contrast_mu_per_mm": mu, "distractors": []})


_SCENES = {"clinical": _clinical_scene, "animal": _animal_scene, "phantom": _phantom_scene,
           "simulation": _simulation_scene}


def _check_size(size: int) -> None:
    """Raise ConfigError unless ``size`` is an integer of at least 32 px."""
    if int(size) != size or size < 32:
        raise ConfigError(f"--size {size}: images must be at least 32 px; pass --size 32 or more (default 256)")


def render_fluoro(domain: str, size: int, rng: np.random.Generator, wire_label: str = "lead"
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Render one fluoroscopy frame of ``domain``.

    Args:
        domain: one of DOMAINS.
        size: image side in px (>= 32).
        rng: the image's own generator; nothing else is random.
        wire_label: one of WIRE_LABELS: "lead" labels the guidewire only beyond the catheter (the
            catheter wins where both lie), "full" along its whole path (the guidewire wins).

    Returns:
        image: (size, size) uint8, more attenuation darker.
        mask: (size, size) uint8 labels, 0 background, 1 catheter, 2 guidewire (where both lie: see wire_label).
        info: JSON-serialisable acquisition and device facts: dose, zoom, tip positions (row, col) in px,
            path lengths, the named vessel segment where the catheter (or lone guidewire) tip lies, loops.

    Raises:
        ConfigError: unknown domain or size below 32.
    """
    image, mask, info, _ = _render_fluoro_scene(domain, size, rng, wire_label)
    return image, mask, info


def _render_fluoro_scene(domain: str, size: int, rng: np.random.Generator, wire_label: str = "lead"
                         ) -> tuple[np.ndarray, np.ndarray, dict, _Scene]:
    """render_fluoro's (image, device mask, info) and the scene they came from."""
    choose("--domain", domain, DOMAINS)
    choose("--wire-label", wire_label, WIRE_LABELS)
    _check_size(size)
    scene = _SCENES[domain](size, rng)
    device_splats, mask, device_info = _devices(scene.tree, scene.view, rng, *scene.device_odds, scene.detector.kev,
                                                wire_label=wire_label)
    image = _film(scene, device_splats, rng)
    # Devices behind a collimator blade are invisible, so they are not labelled there.
    mask[~scene.exposed] = 0
    return image, mask, _frame_info(domain, size, scene, device_info), scene


def _vessel_mask(scene: _Scene) -> np.ndarray:
    """Pixels (H, W) of the scene's vessel lumen in the exposed field; none when the vessels hold no contrast."""
    size = scene.view.size
    mask = np.zeros((size, size), bool)
    if scene.vessel_mu_px == 0:
        return mask
    for vessel in scene.tree:
        mask |= _paint_tube(mask.shape, vessel.points, vessel.radius)
    return mask & scene.exposed


def _film(scene: _Scene, device_splats: list[DiscSplats], rng: np.random.Generator) -> np.ndarray:
    """Project the scene and its devices, expose the detector and display the frame: (H, W) uint8."""
    size = scene.view.size
    vessel_splats = _tree_splats(scene.tree, scene.vessel_mu_px)
    if scene.vessel_cap_px is None:
        p = _project(scene.splats + vessel_splats, size)
    else:
        p = np.minimum(_project(vessel_splats, size), scene.vessel_cap_px) + _project(scene.splats, size)
    p += _project(device_splats, size, _DEVICE_ANTIALIAS_SIGMA) + scene.tissue + scene.collimator
    log_image = _process(_expose(p, scene.detector, rng), scene.detector)
    image = _to_display(log_image, rng, ndimage.binary_erosion(scene.exposed, iterations=2))
    return _burn_in_text(image, rng) if scene.text else image


def _frame_info(domain: str, size: int, scene: _Scene, device_info: dict) -> dict:
    """JSON facts of a rendered frame: acquisition, view, the scene's own facts and the devices'."""
    detector = scene.detector
    info = {"domain": domain, "size": size, "dose": round(detector.dose, 1), "kev": round(detector.kev, 1),
            "magnification": round(detector.magnification, 3), "detector_pitch_mm": round(detector.pitch_mm, 3),
            "psf_sigma_px": round(detector.psf_px, 3), "zoom": round(scene.view.scale / size, 4),
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
              rng: np.random.Generator, vessels: np.ndarray) -> list[DiscSplats]:
    """Paint a chest level into hu (H, W): lungs with vessels and bronchi, heart chambers, great vessels, ribs.

    The contrast-filled great vessels' pixels are marked in ``vessels`` (H, W) bool, in place.
    """
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
        great_vessel = _ellipse(hu.shape, at(row, col), (r * body[0], r * 0.8 * body[1]), 0.0)
        hu[great_vessel] = contrast
        vessels |= great_vessel
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
                contrast: float, rng: np.random.Generator, vessels: np.ndarray) -> list[DiscSplats]:
    """Paint an abdominal level into hu (H, W): fat, liver with vessels, spleen, kidneys, bowel, aorta and IVC.

    The contrast-filled vessels' pixels (liver vessels, aorta, IVC) are marked in ``vessels`` (H, W) bool, in place.
    """
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
        radius = rng.uniform(0.8, 2.2) * u
        splats.append(_tube(path, radius, (contrast - 60.0) / (2 * 1.5 * u)))
        vessels |= _paint_tube(hu.shape, path, radius)
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
    for row, col, axes, share in ((0.22, 0.1, (0.065, 0.05), 1.0), (0.2, -0.12, (0.075, 0.06), 0.6)):
        aorta_or_ivc = _ellipse(hu.shape, at(row, col), (axes[0] * body[0], axes[1] * body[1]), 0.0)
        hu[aorta_or_ivc] = share * contrast
        vessels |= aorta_or_ivc
    return splats


def _render_ct_slice(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Axial CT-like slice: an attenuation map in HU (body, fat, organs, spine, contrast vessels), CT noise.

    Returns:
        image (size, size) uint8 and the contrast-filled vessels' pixels (size, size) bool.
    """
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
    vessels = np.zeros((size, size), bool)
    if rng.random() < 0.6:
        splats = _ct_chest(hu, at, body, contrast, rng, vessels)
    else:
        splats = _ct_abdomen(hu, at, body, contrast, rng, vessels)
    organs = hu.copy()
    for side in (-1, 1):
        hu[_ellipse(hu.shape, at(0.68, side * 0.2), (0.2 * body[0], 0.14 * body[1]), side * 0.3)] = 50.0
    spine = at(0.45, 0.0)
    hu[_ellipse(hu.shape, spine, (0.17 * body[0], 0.13 * body[1]), angle)] = 900.0
    hu[_ellipse(hu.shape, spine, (0.14 * body[0], 0.11 * body[1]), angle)] = 230.0 + 40 * rng.standard_normal()
    hu[_ellipse(hu.shape, at(0.72, 0.0), (0.12 * body[0], 0.1 * body[1]), angle)] = 900.0
    hu[_ellipse(hu.shape, at(0.7, 0.0), (0.07 * body[0], 0.055 * body[1]), angle)] = 20.0
    hu[_ellipse(hu.shape, at(0.9, 0.0), (0.08 * body[0], 0.02 * size), angle + np.pi / 2)] = 800.0
    vessels &= hu == organs  # muscle and spine painted over a vessel hide it
    hu += _project(splats, size)
    hu = ndimage.gaussian_filter(hu, rng.uniform(0.4, 0.9) * u)
    hu += rng.uniform(8, 35) * _smooth_noise(size, rng, rng.uniform(0.6, 1.2) * u)
    window = str(rng.choice(["soft", "lung", "bone"], p=[0.6, 0.3, 0.1]))
    level, width = {"soft": (rng.uniform(30, 60), rng.uniform(300, 500)), "lung": (-600.0, 1500.0),
                    "bone": (400.0, 1800.0)}[window]
    return _to_display(np.clip(hu, level - width / 2, level + width / 2), rng, dark_is_high=False), vessels


def render_pretrain(cls: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one image of pre-training class ``cls`` (a data type, as in the paper's label space) -> uint8 (H, W).

    Raises:
        ConfigError: unknown class or size below 32.
    """
    return render_pretrain_masked(cls, size, rng)[0]


def render_pretrain_masked(cls: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Render one image of pre-training class ``cls`` and its label mask, from the generator's own geometry.

    The image is render_pretrain's for the same generator state (the mask takes no random draws).

    Returns:
        image (size, size) uint8, and mask (size, size) uint8 of indices into PRETRAIN_LABELS holding only the
        class's PRETRAIN_ANNOTATED labels (devices over vessels where both lie), or None for a class without them.

    Raises:
        ConfigError: unknown class or size below 32.
    """
    choose("class", cls, PRETRAIN_CLASSES)
    _check_size(size)
    if cls == "fundus":
        return _render_fundus(size, rng), None
    if cls == "ct_slice":
        image, vessels = _render_ct_slice(size, rng)
        return image, vessels.astype(np.uint8) * PRETRAIN_LABELS.index("vessel")
    image, devices, _, scene = _render_fluoro_scene(cls, size, rng)
    annotated = PRETRAIN_ANNOTATED[cls]
    mask = np.zeros((size, size), np.uint8)
    if "vessel" in annotated:
        mask[_vessel_mask(scene)] = PRETRAIN_LABELS.index("vessel")
    for name in ("guidewire", "catheter"):
        if name in annotated:
            mask[devices == LABEL_NAMES.index(name)] = PRETRAIN_LABELS.index(name)
    return image, mask


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
        device_splats, mask, device_info = _devices(scene.tree, scene.view, rng, 0.0, 1.0, scene.detector.kev,
                                                    segments, loop=cls == "looped", radiopaque=True)
        seen = [device_info["catheter"]["tip"], *([device_info["loop_at"]] if "loop_at" in device_info else [])]
        if all(_is_exposed(scene.exposed, point) for point in seen) and catheter_position(device_info) == cls:
            image = _film(scene, device_splats, rng)
            mask[~scene.exposed] = 0
            info = _frame_info("clinical", size, scene, device_info)
            return image, mask, info | {"position": cls}
    raise AssertionError(f"no frame with the catheter tip in {cls} after {_POSITION_TRIES} scenes")
