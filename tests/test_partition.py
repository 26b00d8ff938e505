"""Silo partitions: every index in exactly one silo, no silo empty, the unseen-ratio rules, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedefm.data.datasets import ClassificationItem, LabelSpec
from fedefm.data.partition import (
    partition_by_domain,
    partition_dirichlet,
    partition_unseen,
    silo_class_table,
    silo_label_table,
)
from fedefm.errors import ConfigError


def labels_from_counts(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def class_sets(labels, silos) -> list[set[int]]:
    return [set(np.asarray(labels)[silo].tolist()) for silo in silos]


def assert_exact_cover(silos, n) -> None:
    merged = np.concatenate(silos)
    assert sorted(merged.tolist()) == list(range(n))
    assert all(silo.size > 0 for silo in silos)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    n_silos=st.integers(1, 8),
    unseen=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_unseen_partition_covers_every_index_once_or_refuses(counts, n_silos, unseen, seed):
    labels = labels_from_counts(counts)

    try:
        silos = partition_unseen(labels, n_silos, unseen, seed)
    except ConfigError as error:
        assert "received no images" in str(error) and "use fewer silos" in str(error)
        return

    assert len(silos) == n_silos
    assert_exact_cover(silos, len(labels))
    assert all(np.all(np.diff(silo) > 0) for silo in silos)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 10), min_size=2, max_size=6), data=st.data())
def test_fully_unseen_with_no_more_silos_than_classes_gives_disjoint_class_sets(counts, data):
    n_silos = data.draw(st.integers(1, len(counts)))
    labels = labels_from_counts(counts)

    silos = partition_unseen(labels, n_silos, 1.0, seed=data.draw(st.integers(0, 99)))

    sets = class_sets(labels, silos)
    assert all(sets[i].isdisjoint(sets[j]) for i in range(n_silos) for j in range(i + 1, n_silos))
    assert set().union(*sets) == set(range(len(counts)))


def test_fully_unseen_with_more_silos_than_classes_gives_each_silo_one_owned_class():
    labels = labels_from_counts([4, 4, 4])  # 3 classes, 5 silos: owners 0:{0,3} 1:{1,4} 2:{2}

    silos = partition_unseen(labels, 5, 1.0, seed=0)

    assert class_sets(labels, silos) == [{0}, {1}, {2}, {0}, {1}]
    assert [len(silo) for silo in silos] == [2, 2, 4, 2, 2]


def test_zero_unseen_gives_every_silo_every_class_in_near_equal_counts():
    labels = labels_from_counts([9, 6, 3])

    silos = partition_unseen(labels, 3, 0.0, seed=7)

    assert class_sets(labels, silos) == [{0, 1, 2}] * 3
    assert [len(silo) for silo in silos] == [6, 6, 6]


def test_half_unseen_keeps_half_of_each_class_with_its_owner():
    labels = labels_from_counts([10, 10])
    # private: 5 of class 0 to silo 0, 5 of class 1 to silo 1; shared 5 + 5 dealt alternately from silo 0,
    # so silo 0 gets shared positions 0, 2, 4 (class 0) and 6, 8 (class 1).

    silos = partition_unseen(labels, 2, 0.5, seed=0)

    assert [np.bincount(labels[silo], minlength=2).tolist() for silo in silos] == [[5 + 3, 2], [2, 5 + 3]]


def test_partitions_are_deterministic_from_the_seed():
    labels = labels_from_counts([20, 20, 20])

    first, again = partition_unseen(labels, 3, 0.5, 1), partition_unseen(labels, 3, 0.5, 1)
    other = partition_unseen(labels, 3, 0.5, 2)

    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_more_silos_than_images_names_the_empty_silo():
    with pytest.raises(ConfigError, match="silo 2 received no images.*use fewer silos"):
        partition_unseen([0, 1], 3, 0.0, seed=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: partition_unseen([0, 1], 2, 1.5, 0), r"unseen=1\.5 must lie in \[0, 1\]"),
        (lambda: partition_unseen([0, 1], 0, 0.5, 0), "n_silos=0 must be at least 1"),
        (lambda: partition_dirichlet([0, 1], 2, 0.0, 0), "alpha=0.0 must be > 0"),
        (lambda: partition_by_domain(["a", "b"], 3, 0), r"3 silos but only 2 domain\(s\) \(a, b\)"),
    ],
)
def test_invalid_partition_options_are_config_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(5, 30), min_size=1, max_size=5),
    n_silos=st.integers(1, 4),
    alpha=st.floats(0.5, 100),
    seed=st.integers(0, 2**16),
)
def test_dirichlet_partition_covers_every_index_once(counts, n_silos, alpha, seed):
    labels = labels_from_counts(counts)

    silos = partition_dirichlet(labels, n_silos, alpha, seed)

    assert_exact_cover(silos, len(labels))


def test_small_dirichlet_alpha_skews_labels_more_than_large_alpha():
    labels = labels_from_counts([100] * 4)

    def mean_max_share(alpha):
        silos = partition_dirichlet(labels, 4, alpha, seed=0)
        return np.mean([np.bincount(labels[silo], minlength=4).max() / len(silo) for silo in silos])

    assert mean_max_share(0.1) > 0.6 > 0.4 > mean_max_share(100.0)


def test_dirichlet_that_cannot_fill_every_silo_is_refused():
    with pytest.raises(ConfigError, match="silo .* received no images .*raise alpha or use fewer silos"):
        partition_dirichlet([0], 2, 1.0, seed=0)


def test_domains_go_whole_to_silos_round_robin_over_sorted_names():
    domains = ["phantom", "animal", "human", "animal", "sim", "phantom"]

    silos = partition_by_domain(domains, 2, seed=0)

    # sorted: animal -> 0, human -> 1, phantom -> 0, sim -> 1
    assert [silo.tolist() for silo in silos] == [[0, 1, 3, 5], [2, 4]]


def test_silo_class_table_counts_images_per_silo_and_class():
    labels = [0, 0, 1, 2, 2, 2]
    silos = [np.array([0, 1, 2]), np.array([3, 4, 5])]

    table = silo_class_table(labels, silos, ["animal", "human", "phantom"])

    assert table.splitlines() == [
        "silo   animal  human  phantom  total",
        "0           2      1        0      3",
        "1           0      0        3      3",
        "total       2      1        3      6",
    ]


def test_silo_label_table_counts_masked_images_per_label_type_and_images_only(tmp_path):
    def item(cls, k, masked):
        return ClassificationItem(f"{cls}/im{k}", tmp_path / cls / f"im{k}.png", 0,
                                  mask=tmp_path / cls / "masks" / f"im{k}.png" if masked else None)

    spec = LabelSpec(("background", "catheter", "guidewire", "vessel"), {"dev": (1, 2), "ves": (3,)})
    silos = [[item("dev", 0, True), item("dev", 1, True), item("dev", 2, False)],
             [item("ves", 0, True), item("plain", 0, False)]]
    assert silo_label_table(silos, spec).splitlines() == [
        "silo   catheter  guidewire  vessel  images only",
        "0             2          2       0            1",
        "1             0          0       1            1",
        "total         2          2       1            2",
    ]
