"""The ServerApp's work: find the silos, then run the simulator's round loop with messages instead of calls.

Client-server algorithms (fedavg, fedprox, moon, and FedEFM on a star) average at the relay, as
their server does in the simulator. The decentralised ones (dpsgd, matcha, FedEFM on any other
overlay) only pass through it: a silo receives the models its overlay gives it — its neighbours'
for gossip, visiting models to train as overseas experts, its own experts coming back — and mixes
them itself with its row of W; the relay never averages them.

A round is a series of waves. Each silo runs its tasks in the order a single process would
(``fedefm.round_tasks``), because they draw from one batch stream; a wave sends every silo the
longest run of its next tasks whose inputs exist (a home update waits for the experts of its model).
With the same seed, data and dropout = 0 the run reproduces the simulator bit for bit.

Every reply is checked before anything is mixed (``check_replies``): a silo that answers with an
error or not at all within ``reply-timeout`` seconds stops the run with its silo id, node id and reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict, UserConfig
from flwr.serverapp import Grid

from fedefm.config import PretrainConfig, resolve_device
from fedefm.errors import ConfigError, FedefmError
from fedefm.federated import topology
from fedefm.federated.algorithms import get_algorithm
from fedefm.federated.algorithms.base import NonFiniteLoss, SiloState, Task, home_tasks
from fedefm.federated.flower.messages import (
    pretrain_config,
    record_state,
    record_weights,
    scalars_record,
    weights_record,
)
from fedefm.federated.simulator import ImageSource, finish, initial_model, read_corpus, start_run_folder, train_rounds
from fedefm.runfolder import owned_run_folder

log = logging.getLogger(__name__)


class SiloFailed(FedefmError, RuntimeError):
    """A silo replied with an error or not at all; the message names the silo, its node and the reason."""


@dataclass
class Silos:
    """The federation as the relay sees it: silo i's Flower node id, and the payload bytes sent and received."""

    grid: Grid
    nodes: list[int]
    timeout: float
    bytes_moved: int = 0
    round_: int = 0

    def exchange(self, contents: dict[int, RecordDict], message_type: str) -> dict[int, RecordDict]:
        """Send each silo its content, wait for the replies, and return them by silo once all are good."""
        messages = [Message(content, dst_node_id=self.nodes[i], message_type=message_type, group_id=str(self.round_))
                    for i, content in contents.items()]
        self.bytes_moved += sum(record_bytes(content) for content in contents.values())
        replies = check_replies(self, list(self.grid.send_and_receive(messages, timeout=self.timeout)), list(contents))
        self.bytes_moved += sum(record_bytes(content) for content in replies.values())
        return replies


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records (weights, metrics, settings)."""
    return sum(record.count_bytes() for record in content.values())


def check_replies(silos: Silos, replies: list[Message], expected: list[int]) -> dict[int, RecordDict]:
    """The replies' contents by silo; a missing or failed reply raises SiloFailed naming every such silo.

    Raises:
        NonFiniteLoss: a silo's local loss became NaN or infinite (the silo's own message).
        SiloFailed: a silo sent an error or no reply within the timeout.
    """
    silo_of = {node: i for i, node in enumerate(silos.nodes)}
    good: dict[int, RecordDict] = {}
    failures: dict[int, str] = {}
    for reply in replies:
        silo = silo_of.get(reply.metadata.src_node_id)
        if silo is None:
            continue
        if reply.has_error():
            failures[silo] = reply.error.reason
        else:
            good[silo] = reply.content
    for silo in expected:
        if silo not in good and silo not in failures:
            failures[silo] = f"no reply within {silos.timeout:g} s (is its SuperNode still running?)"
    if failures:
        reasons = "; ".join(f"silo {i} (node {silos.nodes[i]}): {reason}" for i, reason in sorted(failures.items()))
        if any("NonFiniteLoss" in reason for reason in failures.values()):
            raise NonFiniteLoss(reasons)
        raise SiloFailed(f"round {silos.round_}: {reasons}. The run stops: every silo takes part in every round")
    return good


def connect(grid: Grid, cfg: PretrainConfig, classes: list[str], wait_s: float, timeout: float) -> tuple[Silos, list[int]]:
    """Wait for ``cfg.silos`` SuperNodes, ask each its silo id and size; returns the silos and their sizes.

    Raises:
        SiloFailed: fewer nodes than silos connected within ``wait_s`` seconds.
        ConfigError: two nodes claim the same silo id, or an id is outside 0 … S-1.
    """
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < cfg.silos:
        if time.monotonic() > deadline:
            raise SiloFailed(f"{len(nodes)} of {cfg.silos} SuperNodes connected within {wait_s:g} s; "
                             "start one per silo, or lower --run-config silos")
        time.sleep(1.0)
    content = RecordDict({"run": ConfigRecord({"classes": classes})})
    replies = grid.send_and_receive([Message(content, dst_node_id=node, message_type="query") for node in nodes],
                                    timeout=timeout)
    found: dict[int, tuple[int, int]] = {}
    for reply in replies:
        if reply.has_error():
            raise SiloFailed(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        silo, size = int(reply.content["silo"]["silo-id"]), int(reply.content["silo"]["num-examples"])
        if silo in found:
            raise ConfigError(f"nodes {found[silo][0]} and {reply.metadata.src_node_id} both say silo-id={silo}; "
                              "give every SuperNode its own silo-id")
        if not 0 <= silo < cfg.silos:
            raise ConfigError(f"node {reply.metadata.src_node_id}: silo-id={silo} is outside 0 … {cfg.silos - 1}")
        found[silo] = (reply.metadata.src_node_id, size)
    missing = sorted(set(range(cfg.silos)) - set(found))
    if missing:
        raise SiloFailed(f"no SuperNode answered as silo {missing[0]} within {timeout:g} s")
    silos = Silos(grid=grid, nodes=[found[i][0] for i in range(cfg.silos)], timeout=timeout)
    return silos, [found[i][1] for i in range(cfg.silos)]


def mixing_place(cfg: PretrainConfig, algorithm, algo_cfg) -> str:
    """Where a round's models are mixed: "relay" (client-server), "silos" (gossip) or "none" (each keeps its own)."""
    if algorithm.EXCHANGE == "client_server" or cfg.topology == "star":
        return "relay"
    if algorithm.EXCHANGE == "overseas" and not algorithm.mixes_neighbours(algo_cfg):
        return "none"
    return "silos"


def run_waves(silos: Silos, tasks: list[Task], states: list[SiloState], run_info: dict) -> list[SiloState]:
    """Run the round's tasks wave by wave; returns every silo's state after its home update.

    ``run_info`` travels in every message: {"classes": the data types, "outputs": the model's output count}.
    """
    queues = {i: [t for t in tasks if t.silo == i] for i in range(len(states))}
    awaited = {i: [t for t in tasks if t.kind == "expert" and t.user == i and t.silo != i] for i in range(len(states))}
    experts: dict[Task, SiloState] = {}
    updated = list(states)
    while any(queues.values()):
        wave = {}
        for i, queue in queues.items():
            ready = 0
            while ready < len(queue) and (queue[ready].kind == "expert"
                                          or all(t in experts for t in awaited[i])):
                ready += 1
            if ready:
                wave[i], queues[i] = queue[:ready], queue[ready:]
        assert wave, "a round's tasks wait on each other"
        contents = {i: wave_content(i, wave[i], states, [experts[t] for t in awaited[i]]
                                    if any(t.kind == "home" for t in wave[i]) else [], run_info)
                    for i in wave}
        for i, reply in silos.exchange(contents, "train").items():
            for task in wave[i]:
                if task.kind == "home":
                    updated[i] = record_state(reply["home"], reply["home.scalars"])
                elif task.user != i:
                    experts[task] = record_state(reply[f"expert-{task.model}"], reply[f"expert-{task.model}.scalars"])
    return updated


def wave_content(silo: int, tasks: list[Task], states: list[SiloState], trained: list[SiloState],
                 run_info: dict) -> RecordDict:
    """A silo's "train" message: its tasks in order, the round-start models they train, the experts of its model."""
    content = RecordDict({
        "run": ConfigRecord(run_info),
        "tasks": ConfigRecord({"kinds": [t.kind for t in tasks], "models": [t.model for t in tasks],
                               "users": [t.user for t in tasks], "n-trained": len(trained)}),
    })
    for model in sorted({t.model for t in tasks}):
        content[f"model-{model}"] = weights_record(states[model].weights)
    for k, expert in enumerate(trained):
        content[f"trained-{k}"] = weights_record(expert.weights)
        content[f"trained-{k}.scalars"] = scalars_record(expert)
    return content


def mix_at_silos(silos: Silos, states: list[SiloState], W: np.ndarray) -> list[SiloState]:
    """Forward every silo the updated models j with W_ij > 0 (its own included); each mixes its own row."""
    contents = {}
    for i in range(len(states)):
        senders = [j for j in range(len(states)) if W[i, j] > 0]
        content = RecordDict({"mix": ConfigRecord({"senders": senders, "row": [float(W[i, j]) for j in senders]})})
        for j in senders:
            content[f"model-{j}"] = weights_record(states[j].weights)
        contents[i] = content
    replies = silos.exchange(contents, "train.mix")
    return [replace(state, weights=record_weights(replies[i]["mixed"])) for i, state in enumerate(states)]


def relay_round(silos: Silos, cfg: PretrainConfig, algo_cfg, run_info: dict, round_: int,
                states: list[SiloState], neighbours: list[list[int]], W: np.ndarray) -> tuple[list[SiloState], dict]:
    """One round over Flower: the tasks in waves, then the mix where the algorithm does it."""
    algorithm = get_algorithm(cfg.algorithm)
    silos.round_, silos.bytes_moved = round_, 0
    tasks = (algorithm.round_tasks(neighbours, algo_cfg) if algorithm.EXCHANGE == "overseas"
             else home_tasks(len(states)))
    updated = run_waves(silos, tasks, states, run_info)
    place = mixing_place(cfg, algorithm, algo_cfg)
    if place == "relay":
        updated = algorithm.mix(updated, W, algo_cfg)
    elif place == "silos":
        updated = mix_at_silos(silos, updated, W)
    return updated, {"relay_bytes": silos.bytes_moved}


def run(grid: Grid, run_config: UserConfig) -> dict:
    """Run a whole pre-training over the connected SuperNodes; writes the simulator's run folder on this machine.

    The run config's ``data`` is a corpus on the relay's machine whose validation and test splits
    score the global model (its training split is not used here); ``out`` the run folder, claimed as
    runfolder.owned_run_folder does (another run there is refused unless ``overwrite`` is true).

    Returns:
        The run's summary.json: {"test_<metric>", "final_val_<metric>", "rounds", "grad_steps", "bytes_sent"}.
    """
    if not run_config.get("data"):
        raise ConfigError("run config data is empty: give the relay a corpus whose validation and test splits "
                          "score the global model, e.g. --run-config 'data=\"/srv/eval\"'")
    cfg = pretrain_config(run_config).validate()
    algorithm = get_algorithm(cfg.algorithm)
    if algorithm.EXCHANGE == "none":
        raise ConfigError(f"--algorithm {cfg.algorithm} pools all data in one place; run it with fedefm pretrain")
    overwrite = run_config.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"run config overwrite = {overwrite!r}: must be true or false (unquoted)")
    with owned_run_folder(Path(cfg.out), "flower", cfg.to_dict(), overwrite=overwrite):
        return relay_run(grid, run_config, cfg)


def relay_run(grid: Grid, run_config: UserConfig, cfg: PretrainConfig) -> dict:
    """The body of :func:`run`, in the run folder it claimed."""
    algo_cfg = cfg.algorithm_config()
    out = Path(cfg.out)
    corpus = read_corpus(cfg)
    classes = corpus.class_names
    silos, sizes = connect(grid, cfg, classes, float(run_config.get("connect-timeout", 120)),
                           float(run_config.get("reply-timeout", 600)))
    log.info("silos on nodes %s with %s training images", silos.nodes, sizes)
    device = resolve_device(cfg.device)
    model = initial_model(cfg, len(corpus.model_classes(cfg)), device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = [SiloState(weights={k: v.clone() for k, v in initial.items()}, num_examples=n) for n in sizes]
    start_run_folder(cfg, "flower", algo_cfg, corpus, sizes, topology.model_bytes(model))
    val = ImageSource(corpus.splits["val"], cfg.image_size, True, device, corpus.source_spec(cfg))

    run_info = {"classes": classes, "outputs": len(corpus.model_classes(cfg))}

    def step(round_: int, states: list[SiloState], neighbours: list[list[int]], W: np.ndarray):
        return relay_round(silos, cfg, algo_cfg, run_info, round_, states, neighbours, W)

    states = train_rounds(cfg, algo_cfg, model, states, step, np.random.default_rng(cfg.seed),
                          val, progress=False)
    test = ImageSource(corpus.splits["test"], cfg.image_size, True, device, corpus.source_spec(cfg))
    return finish(cfg, out, model, states, test, corpus, algo_cfg.objective)
