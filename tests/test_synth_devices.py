"""Tests for the devices of the synthetic generator: real product sizes, materials, labels, visibility."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fedefm.data.synth import DOMAINS, render_fluoro
from fedefm.data.synth.devices import (
    _Catheter,
    _catheter_splats,
    _Guidewire,
    _guidewire_splats,
)
from fedefm.data.synth.geometry import _DEVICE_ANTIALIAS_SIGMA, _paint_tube, _project
from fedefm.data.synth.physics import _mixture_mu_per_mm
from fedefm.errors import ConfigError


def _vertical(col: float, size: int = 96) -> np.ndarray:
    """A straight centreline (N, 2) down column ``col``, running past both edges."""
    return np.stack([np.linspace(-20, size + 20, size + 41), np.full(size + 41, col)], axis=1)


@pytest.mark.parametrize(
    "material, kev, expected",
    [
        ("steel", 50.0, (7.9 * 1.96 - 0.227) / 10),  # iron 1.96 cm^2/g, water 0.227 cm^2/g, per mm
        ("steel", 40.0, (7.9 * 3.63 - 0.268) / 10),
        ("platinum", 60.0, (21.45 * 4.0 - 0.206) / 10),
    ],
)
def test_material_attenuation_is_the_tabulated_excess_over_water(material, kev, expected):
    assert _mixture_mu_per_mm({material: 1.0}, kev) == pytest.approx(expected, rel=1e-3)


def test_a_steel_wire_attenuates_more_at_lower_tube_voltage():
    assert _mixture_mu_per_mm({"steel": 1.0}, 45.0) > _mixture_mu_per_mm({"steel": 1.0}, 55.0) > 0


@pytest.mark.parametrize(
    "diameter_inch, pitch_mm, binning, magnification, width_px",
    [
        # width (px) = diameter (mm) * magnification / (pitch * binning); 0.035 inch = 0.889 mm
        (0.035, 0.15, 2, 1.5, 4.445),
        (0.038, 0.2, 2, 1.25, 3.016),
        (0.014, 0.3, 2, 1.2, 0.7112),  # a coronary wire is sub-pixel here: the mask keeps a 1.4 px band
    ],
)
def test_guidewire_sizes_land_in_the_expected_pixel_widths(diameter_inch, pitch_mm, binning, magnification,
                                                            width_px):
    mm_per_px = pitch_mm * binning / magnification
    wire = _Guidewire(diameter_inch, "steel", 0.7, 0.0)
    assert 2 * wire.radius_mm / mm_per_px == pytest.approx(width_px, rel=1e-3)
    # shape: a vertical wire on a 96 x 96 grid; the line integral summed across a row is its cross-section's mass
    line_integral = _project(_guidewire_splats(_vertical(48.3), wire, mm_per_px, 50.0), 96, _DEVICE_ANTIALIAS_SIGMA)
    mu_px = 0.7 * _mixture_mu_per_mm({"steel": 1.0}, 50.0) * mm_per_px
    assert line_integral[48].sum() == pytest.approx(np.pi * (width_px / 2) ** 2 * mu_px, rel=0.03)
    mask_width = _paint_tube((96, 96), _vertical(48.3), max(width_px / 2, 0.7))[48].sum()
    assert abs(mask_width - max(width_px, 1.4)) <= 1.0


@pytest.mark.parametrize("french, pitch_mm, binning, magnification", [(4, 0.15, 2, 1.4), (7, 0.2, 2, 1.2)])
def test_catheter_sizes_land_in_the_expected_pixel_widths(french, pitch_mm, binning, magnification):
    mm_per_px = pitch_mm * binning / magnification
    width_px = french / 3 / mm_per_px  # outer diameter Fr / 3 mm
    catheter = _Catheter(french, 0.25, 0.3, 0.0, False)
    line_integral = _project(_catheter_splats(_vertical(48.3), catheter, mm_per_px, 50.0, 0.0), 96,
                             _DEVICE_ANTIALIAS_SIGMA)
    wall_mu_px = _mixture_mu_per_mm({"baso4": 0.3, "polymer": 0.7}, 50.0) * mm_per_px
    inner_px = width_px / 2 - 0.25 / mm_per_px
    assert line_integral[48].sum() == pytest.approx(np.pi * ((width_px / 2) ** 2 - inner_px**2) * wall_mu_px,
                                                    rel=0.03)
    assert abs(_paint_tube((96, 96), _vertical(48.3), width_px / 2)[48].sum() - width_px) <= 1.0


def _ring_minus_wire(image: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean of the pixels 2-5 px from the guidewire label (and 2 px from any device) minus the label's mean."""
    wire = mask == 2
    if wire.sum() < 3:
        return None
    ring = ndimage.binary_dilation(wire, iterations=5) & ~ndimage.binary_dilation(mask > 0, iterations=2)
    return float(image[ring].mean() - image[wire].mean()) if ring.sum() >= 10 else None


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_wire_is_darker_than_its_surroundings_in_every_domain(domain):
    # shape: 16 frames of 128 x 128; the displayed frame shows more attenuation darker
    gaps = [_ring_minus_wire(*render_fluoro(domain, 128, np.random.default_rng([3, k]))[:2]) for k in range(16)]
    gaps = [gap for gap in gaps if gap is not None]
    assert len(gaps) >= 6
    assert np.mean(gaps) > 2.0  # grey levels
    assert np.mean(np.array(gaps) > 0) >= 0.75


def test_full_wire_label_marks_the_wire_inside_the_catheter_and_leaves_the_pixels_alone():
    found_inside = False
    for k in range(8):
        lead_image, lead, _ = render_fluoro("clinical", 96, np.random.default_rng([4, k]), wire_label="lead")
        full_image, full, _ = render_fluoro("clinical", 96, np.random.default_rng([4, k]), wire_label="full")
        assert np.array_equal(lead_image, full_image)
        assert np.all(full[lead == 2] == 2)  # the lead stays guidewire
        assert np.array_equal(full > 0, lead > 0)  # the same device pixels, only the label differs
        found_inside |= bool(((lead == 1) & (full == 2)).any())
    assert found_inside


def test_unknown_wire_label_raises_config_error():
    with pytest.raises(ConfigError, match="did you mean 'full'"):
        render_fluoro("clinical", 64, np.random.default_rng(0), wire_label="ful")
