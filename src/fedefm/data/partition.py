"""Silo partitions of a labelled corpus: the paper's unseen ratio, Dirichlet label skew and whole domains.

Every partitioner returns one sorted ``int64`` index array per silo; each index lands in exactly
one silo, no silo is empty (else :class:`~fedefm.errors.ConfigError`), and the result depends only
on the arguments (``np.random.default_rng(seed)``, no global RNG).

**Unseen ratio** r in [0, 1] (paper §1.2; reference/fedefm-paper.md §6, row 2). The C classes
present, in sorted order, get owner silos round-robin: with S silos and m = min(S, C), class k is
owned by every silo s with s mod m = k mod m. Each class's images are shuffled and split into

- a *private* share, round(r * n_k) images, divided evenly among the class's owners, and
- a *shared* share, the other images, dealt round-robin over all S silos (IID).

So r is the fraction of every class that only its owners hold:

- r = 1, S <= C: each silo holds only the classes it owns and no two silos share a class
  (the paper's "100% unseen label corpus"); a silo misses at least C - ceil(C / S) classes;
- r = 1, S > C: each silo owns exactly one class and holds nothing else; the S // C or
  S // C + 1 silos owning the same class split its images (the paper's 11 Gaia silos over
  6 classes), and a silo never holds a class it does not own;
- r = 0: the split is IID and every silo holds every class that has at least S images;
- 0 < r < 1: every silo sees every class (given enough images), but non-owned classes make up a
  share of its data that shrinks as r grows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedefm.data.datasets import ClassificationItem, LabelSpec
from fedefm.errors import ConfigError

# Small alphas often leave a silo without images; redraw, deterministically, this many times.
_DIRICHLET_DRAWS = 100


def partition_unseen(labels: Sequence[int], n_silos: int, unseen: float, seed: int) -> list[np.ndarray]:
    """Split indices into ``n_silos`` silos where a fraction ``unseen`` of each class stays with its owner silos.

    Args:
        labels: (N,) class of each image.
        n_silos: S, number of silos.
        unseen: r in [0, 1], the private share of every class (module docstring).
        seed: seed of the shuffles.

    Returns:
        S sorted index arrays into ``labels``.

    Raises:
        ConfigError: ``unseen`` outside [0, 1], ``n_silos`` < 1, or a silo would be empty.
    """
    _check_n_silos(n_silos)
    if not 0 <= unseen <= 1:
        raise ConfigError(f"unseen={unseen} must lie in [0, 1] (0: IID silos, 1: no class shared between silos)")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    n_owner_groups = max(1, min(n_silos, len(classes)))
    parts: list[list[np.ndarray]] = [[] for _ in range(n_silos)]
    shared = []
    for k, label in enumerate(classes):
        indices = rng.permutation(np.flatnonzero(labels == label))
        n_private = math.floor(unseen * len(indices) + 0.5)
        owners = [s for s in range(n_silos) if s % n_owner_groups == k % n_owner_groups]
        for owner, chunk in zip(owners, np.array_split(indices[:n_private], len(owners))):
            parts[owner].append(chunk)
        shared.append(indices[n_private:])
    # Dealing the shared images in one sequence keeps both class counts and silo totals within one.
    dealt = np.concatenate(shared) if shared else np.array([], dtype=np.int64)
    for s in range(n_silos):
        parts[s].append(dealt[s::n_silos])
    return _finish(parts, f"{len(labels)} images, {len(classes)} classes, unseen={unseen}", "use fewer silos")


def partition_dirichlet(labels: Sequence[int], n_silos: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Split each class over the silos in proportions drawn from Dirichlet(alpha); small alpha gives strong label skew.

    A draw that leaves a silo empty is redrawn (up to 100 times, all from ``seed``).

    Args:
        labels: (N,) class of each image.
        n_silos: S, number of silos.
        alpha: concentration > 0 (0.1 strongly skewed, 100 close to IID).
        seed: seed of the shuffles and draws.

    Returns:
        S sorted index arrays into ``labels``.

    Raises:
        ConfigError: ``alpha`` <= 0, ``n_silos`` < 1, or every draw left a silo empty.
    """
    _check_n_silos(n_silos)
    if not alpha > 0:
        raise ConfigError(f"alpha={alpha} must be > 0 (0.1 strongly skewed, 100 close to IID)")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    for _ in range(_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_silos)]
        for label in classes:
            indices = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(n_silos, alpha))
            cuts = np.round(np.cumsum(proportions)[:-1] * len(indices)).astype(int)
            for s, chunk in enumerate(np.split(indices, cuts)):
                parts[s].append(chunk)
        if all(sum(len(chunk) for chunk in part) for part in parts):
            break
    detail = f"{len(labels)} images, alpha={alpha}, after {_DIRICHLET_DRAWS} draws"
    return _finish(parts, detail, "raise alpha or use fewer silos")


def partition_by_domain(domains: Sequence[str], n_silos: int, seed: int) -> list[np.ndarray]:
    """Give each domain whole to one silo, round-robin over the sorted domain names.

    Args:
        domains: (N,) domain (site, scanner, data source) of each image.
        n_silos: S, number of silos, at most the number of domains.
        seed: accepted so that all partitioners share one signature; the assignment is fixed by
            the sorted domain names and does not depend on it.

    Returns:
        S sorted index arrays into ``domains``; silo s holds the domains at sorted positions s, s + S, ...

    Raises:
        ConfigError: ``n_silos`` < 1 or more silos than domains.
    """
    _check_n_silos(n_silos)
    domains = np.asarray(domains)
    names = np.unique(domains)
    if n_silos > len(names):
        raise ConfigError(
            f"{n_silos} silos but only {len(names)} domain(s) ({', '.join(map(str, names))}); "
            f"use at most {len(names)} silos or another partition"
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(n_silos)]
    for k, name in enumerate(names):
        parts[k % n_silos].append(np.flatnonzero(domains == name))
    return _finish(parts, f"{len(domains)} images, {len(names)} domains", "use fewer silos")


def silo_class_table(labels: Sequence[int], silos: list[np.ndarray], class_names: Sequence[str]) -> str:
    """Plain-text table of images per silo (rows) and class (columns), with totals."""
    labels = np.asarray(labels)
    if labels.size and not 0 <= labels.min() <= labels.max() < len(class_names):
        raise ConfigError(
            f"labels range over {labels.min()}..{labels.max()} but only {len(class_names)} class names were given"
        )
    counts = np.array([np.bincount(labels[silo], minlength=len(class_names)) for silo in silos]).reshape(len(silos), -1)
    return _format_table(["silo", *class_names, "total"], counts)


def silo_label_table(items_per_silo: Sequence[Sequence[ClassificationItem]], spec: LabelSpec) -> str:
    """Plain-text table of which label types each silo (rows) can teach: masked images per label, images only.

    A masked image counts for every label its class annotates (spec.annotated; the class is the image's folder),
    whether or not that label shows in it; "images only" counts the silo's images without a mask.
    """
    foreground = list(spec.labels[1:])
    counts = np.zeros((len(items_per_silo), len(foreground) + 1), dtype=np.int64)
    for s, items in enumerate(items_per_silo):
        for item in items:
            annotated = spec.annotated.get(item.image.parent.name, ()) if item.mask is not None else ()
            for label_id in annotated:
                counts[s, label_id - 1] += 1
            counts[s, -1] += not annotated
    return _format_table(["silo", *foreground, "images only"], counts, total_column=False)


def _format_table(header: list[str], counts: np.ndarray, total_column: bool = True) -> str:
    """Right-aligned plain-text table of counts (S, K) under ``header`` (a silo column, then K), with a total row."""
    rows = [[str(s), *map(str, row), *([str(row.sum())] if total_column else [])] for s, row in enumerate(counts)]
    rows.append(["total", *map(str, counts.sum(axis=0)), *([str(counts.sum())] if total_column else [])])
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _check_n_silos(n_silos: int) -> None:
    if n_silos < 1:
        raise ConfigError(f"n_silos={n_silos} must be at least 1")


def _finish(parts: list[list[np.ndarray]], detail: str, fix: str) -> list[np.ndarray]:
    silos = [np.sort(np.concatenate(part)).astype(np.int64) if part else np.array([], dtype=np.int64) for part in parts]
    for s, silo in enumerate(silos):
        if silo.size == 0:
            raise ConfigError(f"silo {s} received no images ({len(silos)} silos, {detail}); {fix}")
    return silos
