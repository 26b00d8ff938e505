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

The package reads in the order its parts depend on each other:

- ``geometry``: paths, views (anatomy units to px), disc splats and their projection;
- ``physics``: materials, collimation, detector exposure, display, burnt-in text;
- ``anatomy``: vessel trees, bones, bodies and phantom blocks;
- ``devices``: catheter and guidewire with their mask, and the metal that is not a device;
- ``domains``: one scene per domain and the renderers (fluoroscopy, fundus, CT slice, position frames);
- ``corpora``: the dataset writers behind ``fedefm synth``.
"""

from fedefm.data.labels import LABEL_NAMES
from fedefm.data.synth.corpora import (
    GENERATOR_VERSION,
    write_position_dataset,
    write_pretrain_corpus,
    write_seg_dataset,
)
from fedefm.data.synth.devices import WIRE_LABELS
from fedefm.data.synth.domains import (
    DOMAINS,
    POSITION_CLASSES,
    PRETRAIN_ANNOTATED,
    PRETRAIN_CLASSES,
    PRETRAIN_LABELS,
    catheter_position,
    render_fluoro,
    render_position,
    render_pretrain,
    render_pretrain_masked,
)

# The projection primitives, which the physics tests check against the analytic chord of a cylinder.
from fedefm.data.synth.geometry import _hollow_tube, _project, _tube  # noqa: F401

__all__ = [
    "DOMAINS",
    "GENERATOR_VERSION",
    "LABEL_NAMES",
    "POSITION_CLASSES",
    "PRETRAIN_ANNOTATED",
    "PRETRAIN_CLASSES",
    "PRETRAIN_LABELS",
    "WIRE_LABELS",
    "catheter_position",
    "render_fluoro",
    "render_position",
    "render_pretrain",
    "render_pretrain_masked",
    "write_position_dataset",
    "write_pretrain_corpus",
    "write_seg_dataset",
]
