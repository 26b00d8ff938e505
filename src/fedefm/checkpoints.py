"""Resumable checkpoints: numbered safetensors files written atomically, each carrying its own checksum.

``RUN/checkpoints/round_NNNNN.safetensors`` (``epoch_NNNNN`` for fine-tuning) holds the tensors a run
needs to go on and, in the safetensors metadata, its scalars and RNG states as JSON, never a pickle.
A file is written to a temporary name, fsynced and renamed (files.atomic_write), so a crash mid-write
leaves the previous checkpoint whole. The metadata holds a SHA-256 over the tensors and the rest of
the metadata; a truncated or altered file fails it, and resuming falls back to the newest file that
passes, with a warning. The newest ``keep`` files stay on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedefm.errors import WeightsError
from fedefm.models.weights import load_weights, save_weights

log = logging.getLogger(__name__)


def checksum(tensors: dict[str, Tensor], metadata: dict[str, Any]) -> str:
    """SHA-256 over the metadata (as sorted JSON) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class CheckpointStore:
    """The numbered checkpoints of one run folder: save the newest, load the newest intact one."""

    def __init__(self, folder: Path, prefix: str = "round", keep: int = 2) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self.keep = keep

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first (temporary files of an interrupted write are not among them)."""
        return sorted(self.folder.glob(f"{self.prefix}_*.safetensors"))

    def save(self, index: int, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Path:
        """Write checkpoint ``index`` atomically with its checksum, then drop all but the newest ``keep``."""
        path = self.folder / f"{self.prefix}_{index:05d}.safetensors"
        save_weights(path, tensors, {"checkpoint": metadata, "checksum": checksum(tensors, metadata)})
        for old in self.paths()[: -self.keep]:
            old.unlink()
        return path

    def verify(self, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Read ``path`` and check its checksum; returns (tensors, checkpoint metadata).

        Raises:
            WeightsError: naming the file, when it is unreadable, truncated or fails its checksum.
        """
        tensors, metadata = load_weights(path)
        if "checkpoint" not in metadata or "checksum" not in metadata:
            raise WeightsError(f"{path}: not a fedefm checkpoint (no checkpoint metadata or checksum)")
        if checksum(tensors, metadata["checkpoint"]) != metadata["checksum"]:
            raise WeightsError(f"{path}: checksum mismatch; the file was altered or damaged after it was written")
        return tensors, metadata["checkpoint"]

    def load_latest(self) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """The newest checkpoint that passes its checksum, or None when there is none at all.

        A damaged newer file is skipped with a logged warning naming it and the file used instead.
        Temporary files left by a write that was killed are removed.

        Raises:
            WeightsError: checkpoints exist but none is intact.
        """
        for stale in self.folder.glob(f".{self.prefix}_*.tmp"):
            stale.unlink()
        paths = self.paths()
        for path in reversed(paths):
            try:
                found = self.verify(path)
            except WeightsError as exc:
                log.warning("skipping damaged checkpoint: %s", exc)
                continue
            if path != paths[-1]:
                log.warning("resuming from the older checkpoint %s", path)
            return found
        if paths:
            raise WeightsError(f"{self.folder}: every checkpoint is damaged ({', '.join(p.name for p in paths)}); "
                               "start the run again with --overwrite")
        return None
