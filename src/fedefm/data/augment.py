"""Training augmentation: MONAI dictionary transforms applied to an image and its mask together.

Geometric transforms (flips, rot90, a small affine) draw once per call and move image and mask
alike; intensity transforms (gamma contrast, Gaussian noise) touch the image only. The mask travels
as per-class shares, interpolated like the image, and is turned back into labels by
:func:`labels_from_shares`: nearest-neighbour resampling would break a rotated 1-2 px guidewire into
dots (6-15 pieces at 5-20 degrees) while the image still shows it as one line. Randomness lives in the transforms' own
generators, seeded by ``seed``: the same seed gives the same sequence of samples.

A DataLoader worker holds a copy of the same generators; reseed each worker, e.g.
``worker_init_fn=lambda worker: dataset.transform.set_random_state(seed + worker)``, or every
worker repeats the same draws.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
)

_KEYS = ("image", "mask")
# Crop centres: a background, catheter or guidewire pixel in this ratio (a class absent from the mask drops out).
CROP_CLASS_RATIOS = (1, 1, 2)
# A warped pixel is foreground where the foreground classes' shares reach this: a rotated 1.4 px wire stays one
# connected line (0.5 breaks it at some angles) and grows by about a third at most.
FOREGROUND_SHARE = 0.3


def labels_from_shares(shares: torch.Tensor) -> torch.Tensor:
    """Per-class shares (C, H, W) of a warped one-hot mask -> labels (H, W) long: the largest foreground class
    wherever the foreground shares sum to FOREGROUND_SHARE, else background (0)."""
    foreground = shares[1:]
    if foreground.shape[0] == 0:
        return torch.zeros(shares.shape[1:], dtype=torch.long)
    return torch.where(foreground.sum(0) >= FOREGROUND_SHARE, foreground.argmax(0) + 1, 0)


class TrainTransforms:
    """Random flips, rot90 and affine on image and mask, gamma and noise on the image; call it on a sample dict.

    A sample is ``{"image": (1, H, W) float in [0, 1], "mask": (H, W) long labels}``; the mask may
    be absent (classification), and holds labels 0, 1, 2. The result has the same keys and dtypes, the image
    clipped to [0, 1]; square samples keep their shape (rot90 swaps H and W of others). With ``crop``, a
    (crop, crop) window centred on a pixel of a class drawn by CROP_CLASS_RATIOS is cut out first
    (segmentation only: it needs the mask).
    """

    def __init__(self, seed: int, keep_orientation: bool = False, crop: int | None = None):
        self.crop = None if crop is None else RandCropByLabelClassesd(
            _KEYS, label_key="mask", spatial_size=(crop, crop), ratios=list(CROP_CLASS_RATIOS),
            num_classes=len(CROP_CLASS_RATIOS), num_samples=1)
        # A label that depends on where things lie in the patient (a catheter tip in the arch, in a right- or a
        # left-side branch) must not be flipped either way or turned by 90 degrees: a mirrored chest swaps
        # the patient's right and left branches. The small affine below keeps the patient's axes.
        flips_and_turns = [RandFlipd(_KEYS, prob=0.5, spatial_axis=0, allow_missing_keys=True),
                           RandFlipd(_KEYS, prob=0.5, spatial_axis=1, allow_missing_keys=True),
                           RandRotate90d(_KEYS, prob=0.5, max_k=3, allow_missing_keys=True)]
        self.transforms = Compose([
            *([] if keep_orientation else flips_and_turns),
            RandAffined(
                _KEYS,
                prob=0.5,
                rotate_range=math.radians(20),
                scale_range=0.15,
                mode="bilinear",
                padding_mode="zeros",
                allow_missing_keys=True,
            ),
            RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
            RandGaussianNoised("image", prob=0.3, std=0.02),
        ])
        self.set_random_state(seed)

    def set_random_state(self, seed: int) -> TrainTransforms:
        """Reseed every transform from ``seed`` (e.g. once per DataLoader worker)."""
        self.transforms.set_random_state(seed)
        if self.crop is not None:
            self.crop.set_random_state(seed + 1)
        return self

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        channel_first = dict(sample)
        if "mask" in sample:
            # One-hot shares (C, H, W); the crop reads them as a one-hot label map.
            channel_first["mask"] = F.one_hot(sample["mask"].long(), len(CROP_CLASS_RATIOS)).permute(2, 0, 1).float()
        with _without_meta_tracking():
            if self.crop is not None:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="no available indices of class")
                    channel_first = self.crop(channel_first)[0]
            out = self.transforms(channel_first)
        result = {**out, "image": out["image"].clamp(0.0, 1.0)}
        if "mask" in sample:
            result["mask"] = labels_from_shares(torch.as_tensor(out["mask"]))
        return result


def train_transforms(seed: int, keep_orientation: bool = False, crop: int | None = None) -> TrainTransforms:
    """Seeded training augmentation for ``{"image": (1, H, W), "mask": (H, W)}`` samples (no flips or turns if asked).

    With ``crop``, samples come out (1, crop, crop) and (crop, crop), centred on devices more often than not.
    """
    return TrainTransforms(seed, keep_orientation, crop)


@contextlib.contextmanager
def _without_meta_tracking() -> Iterator[None]:
    """MetaTensor bookkeeping (for inverting transforms) is unused here and doubles the cost."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)
