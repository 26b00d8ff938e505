"""Cine review of a predicted run: one animated overlay (MP4, or GIF without ffmpeg) and a per-frame device table.

The MP4 is H.264 through imageio-ffmpeg's bundled ffmpeg (yuv420p, so frames are padded with black to even
sides); where that binary is missing the overlay is an animated GIF (Pillow). The frame rate is the source's:
DICOM CineRate, else 1000 / FrameTime (ms), else the caller's default.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pydicom

from fedefm.files import atomic_write

log = logging.getLogger(__name__)

DEFAULT_FPS = 15.0  # a typical fluoroscopy pulse rate, for frames that carry none
TABLE_COLUMNS = ("frame", "source", "source_frame", "catheter_px", "guidewire_px")


def source_frame_rate(header: pydicom.Dataset | None) -> float | None:
    """Frames per second a DICOM header states (CineRate, else 1000 / FrameTime); None when it states none."""
    if header is None:
        return None
    for keyword, to_fps in (("CineRate", float), ("FrameTime", lambda ms: 1000.0 / float(ms))):
        try:
            value = header.get(keyword)
            fps = to_fps(value) if value not in (None, "") else None
        except (TypeError, ValueError, ZeroDivisionError):
            fps = None
        if fps is not None and fps > 0:
            return fps
    return None


def has_ffmpeg() -> bool:
    """Whether imageio-ffmpeg and its ffmpeg binary are installed (else cine overlays are GIFs)."""
    try:
        import imageio_ffmpeg

        return bool(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        return False


def cine_path(out: Path, name: str) -> Path:
    """Where the cine overlay of run ``name`` goes: OUT/NAME_cine.mp4, or .gif without ffmpeg."""
    return out / f"{name}_cine.{'mp4' if has_ffmpeg() else 'gif'}"


def write_cine(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    """Write RGB uint8 frames (H, W, 3) as an animated overlay at ``fps`` (MP4 or GIF by ``path``'s suffix), atomically."""
    if path.suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        with atomic_write(path) as f:
            images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                           duration=round(1000.0 / fps), loop=0)
        return path
    import imageio.v2 as imageio

    partial = path.with_name(f".{path.stem}.partial.mp4")  # ffmpeg picks the container by the suffix
    try:
        with imageio.get_writer(partial, fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1,
                                quality=8) as writer:
            for frame in frames:
                writer.append_data(_pad_even(frame))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _pad_even(frame: np.ndarray) -> np.ndarray:
    """Pad an (H, W, 3) frame with black to even H and W, which yuv420p needs."""
    return np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)))


def device_pixels(labels: np.ndarray) -> tuple[int, int]:
    """(catheter, guidewire) pixel counts of one label map (H, W)."""
    counts = np.bincount(labels.ravel(), minlength=3)
    return int(counts[1]), int(counts[2])


def write_device_table(path: Path, rows: list[tuple[str, str, int, int, int]]) -> Path:
    """Write the per-frame CSV (frame, source, source_frame, catheter_px, guidewire_px) atomically."""
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(TABLE_COLUMNS)
        writer.writerows(rows)
    return path
