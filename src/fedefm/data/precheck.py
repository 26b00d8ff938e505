"""Decode every image of a streamed run before round 1, so a corrupt file stops the run at once, not rounds later.

A run that decodes its images into memory reads every one before training anyway; a run that streams them
from disk (``--data-memory-mb``) would meet a bad file only when a batch draws it. Discovery has already
read every header (``count_frames``); this check decodes the pixels, with a progress bar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedefm.data.readers import read_image
from fedefm.errors import DataError

SHOWN = 5


class ImageItem(Protocol):
    """What the check reads of an item: its file and frame."""

    image: object
    frame: int | None


def check_decodable(items: Sequence[ImageItem], progress: bool = True) -> None:
    """Decode every item's image once (nothing is kept).

    Raises:
        DataError: naming every unreadable file (the first few in full) and the fix.
    """
    bad: list[str] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        for item in bar.track(items, description="checking images"):
            try:
                read_image(item.image, item.frame)
            except DataError as exc:
                bad.append(str(exc))
    if bad:
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise DataError(f"{len(bad)} of {len(items)} images cannot be read: {'; '.join(bad[:SHOWN])}{more}. "
                        "Fix or remove them (fedefm data check lists every one) and start again")
