"""A pre-training corpus as every driver cuts it, and a silo's images and batches.

The simulator reads the whole corpus and partitions it into silos; a Flower silo reads its own folder
(or, for tests and comparisons, its partition of a corpus); both decode, resize and draw batches the
same way, so the same seed gives the same batches in either.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fedefm.data.datasets import (
    ClassificationDataset,
    ClassificationItem,
    LabelSpec,
    find_classification_splits,
    read_label_mask,
    read_label_spec,
)
from fedefm.data.partition import partition_dirichlet, partition_unseen, silo_class_table, silo_label_table
from fedefm.errors import ConfigError, DataError
from fedefm.federated.algorithms import get_algorithm
from fedefm.federated.config import PretrainConfig
from fedefm.federated.objectives import Batch, is_dense, needs_masks


class ImageSource:
    """Images, labels and (for a dense corpus) masks of a list of items, decoded once into memory or read per batch.

    Both modes decode and resize each image the same way, so a batch holds the same numbers either way.

    Args:
        items: the images, their data-type labels and mask paths.
        size: side every image (and mask) is resized to.
        in_memory: decode everything now (fast) or read the images of each requested batch (bounded memory).
        device: where the returned tensors live.
        spec: the corpus's label table and class names, to read masks with; None for images and labels only.
    """

    def __init__(self, items: list[ClassificationItem], size: int, in_memory: bool, device: torch.device,
                 spec: tuple[LabelSpec, list[str]] | None = None) -> None:
        self.items = items
        self.dataset = ClassificationDataset(items, size)
        self.labels = torch.tensor([item.label for item in items], dtype=torch.long)
        self.device = device
        self.spec = spec
        self.annotated = None if spec is None else annotated_labels(items, *spec)
        self.decoded = self.read(torch.arange(len(items))) if in_memory else None
        self.decoded_masks = self.read_masks(torch.arange(len(items))) if in_memory and spec is not None else None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def read(self, index: torch.Tensor) -> torch.Tensor:
        """Decode the images at ``index`` from disk: (B, 1, size, size) on the source's device."""
        if index.numel() == 0:
            return torch.empty(0, 1, self.dataset.size, self.dataset.size, device=self.device)
        return torch.stack([self.dataset[int(k)]["image"] for k in index]).to(self.device)

    def read_masks(self, index: torch.Tensor) -> torch.Tensor:
        """Decode the masks at ``index``: (B, size, size) int64 label ids, zeros for an image without a mask."""
        size = self.dataset.size
        spec, class_names = self.spec
        masks = [torch.zeros(size, size, dtype=torch.long) if item.mask is None
                 else read_label_mask(item.mask, spec.allowed(class_names[item.label]), size)
                 for item in (self.items[int(k)] for k in index)]
        return torch.stack(masks).to(self.device) if masks else torch.empty(0, size, size, dtype=torch.long)

    def images(self, index: torch.Tensor) -> torch.Tensor:
        """Images at ``index`` (B,): (B, 1, size, size) in [0, 1]."""
        return self.read(index) if self.decoded is None else self.decoded[index.to(self.decoded.device)]

    def batch(self, index: torch.Tensor) -> Batch:
        """The objective's batch of the items at ``index``: images, labels and, for a dense corpus, masks."""
        labels = self.labels[index].to(self.device)
        if self.spec is None:
            return Batch(self.images(index), labels)
        masks = self.read_masks(index) if self.decoded_masks is None else self.decoded_masks[index.to(self.device)]
        return Batch(self.images(index), labels, masks, self.annotated[index].to(self.device))


def annotated_labels(items: list[ClassificationItem], spec: LabelSpec, class_names: list[str]) -> torch.Tensor:
    """(N, L) bool: label l is annotated in item n (its class annotates l and the item has a mask); column 0 False."""
    annotated = torch.zeros(len(items), len(spec.labels), dtype=torch.bool)
    for n, item in enumerate(items):
        if item.mask is not None:
            annotated[n, list(spec.annotated.get(class_names[item.label], ()))] = True
    annotated[:, 0] = False
    return annotated


def decoded_bytes(n_images: int, size: int) -> int:
    """Memory the decoded float32 images take: n x 1 x size x size x 4 bytes."""
    return n_images * size * size * 4


@dataclass
class SiloData:
    """A silo's training images and the seeded generator its batches are drawn from."""

    source: ImageSource
    batch_size: int
    generator: torch.Generator

    def batches(self) -> Iterator[Batch]:
        """Endless random batches (without replacement within a batch); the generator holds all the state."""
        n = len(self.source)
        while True:
            index = torch.randperm(n, generator=self.generator, device=self.generator.device)[: self.batch_size].cpu()
            yield self.source.batch(index)


def partition(cfg: PretrainConfig, labels: list[int]) -> list[np.ndarray]:
    """Silo index arrays of the training items; centralized pools everything into one silo."""
    if get_algorithm(cfg.algorithm).FACTS.pooled:
        return [np.arange(len(labels))]
    if len(labels) < cfg.silos:
        raise ConfigError(f"--silos {cfg.silos}: only {len(labels)} training images; use fewer silos")
    if cfg.partition == "dirichlet":
        return partition_dirichlet(labels, cfg.silos, cfg.alpha, cfg.seed)
    return partition_unseen(labels, cfg.silos, cfg.unseen, cfg.seed)


@dataclass
class Corpus:
    """A pre-training corpus as every driver cuts it: splits, class (data-type) names, the label table, silo indices."""

    splits: dict[str, list[ClassificationItem]]
    class_names: list[str]
    spec: LabelSpec
    silo_indices: list[np.ndarray]

    def model_classes(self, cfg: PretrainConfig) -> list[str]:
        """What the model's outputs are: data types for classify, the corpus's labels for a dense objective."""
        return (list(self.spec.labels) or ["background"]) if is_dense(cfg.objective) else self.class_names

    def source_spec(self, cfg: PretrainConfig) -> tuple[LabelSpec, list[str]] | None:
        """What ImageSource needs to read masks, or None when the objective learns from none."""
        return (self.spec, self.class_names) if needs_masks(cfg.objective) else None


def read_corpus(cfg: PretrainConfig) -> Corpus:
    """The corpus's splits, class names and label table (no silos yet), as every driver reads it.

    Raises:
        DataError: no validation or test images; ``--objective segment`` on a corpus without masks.
        ConfigError: ``--images-only`` names a class the corpus does not hold.
    """
    root = Path(cfg.data)
    splits, class_names = find_classification_splits(root, cfg.seed, cfg.val_fraction, cfg.test_fraction,
                                                     images_only=cfg.images_only)
    if not splits["val"] or not splits["test"]:
        raise DataError(f"{cfg.data}: need validation and test images; raise --val-fraction/--test-fraction")
    spec = read_label_spec(root)
    if needs_masks(cfg.objective):
        for split in ("train", "val"):
            if not any(item.mask is not None and spec.annotated.get(class_names[item.label]) for item in splits[split]):
                raise DataError(f"--objective {cfg.objective}: no {split} image of {cfg.data} has a mask "
                                "(CLASS/masks/NAME.png and labels.json); write them with `fedefm synth pretrain`, "
                                "or pre-train with --objective mim or classify")
    return Corpus(splits, class_names, spec, [])


def silo_partition(cfg: PretrainConfig) -> Corpus:
    """The corpus (read_corpus) with the silos' indices into its training split."""
    corpus = read_corpus(cfg)
    return replace(corpus, silo_indices=partition(cfg, [item.label for item in corpus.splits["train"]]))


def silo_data(cfg: PretrainConfig, corpus: Corpus, items: list[ClassificationItem], silo: int, device: torch.device,
              in_memory: bool = True) -> SiloData:
    """Silo ``silo``'s training images (decoded, or read per batch) and its batch generator seeded from the run's seed."""
    source = ImageSource(items, cfg.image_size, in_memory, device, corpus.source_spec(cfg))
    return SiloData(source, cfg.batch_size, torch.Generator(device=device).manual_seed(cfg.seed * 1000 + silo))


def partition_tables(corpus: Corpus) -> str:
    """The silo × class table and, for a corpus with masks, the silo × label-type table."""
    labels = [item.label for item in corpus.splits["train"]]
    table = silo_class_table(labels, corpus.silo_indices, corpus.class_names)
    if not corpus.spec.annotated:
        return table
    silo_items = [[corpus.splits["train"][k] for k in indices] for indices in corpus.silo_indices]
    return table + "\n\n" + silo_label_table(silo_items, corpus.spec)
