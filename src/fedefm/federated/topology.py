"""Where silos sit (underlays), who talks to whom (overlays), how they mix, and how long a round takes.

Cycle time follows Marfoq, Xu, Neglia and Vidal, "Throughput-Optimal Topology Design for Cross-Silo
Federated Learning" (NeurIPS 2020), and their code (omarfoq/communication-in-cross-silo-fl):

- Underlay: real site coordinates; silos talk over a direct path, so two silos are one hop apart.
  latency(i, j) = 0.0085 ms/km x great-circle distance (haversine, R = 6371 km) + 4 ms.
- Edge delay (Marfoq's §3 model): silo i computes, then sends its model of M bytes to j:

      delay(i -> j) = compute + latency(i, j) + 8 M / min(access / out_deg(i), access / in_deg(j), bandwidth)

  ``bandwidth`` is the path's capacity (1 Gbit/s); ``access`` is each silo's upload and download
  capacity (1 Gbit/s), shared by every model the silo sends (out-degree) or receives (in-degree)
  in the same round. With both at 1 Gbit/s the transfer term is max(out_deg(i), in_deg(j)) x 8 M /
  1 Gbit/s: a silo sending to d neighbours pays d transfers. ``access_bandwidth_bps=math.inf``
  gives Marfoq's released code, whose default access capacity (1e32 bit/s) never binds.
- Cycle time: the silos form a max-plus linear system x(k+1) = A (x) x(k), A the delays; its time
  per round is the maximum cycle mean of the delay graph (Karp's algorithm). Every silo also
  carries a self-loop of weight ``compute``: it cannot start round k+1 before finishing round k.
- Star (client-server): the server does no training and relays within a round. Its edges are
  leaf -> server (compute + latency + transfer) and server -> leaf (latency + transfer); a round is
  the two hops, so a leaf's cycle through the server costs 2 x one-way - compute, one-way being
  the leaf -> server delay. This is Marfoq's ``(cycle - compute) * 2 + compute`` for STAR.

Silos are the first S sites of an underlay and are numbered 0..S-1; every overlay carries the
site name on each node.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
from networkx.algorithms.approximation import christofides, traveling_salesman_problem

from fedefm.errors import ConfigError, DataError, choose

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0
# Marfoq et al.'s fibre propagation plus per-path router delay.
LATENCY_MS_PER_KM = 0.0085
LATENCY_BASE_MS = 4.0
BANDWIDTH_BPS = 1e9

OVERLAYS = ("star", "ring", "mst", "complete", "matcha")


@dataclass(frozen=True)
class Site:
    """A place a silo can sit, in degrees (north and east positive)."""

    name: str
    lat: float
    lon: float


@dataclass(frozen=True)
class Underlay:
    """A named list of sites; silo i of an S-silo overlay sits at ``sites[i]``."""

    name: str
    sites: tuple[Site, ...]


UNDERLAYS: dict[str, Underlay] = {
    # Gaia (Hsieh et al., NSDI 2017) as used by Marfoq et al. and FedEFM: AWS regions, in their order.
    "gaia": Underlay(
        "gaia",
        (
            Site("Virginia", 39.0438, -77.4874),  # Ashburn, us-east-1
            Site("California", 37.7749, -122.4194),  # San Francisco, us-west-1
            Site("Oregon", 45.8399, -119.7006),  # Boardman, us-west-2
            Site("Dublin", 53.3498, -6.2603),
            Site("Frankfurt", 50.1109, 8.6821),
            Site("Tokyo", 35.6762, 139.6503),
            Site("Seoul", 37.5665, 126.9780),
            Site("Singapore", 1.3521, 103.8198),
            Site("Sydney", -33.8688, 151.2093),
            Site("Mumbai", 19.0760, 72.8777),
            Site("São Paulo", -23.5505, -46.6333),
        ),
    ),
    # Marfoq et al.'s amazon_us: 22 North-American AWS sites, in their order (San José is Costa Rica's).
    "aws_na": Underlay(
        "aws_na",
        (
            Site("Ashburn", 39.0438, -77.4874),
            Site("Atlanta", 33.7490, -84.3880),
            Site("Boston", 42.3601, -71.0589),
            Site("Chicago", 41.8781, -87.6298),
            Site("Dallas", 32.7767, -96.7970),
            Site("Denver", 39.7392, -104.9903),
            Site("Hayward", 37.6688, -122.0808),
            Site("Jacksonville", 30.3322, -81.6557),
            Site("Los Angeles", 34.0522, -118.2437),
            Site("Miami", 25.7617, -80.1918),
            Site("Minneapolis", 44.9778, -93.2650),
            Site("Montreal", 45.5017, -73.5673),
            Site("New York", 40.7128, -74.0060),
            Site("Newark", 40.7357, -74.1724),
            Site("Palo Alto", 37.4419, -122.1430),
            Site("Phoenix", 33.4484, -112.0740),
            Site("Philadelphia", 39.9526, -75.1652),
            Site("San José", 9.9281, -84.0907),
            Site("Seattle", 47.6062, -122.3321),
            Site("South Bend", 41.6764, -86.2520),
            Site("St. Louis", 38.6270, -90.1994),
            Site("Toronto", 43.6532, -79.3832),
        ),
    ),
}


def get_underlay(name: str) -> Underlay:
    """Return the underlay called ``name``; an unknown name raises ConfigError with the closest known name."""
    return UNDERLAYS[choose("--underlay", name, tuple(UNDERLAYS))]


def haversine_km(a: Site, b: Site) -> float:
    """Great-circle distance between two sites in km (haversine, Earth radius 6371 km)."""
    lat_a, lat_b = math.radians(a.lat), math.radians(b.lat)
    d_lat = lat_b - lat_a
    d_lon = math.radians(b.lon - a.lon)
    h = math.sin(d_lat / 2) ** 2 + math.cos(lat_a) * math.cos(lat_b) * math.sin(d_lon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def latency_s(a: Site, b: Site) -> float:
    """One-way latency in seconds: 0.0085 ms/km x great-circle distance + 4 ms."""
    return (LATENCY_MS_PER_KM * haversine_km(a, b) + LATENCY_BASE_MS) / 1000.0


def delay_graph(
    overlay: nx.Graph,
    underlay: Underlay,
    compute_time_s: float,
    model_bytes: int,
    *,
    server: int | None = None,
    bandwidth_bps: float = BANDWIDTH_BPS,
    access_bandwidth_bps: float = BANDWIDTH_BPS,
) -> nx.DiGraph:
    """Attach Marfoq's edge delays (module docstring) to an overlay on silos 0..S-1.

    Args:
        overlay: who sends to whom; an undirected graph means both directions. Self-loops are ignored.
        underlay: silo i sits at ``underlay.sites[i]``.
        compute_time_s: one local update at a silo, seconds.
        model_bytes: bytes of one model transfer.
        server: a silo that relays without computing (the star's centre), or None.
        bandwidth_bps: capacity of the path between two silos, bit/s.
        access_bandwidth_bps: each silo's upload and download capacity, shared by its transfers.

    Returns:
        DiGraph with edge attributes ``delay_s``, ``latency_s``, ``transfer_s`` and graph attributes
        ``compute_time_s``, ``model_bytes``, ``server``, ``underlay`` (what ``cycle_time`` reads).
    """
    directed = overlay.to_directed() if not overlay.is_directed() else overlay.copy()
    directed.remove_edges_from(list(nx.selfloop_edges(directed)))
    graph = nx.DiGraph(
        compute_time_s=compute_time_s, model_bytes=model_bytes, server=server, underlay=underlay.name
    )
    for node in sorted(directed.nodes):
        graph.add_node(node, site=underlay.sites[node].name)
    bits = 8.0 * model_bytes
    for i, j in directed.edges:
        rate = min(
            access_bandwidth_bps / directed.out_degree(i),
            access_bandwidth_bps / directed.in_degree(j),
            bandwidth_bps,
        )
        latency = latency_s(underlay.sites[i], underlay.sites[j])
        transfer = bits / rate
        compute = 0.0 if i == server else compute_time_s
        graph.add_edge(i, j, delay_s=compute + latency + transfer, latency_s=latency, transfer_s=transfer)
    return graph


def build_overlay(
    name: str,
    underlay: Underlay,
    n_silos: int,
    compute_time_s: float,
    model_bytes: int,
    *,
    bandwidth_bps: float = BANDWIDTH_BPS,
    access_bandwidth_bps: float = BANDWIDTH_BPS,
) -> nx.DiGraph:
    """Build a named overlay over the first ``n_silos`` sites of ``underlay``, with edge delays.

    star: the centre that minimises the largest latency to a leaf, edges both ways; ring: a directed
    Hamiltonian cycle, Christofides' TSP tour over the pairwise delays (deterministic); mst: minimum
    spanning tree of the pairwise delays, edges both ways; complete: every ordered pair; matcha: its
    base graph (complete), from which ``matcha_matchings`` and ``sample_matcha_round`` draw rounds.

    Args:
        name: one of OVERLAYS.
        underlay: where the silos sit.
        n_silos: S, 2 <= S <= number of sites.
        compute_time_s: one local update, seconds.
        model_bytes: bytes of one model transfer (see ``model_bytes``).
        bandwidth_bps: path capacity, bit/s.
        access_bandwidth_bps: each silo's upload and download capacity, bit/s.

    Returns:
        DiGraph on silos 0..S-1 as returned by ``delay_graph``; graph attribute ``overlay`` = name.

    Raises:
        ConfigError: unknown name, S out of range, negative time or size, non-positive bandwidth,
            or an overlay that does not connect the silos.
    """
    choose("--topology", name, OVERLAYS)
    n_sites = len(underlay.sites)
    if not 2 <= n_silos <= n_sites:
        raise ConfigError(
            f"--silos {n_silos}: underlay {underlay.name!r} has {n_sites} sites; choose 2..{n_sites} silos"
        )
    if compute_time_s < 0 or model_bytes < 0:
        raise ConfigError(
            f"compute time {compute_time_s} s and model size {model_bytes} bytes must not be negative"
        )
    if bandwidth_bps <= 0 or access_bandwidth_bps <= 0:
        raise ConfigError(
            f"bandwidth {bandwidth_bps} bit/s and access bandwidth {access_bandwidth_bps} bit/s must be positive"
        )
    sites = underlay.sites[:n_silos]
    server = None
    if name == "star":
        server = min(range(n_silos), key=lambda k: max(latency_s(sites[k], site) for site in sites))
        structure = nx.DiGraph()
        structure.add_nodes_from(range(n_silos))
        for leaf in range(n_silos):
            if leaf != server:
                structure.add_edges_from([(leaf, server), (server, leaf)])
    elif name == "ring":
        structure = _ring(_pairwise_delays(underlay, n_silos, compute_time_s, model_bytes, bandwidth_bps))
    elif name == "mst":
        pairwise = _pairwise_delays(underlay, n_silos, compute_time_s, model_bytes, bandwidth_bps)
        structure = nx.minimum_spanning_tree(pairwise, weight="delay_s").to_directed()
    else:
        structure = nx.complete_graph(n_silos, create_using=nx.DiGraph)
    graph = delay_graph(
        structure,
        underlay,
        compute_time_s,
        model_bytes,
        server=server,
        bandwidth_bps=bandwidth_bps,
        access_bandwidth_bps=access_bandwidth_bps,
    )
    graph.graph["overlay"] = name
    check_connected(graph)
    return graph


def _pairwise_delays(
    underlay: Underlay, n_silos: int, compute_time_s: float, model_bytes: int, bandwidth_bps: float
) -> nx.Graph:
    """Complete undirected graph whose edge weight is the delay of a single transfer (degree 1)."""
    pairwise = nx.Graph()
    pairwise.add_nodes_from(range(n_silos))
    transfer = 8.0 * model_bytes / bandwidth_bps
    for i in range(n_silos):
        for j in range(i + 1, n_silos):
            latency = latency_s(underlay.sites[i], underlay.sites[j])
            pairwise.add_edge(i, j, delay_s=compute_time_s + latency + transfer)
    return pairwise


def _ring(pairwise: nx.Graph) -> nx.DiGraph:
    """Directed Hamiltonian cycle along Christofides' tour of ``pairwise``, starting at silo 0."""
    tour = traveling_salesman_problem(pairwise, weight="delay_s", cycle=True, method=christofides)[:-1]
    start = tour.index(0)
    tour = tour[start:] + tour[:start]
    ring = nx.DiGraph()
    ring.add_nodes_from(pairwise.nodes)
    ring.add_edges_from(zip(tour, tour[1:] + tour[:1]))
    return ring


def matcha_matchings(graph: nx.Graph) -> list[nx.Graph]:
    """Split a base graph's links into matchings by Misra & Gries edge colouring (as MATCHA does).

    Args:
        graph: base graph on silos; directions are dropped, self-loops ignored.

    Returns:
        At most max_degree + 1 matchings, each an undirected graph on all silos of ``graph`` whose
        edges share no silo; together they hold every link exactly once.
    """
    base = nx.Graph(graph.to_undirected() if graph.is_directed() else graph)
    base.remove_edges_from(list(nx.selfloop_edges(base)))
    colours = _misra_gries(base)
    matchings = []
    for colour in sorted(set(colours.values())):
        matching = nx.Graph()
        matching.add_nodes_from(base.nodes(data=True))
        matching.add_edges_from(edge for edge, c in sorted(colours.items()) if c == colour)
        matchings.append(matching)
    return matchings


def _misra_gries(graph: nx.Graph) -> dict[tuple[Any, Any], int]:
    """Proper edge colouring with at most max_degree + 1 colours (Misra & Gries, 1992)."""
    n_colours = max((d for _, d in graph.degree), default=0) + 1
    colour: dict[frozenset, int] = {}

    def free(x: Any) -> set[int]:
        return set(range(n_colours)) - {colour[e] for y in graph[x] if (e := frozenset((x, y))) in colour}

    def edge_with(x: Any, c: int) -> Any:
        return next((y for y in graph[x] if colour.get(frozenset((x, y))) == c), None)

    for u, v in sorted(graph.edges, key=lambda e: tuple(sorted(e))):
        fan = [v]
        while True:
            nxt = next(
                (
                    z
                    for z in graph[u]
                    if z not in fan
                    and frozenset((u, z)) in colour
                    and colour[frozenset((u, z))] in free(fan[-1])
                ),
                None,
            )
            if nxt is None:
                break
            fan.append(nxt)
        c, d = min(free(u)), min(free(fan[-1]))
        # Swap c and d along the path from u that starts with colour d, so d becomes free on u.
        path, x, want = [], u, d
        while (y := edge_with(x, want)) is not None and frozenset((x, y)) not in path:
            path.append(frozenset((x, y)))
            x, want = y, c if want == d else d
        for e in path:
            colour[e] = c if colour[e] == d else d
        # Misra & Gries' lemma: some prefix of the fan is still a fan and ends at a silo where d is free.
        w = None
        for k, z in enumerate(fan):
            if k > 0 and colour[frozenset((u, z))] not in free(fan[k - 1]):
                break
            if d in free(z):
                w = k
                break
        assert w is not None
        for k in range(w):
            colour[frozenset((u, fan[k]))] = colour[frozenset((u, fan[k + 1]))]
        colour[frozenset((u, fan[w]))] = d
    assert all(len({colour[frozenset((x, y))] for y in graph[x]}) == graph.degree(x) for x in graph)
    return {tuple(sorted(e)): c for e, c in colour.items()}


def sample_matcha_round(matchings: Sequence[nx.Graph], budget: float, rng: np.random.Generator) -> nx.Graph:
    """Draw one MATCHA round: each matching is active independently with probability ``budget``.

    Every matching gets the same probability, so a round uses on average ``budget`` of the base
    graph's links (MATCHA's budget constraint); MATCHA's optimisation of per-matching probabilities
    for the best spectral gap is not done.

    Args:
        matchings: from ``matcha_matchings``.
        budget: communication budget in (0, 1]; 1 activates every matching.
        rng: the run's generator (one uniform draw per matching).

    Returns:
        Undirected graph on all silos holding the links of the active matchings.

    Raises:
        ConfigError: budget outside (0, 1].
    """
    if not 0 < budget <= 1:
        raise ConfigError(f"--budget {budget}: MATCHA's communication budget must lie in (0, 1]")
    active = rng.random(len(matchings)) < budget
    round_graph = nx.Graph()
    for matching in matchings:
        round_graph.add_nodes_from(matching.nodes(data=True))
    for matching, on in zip(matchings, active):
        if on:
            round_graph.add_edges_from(matching.edges)
    return round_graph


def check_connected(graph: nx.Graph) -> None:
    """Raise ConfigError unless every silo can reach every other (strongly, for a directed overlay)."""
    parts = list(
        nx.strongly_connected_components(graph) if graph.is_directed() else nx.connected_components(graph)
    )
    if len(parts) > 1:
        groups = "; ".join(str(sorted(part)) for part in sorted(parts, key=min))
        name = graph.graph.get("overlay", "custom")
        raise ConfigError(
            f"overlay {name!r} over {graph.number_of_nodes()} silos is not connected: silo groups {groups} "
            "cannot reach each other; add links between the groups or choose ring, star, mst or complete"
        )


def neighbours(graph: nx.Graph, i: int) -> list[int]:
    """Silos whose models silo ``i`` receives: in-neighbours of a directed overlay, else all neighbours."""
    if i not in graph:
        raise ConfigError(f"silo {i} is not in the overlay (silos {sorted(graph.nodes)})")
    adjacent = graph.predecessors(i) if graph.is_directed() else graph.neighbors(i)
    return sorted(j for j in adjacent if j != i)


def mixing_matrix(graph: nx.Graph) -> np.ndarray:
    """Doubly stochastic mixing matrix W (S, S) of an overlay on silos 0..S-1; row i weighs what i receives.

    Symmetric overlays (undirected, or every link both ways) get Metropolis-Hastings weights
    W_ij = 1 / (1 + max(deg_i, deg_j)) on links and W_ii = 1 - sum_j W_ij; an overlay where every
    silo has exactly one in-neighbour (a directed ring) gets W_ii = W_{i, pred(i)} = 1/2.

    Raises:
        ConfigError: nodes are not 0..S-1, or a directed overlay is neither symmetric nor a ring.
    """
    n = graph.number_of_nodes()
    if sorted(graph.nodes) != list(range(n)):
        raise ConfigError(f"overlay nodes must be silos 0..{n - 1}, got {sorted(graph.nodes)}")
    links = [(i, j) for i, j in graph.edges if i != j]
    weights = np.zeros((n, n))
    symmetric = not graph.is_directed() or all(graph.has_edge(j, i) for i, j in links)
    if symmetric:
        degree = {i: len(neighbours(graph, i)) for i in range(n)}
        for i, j in links:
            weights[i, j] = weights[j, i] = 1.0 / (1 + max(degree[i], degree[j]))
    elif all(len(neighbours(graph, i)) == 1 for i in range(n)):
        for i in range(n):
            weights[i, neighbours(graph, i)[0]] = 0.5
    else:
        raise ConfigError(
            f"overlay {graph.graph.get('overlay', 'custom')!r}: a mixing matrix needs links in both "
            "directions or exactly one in-neighbour per silo (a directed ring)"
        )
    weights[np.diag_indices(n)] = 1.0 - weights.sum(axis=1)
    return weights


def fedavg_matrix(num_examples: Sequence[int]) -> np.ndarray:
    """FedAvg's mixing matrix (S, S): every row is the silos' example counts normalised to sum to 1.

    Raises:
        DataError: a negative count, or no examples at all.
    """
    counts = np.asarray(num_examples, dtype=np.float64)
    for silo, count in enumerate(counts):
        if count < 0:
            raise DataError(f"silo {silo}: num_examples is {int(count)}; a count cannot be negative")
    if counts.sum() <= 0:
        raise DataError(f"every silo reports 0 examples ({len(counts)} silos); no silo has data to average")
    return np.tile(counts / counts.sum(), (len(counts), 1))


def cycle_time(graph: nx.DiGraph) -> float:
    """Time per round, seconds: the maximum cycle mean of the delay graph (Karp, per strong component).

    Reads edge attribute ``delay_s``, graph attribute ``compute_time_s`` (a self-loop of that weight
    on every computing silo) and ``server`` (a relay that does not compute: it is eliminated, each
    pair of hops j -> server -> i becoming one round j -> i), as written by ``delay_graph``.

    Raises:
        ConfigError: an edge without ``delay_s``, or a graph with no cycle.
    """
    server = graph.graph.get("server")
    compute = graph.graph.get("compute_time_s", 0.0)
    rounds = nx.DiGraph()
    rounds.add_nodes_from(node for node in graph.nodes if node != server)
    for i, j, data in graph.edges(data=True):
        if "delay_s" not in data:
            raise ConfigError(f"overlay edge {i} -> {j} has no delay_s; build it with delay_graph")
        if server not in (i, j) and i != j:
            rounds.add_edge(i, j, delay_s=data["delay_s"])
    if server is not None:
        for j in graph.predecessors(server):
            for i in graph.successors(server):
                through = graph[j][server]["delay_s"] + graph[server][i]["delay_s"]
                if through > rounds.get_edge_data(j, i, {"delay_s": -math.inf})["delay_s"]:
                    rounds.add_edge(j, i, delay_s=through)
    for node in list(rounds.nodes):
        if compute > rounds.get_edge_data(node, node, {"delay_s": -math.inf})["delay_s"]:
            rounds.add_edge(node, node, delay_s=compute)
    means = [
        _karp(rounds.subgraph(part))
        for part in nx.strongly_connected_components(rounds)
        if len(part) > 1 or rounds.has_edge(next(iter(part)), next(iter(part)))
    ]
    if not means:
        raise ConfigError(f"overlay {graph.graph.get('overlay', 'custom')!r} has no cycle, so no cycle time")
    return max(means)


def _karp(component: nx.DiGraph) -> float:
    """Maximum cycle mean of a strongly connected digraph with weights ``delay_s``; O(V E) (Karp, 1978)."""
    index = {node: k for k, node in enumerate(component.nodes)}
    n = len(index)
    src = np.array([index[i] for i, _ in component.edges], dtype=np.int64)
    dst = np.array([index[j] for _, j in component.edges], dtype=np.int64)
    weight = np.array([d for _, _, d in component.edges(data="delay_s")], dtype=np.float64)
    # heaviest[k, v]: heaviest walk of exactly k edges from node 0 to v (-inf if none).
    heaviest = np.full((n + 1, n), -np.inf)
    heaviest[0, 0] = 0.0
    for k in range(1, n + 1):
        np.maximum.at(heaviest[k], dst, heaviest[k - 1, src] + weight)
    reached = np.isfinite(heaviest[n])
    lengths = (n - np.arange(n))[:, None]  # (n, 1)
    ratios = (heaviest[n][None, reached] - heaviest[:n, reached]) / lengths  # (n, reached)
    ratios[~np.isfinite(heaviest[:n, reached])] = np.inf
    return float(ratios.min(axis=0).max())


def model_bytes(model: nn.Module) -> int:
    """Bytes of one model transfer: 4 (float32) x the model's parameter count (buffers not sent)."""
    return 4 * sum(p.numel() for p in model.parameters())


def measure_compute_time(fn: Callable[[], None], repeats: int = 3) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``fn`` (the caller passes one local step)."""
    if repeats < 1:
        raise ConfigError(f"repeats {repeats}: time at least 1 local step")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cycle_time_table(
    underlay: Underlay,
    n_silos: int,
    compute_time_s: float,
    model_bytes: int,
    budget: float = 0.5,
    seed: int = 0,
    *,
    n_rounds: int = 100,
    bandwidth_bps: float = BANDWIDTH_BPS,
    access_bandwidth_bps: float = BANDWIDTH_BPS,
) -> list[dict[str, Any]]:
    """Cycle time of every overlay in OVERLAYS on one underlay, for one model size and compute time.

    MATCHA's row is the mean over ``n_rounds`` rounds drawn with ``np.random.default_rng(seed)``
    of each round's cycle time (its delays use that round's degrees), as Marfoq et al. average it.

    Returns:
        One row per overlay: ``overlay``; ``cycle_time_s``; ``edges``, the model transfers per round
        (a link used both ways counts twice; MATCHA: mean over rounds); ``max_degree``, the most
        models one silo receives in a round (MATCHA: most over the drawn rounds).
    """
    options = {"bandwidth_bps": bandwidth_bps, "access_bandwidth_bps": access_bandwidth_bps}
    rows = []
    for name in OVERLAYS:
        graph = build_overlay(name, underlay, n_silos, compute_time_s, model_bytes, **options)
        if name != "matcha":
            in_degree = max(d for _, d in graph.in_degree)
            rows.append(
                {
                    "overlay": name,
                    "cycle_time_s": cycle_time(graph),
                    "edges": graph.number_of_edges(),
                    "max_degree": in_degree,
                }
            )
            continue
        matchings = matcha_matchings(graph)
        rng = np.random.default_rng(seed)
        times, edges, degree = [], [], 0
        for _ in range(n_rounds):
            round_graph = sample_matcha_round(matchings, budget, rng)
            times.append(cycle_time(delay_graph(round_graph, underlay, compute_time_s, model_bytes, **options)))
            edges.append(2 * round_graph.number_of_edges())
            degree = max(degree, max(d for _, d in round_graph.degree))
        rows.append(
            {
                "overlay": name,
                "cycle_time_s": float(np.mean(times)),
                "edges": float(np.mean(edges)),
                "max_degree": degree,
            }
        )
    logger.info("cycle times on %s with %d silos: %s", underlay.name, n_silos, rows)
    return rows
