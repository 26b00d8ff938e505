"""Underlays, overlays, mixing matrices and Marfoq's max-plus cycle time."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
from torch import nn

from fedefm.errors import ConfigError, DataError
from fedefm.federated import topology
from fedefm.federated.topology import (
    Site,
    Underlay,
    build_overlay,
    check_connected,
    cycle_time,
    cycle_time_table,
    delay_graph,
    fedavg_matrix,
    get_underlay,
    haversine_km,
    latency_s,
    matcha_matchings,
    measure_compute_time,
    mixing_matrix,
    model_bytes,
    neighbours,
    sample_matcha_round,
)

GAIA = get_underlay("gaia")
# 125 MB = 1 Gbit: exactly one second per transfer on a 1 Gbit/s link.
ONE_SECOND_OF_BYTES = 125_000_000
# Three sites on the equator, one degree (6371 * pi / 180 km) apart.
EQUATOR = Underlay("equator", (Site("a", 0.0, 0.0), Site("b", 0.0, 1.0), Site("c", 0.0, 2.0)))
ONE_DEGREE_LATENCY_S = (0.0085 * 6371 * math.pi / 180 + 4) / 1000


def _max_cycle_mean_by_enumeration(graph: nx.DiGraph) -> float:
    return max(
        (
            sum(graph[c[k]][c[(k + 1) % len(c)]]["delay_s"] for k in range(len(c))) / len(c)
            for c in nx.simple_cycles(graph)
        ),
        default=0.0,
    )


def _hand_graph(edges: dict[tuple[int, int], float], compute_time_s: float) -> nx.DiGraph:
    graph = nx.DiGraph(compute_time_s=compute_time_s)
    for (i, j), delay in edges.items():
        graph.add_edge(i, j, delay_s=delay)
    return graph


def test_virginia_to_dublin_is_about_5450_km():
    virginia, dublin = GAIA.sites[0], GAIA.sites[3]

    assert (virginia.name, dublin.name) == ("Virginia", "Dublin")
    assert 5450 * 0.99 < haversine_km(virginia, dublin) < 5450 * 1.01


def test_latency_is_8_5_us_per_km_plus_4_ms():
    assert latency_s(EQUATOR.sites[0], EQUATOR.sites[1]) == pytest.approx(ONE_DEGREE_LATENCY_S)
    assert latency_s(EQUATOR.sites[0], EQUATOR.sites[0]) == pytest.approx(0.004)


def test_underlays_hold_gaia_11_sites_and_aws_na_22():
    assert [site.name for site in GAIA.sites] == [
        "Virginia", "California", "Oregon", "Dublin", "Frankfurt", "Tokyo",
        "Seoul", "Singapore", "Sydney", "Mumbai", "São Paulo",
    ]  # fmt: skip
    aws_na = get_underlay("aws_na")
    assert len(aws_na.sites) == 22
    assert all(-10 < site.lat < 90 and -170 < site.lon < -50 for site in aws_na.sites)


def test_unknown_underlay_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="did you mean 'gaia'"):
        get_underlay("giaa")


def test_unknown_overlay_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="did you mean 'ring'"):
        build_overlay("rnig", GAIA, 4, 0.1, 1000)


@pytest.mark.parametrize("n_silos", [1, 12])
def test_silo_count_outside_the_underlay_is_refused(n_silos):
    with pytest.raises(ConfigError, match="'gaia' has 11 sites"):
        build_overlay("ring", GAIA, n_silos, 0.1, 1000)


@pytest.mark.parametrize("n_silos", [2, 3, 11])
def test_ring_is_one_directed_hamiltonian_cycle(n_silos):
    ring = build_overlay("ring", GAIA, n_silos, 0.1, 1000)

    cycles = list(nx.simple_cycles(ring))
    assert len(cycles) == 1 and sorted(cycles[0]) == list(range(n_silos))
    assert all(ring.in_degree(i) == ring.out_degree(i) == 1 for i in ring)


def test_ring_is_the_same_on_every_build():
    edges = [sorted(build_overlay("ring", GAIA, 11, 0.1, 1000).edges) for _ in range(3)]

    assert edges[0] == edges[1] == edges[2]


@pytest.mark.parametrize("n_silos", [2, 5, 11])
def test_mst_has_s_minus_1_links_used_both_ways(n_silos):
    mst = build_overlay("mst", GAIA, n_silos, 0.1, 1000)
    links = nx.Graph(mst.to_undirected())

    assert links.number_of_edges() == n_silos - 1 and nx.is_tree(links)
    assert all(mst.has_edge(j, i) for i, j in mst.edges)


@pytest.mark.parametrize("n_silos", [2, 5, 11])
def test_star_has_one_centre_linked_both_ways_to_every_leaf(n_silos):
    star = build_overlay("star", GAIA, n_silos, 0.1, 1000)

    centre = star.graph["server"]
    assert star.in_degree(centre) == star.out_degree(centre) == n_silos - 1
    assert all(neighbours(star, i) == [centre] and star.out_degree(i) == 1 for i in star if i != centre)


def test_star_centre_minimises_the_largest_latency():
    assert build_overlay("star", EQUATOR, 3, 1.0, 1000).graph["server"] == 1


def test_each_silo_shares_its_access_link_between_its_transfers():
    complete = build_overlay("complete", EQUATOR, 3, 1.0, ONE_SECOND_OF_BYTES)
    unshared = build_overlay("complete", EQUATOR, 3, 1.0, ONE_SECOND_OF_BYTES, access_bandwidth_bps=math.inf)

    assert complete[0][1]["transfer_s"] == pytest.approx(2.0)
    assert unshared[0][1]["transfer_s"] == pytest.approx(1.0)
    assert complete[0][1]["delay_s"] == pytest.approx(1.0 + ONE_DEGREE_LATENCY_S + 2.0)


@pytest.mark.parametrize("name", ["ring", "mst", "star", "complete"])
@pytest.mark.parametrize("n_silos", [2, 5, 11])
def test_overlay_mixing_matrix_is_doubly_stochastic(name, n_silos):
    weights = mixing_matrix(build_overlay(name, GAIA, n_silos, 0.1, 1000))

    assert weights.shape == (n_silos, n_silos) and (weights >= 0).all()
    np.testing.assert_allclose(weights.sum(axis=0), 1.0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)


def test_matcha_round_mixing_matrix_is_doubly_stochastic():
    matchings = matcha_matchings(build_overlay("matcha", GAIA, 11, 0.1, 1000))
    rng = np.random.default_rng(0)
    for _ in range(20):
        weights = mixing_matrix(sample_matcha_round(matchings, 0.5, rng))

        assert (weights >= 0).all()
        np.testing.assert_allclose(weights.sum(axis=0), 1.0)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0)


def test_directed_ring_mixes_half_self_half_predecessor():
    ring = nx.DiGraph([(0, 1), (1, 2), (2, 0)])

    np.testing.assert_allclose(mixing_matrix(ring), [[0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5]])
    assert neighbours(ring, 0) == [2]


def test_path_mixes_with_metropolis_hastings_weights():
    path = nx.Graph([(0, 1), (1, 2)])  # degrees 1, 2, 1: every link weighs 1 / (1 + 2)

    np.testing.assert_allclose(mixing_matrix(path), [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    assert neighbours(path, 1) == [0, 2]


def test_one_way_directed_overlay_has_no_mixing_matrix():
    with pytest.raises(ConfigError, match="one in-neighbour per silo"):
        mixing_matrix(nx.DiGraph([(0, 1), (0, 2), (1, 2), (2, 0)]))


def test_fedavg_rows_are_normalised_example_counts():
    np.testing.assert_allclose(fedavg_matrix([1, 3]), [[0.25, 0.75], [0.25, 0.75]])


def test_fedavg_refuses_negative_or_all_zero_counts():
    with pytest.raises(DataError, match="silo 1: num_examples is -2"):
        fedavg_matrix([3, -2])
    with pytest.raises(DataError, match="every silo reports 0 examples"):
        fedavg_matrix([0, 0])


def test_disconnected_overlay_is_refused():
    halves = nx.DiGraph([(0, 1), (1, 0), (2, 3), (3, 2)], overlay="halves")

    with pytest.raises(ConfigError, match=r"'halves' over 4 silos is not connected: silo groups \[0, 1\]; \[2, 3\]"):
        check_connected(halves)


def test_karp_matches_the_best_cycle_found_by_enumeration():
    rng = np.random.default_rng(0)
    for trial in range(60):
        graph = nx.gnp_random_graph(int(rng.integers(2, 7)), 0.5, seed=trial, directed=True)
        if trial % 2:
            nx.add_cycle(graph, list(graph.nodes))  # strongly connected
        for i, j in graph.edges:
            graph[i][j]["delay_s"] = float(rng.uniform(0.0, 10.0))

        # compute 0: every silo's self-loop weighs 0, so an acyclic graph costs 0 per round.
        assert cycle_time(graph) == pytest.approx(_max_cycle_mean_by_enumeration(graph)), trial


def test_directed_ring_cycle_time_is_its_mean_edge_delay():
    assert cycle_time(_hand_graph({(0, 1): 1.0, (1, 2): 2.0, (2, 0): 6.0}, compute_time_s=0.5)) == pytest.approx(3.0)

    ring = build_overlay("ring", GAIA, 11, 0.1, ONE_SECOND_OF_BYTES)
    assert cycle_time(ring) == pytest.approx(np.mean([d for _, _, d in ring.edges(data="delay_s")]))


def test_slow_compute_bounds_the_cycle_time_through_the_self_loop():
    assert cycle_time(_hand_graph({(0, 1): 1.0, (1, 2): 1.0, (2, 0): 1.0}, compute_time_s=5.0)) == 5.0


def test_star_cycle_time_is_twice_the_largest_one_way_delay_minus_compute():
    star = build_overlay("star", EQUATOR, 3, 1.0, ONE_SECOND_OF_BYTES)
    one_way = 1.0 + ONE_DEGREE_LATENCY_S + 2.0  # compute + latency + 2 transfers on the centre's link

    assert star[0][1]["delay_s"] == pytest.approx(one_way)
    assert star[1][0]["delay_s"] == pytest.approx(one_way - 1.0)  # the server does not compute
    assert cycle_time(star) == pytest.approx(2 * one_way - 1.0)


def test_symmetric_overlay_cycle_time_is_its_largest_edge_delay():
    for name in ("mst", "complete"):
        graph = build_overlay(name, GAIA, 6, 0.1, ONE_SECOND_OF_BYTES)

        assert cycle_time(graph) == pytest.approx(max(d for _, _, d in graph.edges(data="delay_s")))


def test_cycle_time_needs_edge_delays():
    with pytest.raises(ConfigError, match="edge 0 -> 1 has no delay_s"):
        cycle_time(nx.DiGraph([(0, 1), (1, 0)]))


@pytest.mark.parametrize("n_silos", [4, 11, 22])
def test_matchings_cover_every_link_once_with_at_most_degree_plus_one(n_silos):
    base = nx.complete_graph(n_silos)
    matchings = matcha_matchings(base)

    assert len(matchings) <= n_silos  # max degree S - 1, plus one
    assert all(max(d for _, d in m.degree) <= 1 for m in matchings)
    assert sorted(e for m in matchings for e in m.edges) == sorted(base.edges)


def test_matchings_of_random_graphs_are_proper_edge_colourings():
    rng = np.random.default_rng(1)
    for trial in range(40):
        base = nx.gnp_random_graph(int(rng.integers(2, 12)), float(rng.uniform(0.2, 1.0)), seed=trial)
        matchings = matcha_matchings(base)

        assert len(matchings) <= max((d for _, d in base.degree), default=0) + 1
        assert all(max((d for _, d in m.degree), default=0) <= 1 for m in matchings)
        assert sum(m.number_of_edges() for m in matchings) == base.number_of_edges()


def test_matcha_budget_1_activates_every_matching():
    base = build_overlay("matcha", GAIA, 11, 0.1, 1000)
    round_graph = sample_matcha_round(matcha_matchings(base), 1.0, np.random.default_rng(0))

    assert nx.utils.edges_equal(round_graph.edges, nx.complete_graph(11).edges)


@pytest.mark.parametrize("budget", [0.0, 1.5])
def test_matcha_budget_outside_0_1_is_refused(budget):
    with pytest.raises(ConfigError, match="--budget"):
        sample_matcha_round(matcha_matchings(nx.complete_graph(3)), budget, np.random.default_rng(0))


def test_idle_matcha_round_costs_one_compute_time():
    idle = nx.Graph()
    idle.add_nodes_from(range(3))

    assert cycle_time(delay_graph(idle, EQUATOR, 0.25, ONE_SECOND_OF_BYTES)) == 0.25


def test_model_bytes_is_4_bytes_per_parameter():
    assert model_bytes(nn.Linear(3, 2)) == 4 * (3 * 2 + 2)


def test_compute_time_is_the_median_of_the_repeats(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])  # durations 5, 1, 3
    monkeypatch.setattr(topology.time, "perf_counter", lambda: next(clock))
    calls = []

    assert measure_compute_time(lambda: calls.append(1), repeats=3) == 3.0
    assert len(calls) == 3


def test_cycle_time_table_has_every_overlay_and_a_seeded_matcha_row():
    table = cycle_time_table(GAIA, 5, 0.1, ONE_SECOND_OF_BYTES, budget=0.5, seed=3, n_rounds=20)
    again = cycle_time_table(GAIA, 5, 0.1, ONE_SECOND_OF_BYTES, budget=0.5, seed=3, n_rounds=20)

    assert [row["overlay"] for row in table] == ["star", "ring", "mst", "complete", "matcha"]
    assert table == again
    ring = next(row for row in table if row["overlay"] == "ring")
    assert ring["cycle_time_s"] == cycle_time(build_overlay("ring", GAIA, 5, 0.1, ONE_SECOND_OF_BYTES))
    assert (ring["edges"], ring["max_degree"]) == (5, 1)
    complete = next(row for row in table if row["overlay"] == "complete")
    assert (complete["edges"], complete["max_degree"]) == (20, 4)
