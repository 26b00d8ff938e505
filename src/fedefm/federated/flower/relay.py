"""The ServerApp's work: find the silos, then run the round loop of federated/rounds.py through ``FlowerSilos``,
the executor that sends messages where the simulator's calls functions in one process.

A plan that mixes at the "server" (fedavg, fedprox, moon, and FedEFM on a star) averages at the
relay, as the simulator does. The decentralised ones (dpsgd, matcha, FedEFM on any other overlay)
only pass through it: a silo receives the models its overlay gives it — its neighbours'
for gossip, visiting models to train as overseas experts, its own experts coming back — and mixes
them itself with its row of W; the relay never averages them.

A round's tasks run as a series of waves. Each silo runs its tasks in the order of the algorithm's
round plan, as a single process would, because they draw from one batch stream; a wave sends every
silo the longest run of its next tasks whose inputs exist (a home update waits for the experts of its
model).
With the same seed, data and dropout = 0 the run reproduces the simulator bit for bit.

Every reply is checked before anything is mixed, and the round loop applies federated/health.py's
rules as it does in-process: a silo whose SuperNode answers with an error, not at all within
``reply-timeout`` seconds, or with weights that cannot be mixed is left out of the round (its hosted
experts dropped, its own update excluded, the others' rows of W renormalised) and gets no more
messages that round; the run stops only when fewer than ``min-healthy-silos`` silos come through. At the next round the relay looks for the silo again
(a restarted SuperNode registers under a new node id), and it rejoins.

Without a corpus at the relay the silos score the models on images they hold out (``silo_evaluation``).
Checkpoints hold every silo's weights and what each silo keeps between messages, so ``resume``
continues a run whose relay died to the unbroken run's result.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict, UserConfig
from flwr.serverapp import Grid

from fedefm.checkpoints import CheckpointStore
from fedefm.config import resolve_device
from fedefm.data.datasets import LabelSpec
from fedefm.errors import ConfigError, FedefmError, WeightsError
from fedefm.federated import topology
from fedefm.federated.algorithms import get_algorithm
from fedefm.federated.algorithms.base import LocalTraining, MixAt, SiloState, Task, mean_weights, mix_row
from fedefm.federated.config import PretrainConfig
from fedefm.federated.flower.messages import (
    evaluates_at_silos,
    pretrain_config,
    record_state,
    record_weights,
    scalars_record,
    weights_record,
)
from fedefm.federated.health import Fault, weights_fault
from fedefm.federated.rounds import Evaluate, scored_here, train_rounds
from fedefm.federated.runs import (
    RESUMABLE_CHANGES,
    finish,
    initial_model,
    load_round,
    save_round,
    start_run_folder,
    tensors_under,
)
from fedefm.federated.silo_data import Corpus, ImageSource, read_corpus
from fedefm.files import drop_rows_after
from fedefm.runfolder import field_defaults, owned_run_folder

log = logging.getLogger(__name__)


class SiloFailed(FedefmError, RuntimeError):
    """Too few SuperNodes connected, or one answered the first query with an error."""


@dataclass
class Silos:
    """The federation as the relay sees it: silo i's Flower node id, and the payload bytes sent and received.

    ``down`` holds the silos whose SuperNode failed in the current or last round, with why; such a silo
    gets no more messages that round, and is looked for again (``rejoin``) at the next round's start.
    """

    grid: Grid
    nodes: list[int]
    timeout: float
    bytes_moved: int = 0
    round_: int = 0
    down: dict[int, str] = field(default_factory=dict)
    timings: list[dict[str, float]] = field(default_factory=list)

    def exchange(self, contents: dict[int, RecordDict], message_type: str) -> tuple[dict[int, RecordDict], dict[int, str]]:
        """Send each silo its content; returns the replies by silo, and why each other silo gave none.

        Pulls with a short, growing pause (POLL_S … POLL_MAX_S) until every reply is in or ``timeout`` passes;
        each reply's timing goes to ``timings`` (``message_timing``).
        """
        silos = list(contents)
        messages = [Message(contents[i], dst_node_id=self.nodes[i], message_type=message_type,
                            group_id=str(self.round_)) for i in silos]
        self.bytes_moved += sum(record_bytes(content) for content in contents.values())
        pushed_at = time.time()
        waiting = dict(zip(self.grid.push_messages(messages), silos, strict=True))
        replies: dict[int, RecordDict] = {}
        failures: dict[int, str] = {}
        deadline, pause, last_pause = time.monotonic() + self.timeout, POLL_S, 0.0
        while waiting and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(waiting)):
                silo = waiting.pop(reply.metadata.reply_to_message_id, None)
                if silo is None:
                    continue
                if reply.has_error():
                    failures[silo] = reply.error.reason
                else:
                    replies[silo] = reply.content
                    self.bytes_moved += record_bytes(reply.content)
                    if "timing" in reply.content:
                        self.timings.append(message_timing(reply.content["timing"], pushed_at, time.time(),
                                                           last_pause))
            if waiting:
                time.sleep(pause)
                last_pause, pause = pause, min(2 * pause, POLL_MAX_S)
        for silo in waiting.values():
            failures[silo] = f"no reply within {self.timeout:g} s (is its SuperNode still running?)"
        return replies, failures

    def fail(self, silo: int, reason: str) -> str:
        """Mark ``silo``'s SuperNode down for the rest of the round; returns the reason, naming its node."""
        self.down[silo] = f"node {self.nodes[silo]}: {reason}"
        return self.down[silo]

    def rejoin(self, run_info: dict) -> None:
        """Look for a new SuperNode of each down silo (a restarted one registers under a new node id)."""
        if not self.down:
            return
        online = set(self.grid.get_node_ids())
        new = sorted(online - set(self.nodes))
        if new:
            content = RecordDict({"run": ConfigRecord({"classes": run_info["classes"]})})
            messages = [Message(content, dst_node_id=node, message_type="query") for node in new]
            for reply in self.grid.send_and_receive(messages, timeout=min(self.timeout, QUERY_TIMEOUT_S)):
                if reply.has_error():
                    continue
                silo = int(reply.content["silo"]["silo-id"])
                if silo in self.down:
                    log.info("round %d: silo %d rejoins on node %d", self.round_, silo, reply.metadata.src_node_id)
                    self.nodes[silo] = reply.metadata.src_node_id
                    del self.down[silo]
        for silo in list(self.down):
            if self.nodes[silo] in online:  # the same node answers again (it failed one message, not its process)
                del self.down[silo]


POLL_S, POLL_MAX_S = 0.02, 0.2  # pauses between pulls of a wave's replies
QUERY_TIMEOUT_S = 60.0  # how long a rejoining SuperNode has to answer the query


TIMING_KEYS = ("total_s", "dispatch_s", "startup_s", "compute_s", "socket_s", "return_s", "last_pause_s")


def message_timing(timing, pushed_at: float, pulled_at: float, last_pause: float) -> dict[str, float]:
    """One message's seconds, from the reply's "timing" record (client_app) and the relay's clock.

    total: push to pull; startup, compute, socket: measured at the silo; return: the reply leaving the
    ClientApp's handler to its pull here (Flower's way back and the poll's wait, at most ``last_pause``);
    dispatch: the rest, Flower's way out and starting the ClientApp process. ``dispatch`` and ``return``
    compare two machines' clocks, so they hold only where relay and silo share one (loopback).
    """
    seconds = {"total_s": pulled_at - pushed_at, "startup_s": float(timing["startup-s"]),
               "compute_s": float(timing["compute-s"]), "socket_s": float(timing["socket-s"]),
               "return_s": pulled_at - float(timing["replied-at"]), "last_pause_s": last_pause}
    seconds["dispatch_s"] = seconds["total_s"] - sum(seconds[k] for k in ("startup_s", "compute_s", "socket_s",
                                                                           "return_s"))
    return seconds


def mean_timing(timings: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each of a round's message timings, and their count ("messages")."""
    return {"messages": len(timings)} | {k: float(np.mean([t[k] for t in timings])) if timings else 0.0
                                         for k in TIMING_KEYS}


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records (weights, metrics, settings)."""
    return sum(record.count_bytes() for record in content.values())


def online_nodes(grid: Grid, cfg: PretrainConfig, wait_s: float) -> list[int]:
    """The node ids of the connected SuperNodes, once there are ``cfg.silos`` of them.

    Raises:
        SiloFailed: fewer nodes than silos connected within ``wait_s`` seconds.
    """
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < cfg.silos:
        if time.monotonic() > deadline:
            raise SiloFailed(f"{len(nodes)} of {cfg.silos} SuperNodes connected within {wait_s:g} s; "
                             "start one per silo, or lower --run-config silos")
        time.sleep(1.0)
    return nodes


def query(grid: Grid, nodes: list[int], classes: list[str], timeout: float, cfg: PretrainConfig
          ) -> dict[int, tuple[int, ConfigRecord]]:
    """Send every node a "query" with the run's ``classes``; returns {silo id: (node id, the reply's "silo" record)}.

    Raises:
        SiloFailed: a node answered with an error, or no node answered as one of the silos 0 … S-1.
        ConfigError: two nodes claim the same silo id, or an id is outside 0 … S-1.
    """
    content = RecordDict({"run": ConfigRecord({"classes": classes})})
    replies = grid.send_and_receive([Message(content, dst_node_id=node, message_type="query") for node in nodes],
                                    timeout=timeout)
    found: dict[int, tuple[int, ConfigRecord]] = {}
    for reply in replies:
        if reply.has_error():
            raise SiloFailed(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        record = reply.content["silo"]
        silo = int(record["silo-id"])
        if silo in found:
            raise ConfigError(f"nodes {found[silo][0]} and {reply.metadata.src_node_id} both say silo-id={silo}; "
                              "give every SuperNode its own silo-id")
        if not 0 <= silo < cfg.silos:
            raise ConfigError(f"node {reply.metadata.src_node_id}: silo-id={silo} is outside 0 … {cfg.silos - 1}")
        found[silo] = (reply.metadata.src_node_id, record)
    missing = sorted(set(range(cfg.silos)) - set(found))
    if missing:
        raise SiloFailed(f"no SuperNode answered as silo {missing[0]} within {timeout:g} s")
    return found


def connect(grid: Grid, cfg: PretrainConfig, classes: list[str], wait_s: float, timeout: float) -> tuple[Silos, list[int]]:
    """Wait for ``cfg.silos`` SuperNodes, ask each its silo id and size; returns the silos and their sizes.

    Raises:
        SiloFailed: fewer nodes than silos connected within ``wait_s`` seconds, or one answered with an error.
        ConfigError: two nodes claim the same silo id, or an id is outside 0 … S-1.
    """
    found = query(grid, online_nodes(grid, cfg, wait_s), classes, timeout, cfg)
    silos = Silos(grid=grid, nodes=[found[i][0] for i in range(cfg.silos)], timeout=timeout)
    return silos, [int(found[i][1]["num-examples"]) for i in range(cfg.silos)]


def silos_corpus(grid: Grid, cfg: PretrainConfig, wait_s: float, timeout: float) -> Corpus:
    """The run's classes and label table from the silos' own (a relay without a corpus): the union of their
    class folders, sorted, and the label table every silo with one shares.

    Raises:
        ConfigError: two silos' label tables differ.
    """
    found = query(grid, online_nodes(grid, cfg, wait_s), [], timeout, cfg)
    classes = sorted({name for _, record in found.values() for name in record["classes"]})
    tables = {i: tuple(record["labels"]) for i, (_, record) in sorted(found.items()) if record["labels"]}
    first, expected = next(iter(tables.items()), (None, ()))
    for i, table in tables.items():
        if table != expected:
            raise ConfigError(f"silos {first} and {i} label their masks {list(expected)} and {list(table)}: every "
                              "silo's labels.json must list the same labels in the same order")
    labels = next(iter(tables.values()), ())
    annotated: dict[str, set[int]] = {}
    for _, record in found.values():
        for name, names in json.loads(str(record["annotated"])).items():
            annotated.setdefault(name, set()).update(labels.index(label) for label in names)
    spec = LabelSpec(labels, {name: tuple(sorted(ids)) for name, ids in sorted(annotated.items())})
    log.info("the silos hold classes %s%s", classes, f" and labels {list(labels)}" if labels else "")
    return Corpus({}, classes, spec, [])


def silo_evaluation(silos: Silos, run_info: dict, split: str) -> Evaluate:
    """An Evaluate that asks every silo that is up to score the models on its held-out ``split`` ("val" or "test").

    The global score is the mean of the silos' scores weighted by their numbers of images; a silo that
    fails or holds no image of the split counts for nothing (and its own score is None).
    """

    def evaluate(states: list[SiloState], own: bool) -> tuple[float | None, list[float | None] | None]:
        global_record = weights_record(mean_weights(states))
        contents = {}
        for i in range(len(states)):
            if i in silos.down:
                continue
            content = RecordDict({"run": ConfigRecord(run_info), "evaluate": ConfigRecord({"split": split}),
                                  "model-global": global_record})
            if own:
                content["model-own"] = weights_record(states[i].weights)
            contents[i] = content
        replies, failures = silos.exchange(contents, "evaluate") if contents else ({}, {})
        for i, reason in failures.items():
            log.warning("round %d, silo %d: %s", silos.round_, i, silos.fail(i, f"evaluate: {reason}"))
        scored = {i: reply["scores"] for i, reply in replies.items() if int(reply["scores"]["num-examples"]) > 0}
        weighted = [(int(r["num-examples"]), float(r["global"])) for r in scored.values() if math.isfinite(r["global"])]
        total = sum(n for n, _ in weighted)
        global_score = sum(n * value for n, value in weighted) / total if total else None
        per_silo = [float(scored[i]["own"]) if i in scored else None for i in range(len(states))] if own else None
        return global_score, per_silo

    return evaluate


def run_waves(silos: Silos, tasks: list[Task], states: list[SiloState], run_info: dict,
              faults: list[Fault]) -> list[SiloState]:
    """Run the round's tasks wave by wave; returns every silo's state after its home update.

    ``run_info`` travels in every message: {"classes": the data types, "outputs": the model's output count}.
    A silo whose SuperNode fails (an error, no reply, unusable weights) fails all its tasks of the
    round, recorded in ``faults`` as health.py records them: the experts it hosts are dropped, its own
    update is excluded and it keeps its round-start state.
    """
    queues = {i: [t for t in tasks if t.silo == i] for i in range(len(states))}
    awaited = {i: [t for t in tasks if t.kind == "expert" and t.user == i and t.silo != i] for i in range(len(states))}
    experts: dict[Task, SiloState] = {}
    settled: set[Task] = set()
    updated = list(states)

    def fail(silo: int, failed: list[Task], reason: str) -> None:
        for task in failed:
            settled.add(task)
            if task.kind == "home":
                faults.append(Fault(silo, reason))
                updated[silo] = replace(states[silo], grad_steps=0)
            else:
                faults.append(Fault(task.model, f"expert trained at silo {silo} dropped: {reason}", silo))

    while any(queues.values()):
        for i in [i for i in queues if i in silos.down and queues[i]]:
            fail(i, queues[i], silos.down[i])
            queues[i] = []
        wave = {}
        for i, queue in queues.items():
            ready = 0
            while ready < len(queue) and (queue[ready].kind == "expert" or all(t in settled for t in awaited[i])):
                ready += 1
            if ready:
                wave[i], queues[i] = queue[:ready], queue[ready:]
        if not wave:
            break
        contents = {i: wave_content(i, wave[i], states, [experts[t] for t in awaited[i] if t in experts]
                                    if any(t.kind == "home" for t in wave[i]) else [], run_info)
                    for i in wave}
        replies, failures = silos.exchange(contents, "train")
        for i, reason in failures.items():
            fail(i, wave[i] + queues[i], silos.fail(i, reason))
            queues[i] = []
        for i, reply in replies.items():
            try:
                results = wave_results(i, wave[i], reply, states)
            except (KeyError, WeightsError) as exc:
                fail(i, wave[i] + queues[i], silos.fail(i, f"returned unusable weights: {exc}"))
                queues[i] = []
                continue
            for task, state in results.items():
                settled.add(task)
                if task.kind == "home":
                    updated[i] = state
                else:
                    experts[task] = state
    return updated


def wave_results(silo: int, tasks: list[Task], reply: RecordDict, states: list[SiloState]) -> dict[Task, SiloState]:
    """The states a silo's "train" reply holds for its wave's tasks (a kept expert has none), each checked.

    Raises:
        WeightsError: a state is missing, cannot be unpacked, or is not mixable with its model (health.weights_fault).
        KeyError: a record the task needs is missing.
    """
    sender = f"silo {silo}'s reply"
    results = {}
    for task in tasks:
        if task.kind == "expert" and task.user == silo:
            continue
        key = "home" if task.kind == "home" else f"expert-{task.model}"
        state = record_state(reply[key], reply[f"{key}.scalars"], sender)
        reason = weights_fault(state.weights, states[task.model].weights)
        if reason is not None:
            raise WeightsError(f"{key}: {reason}")
        results[task] = state
    return results


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


def mix_at_silos(silos: Silos, states: list[SiloState], start: list[SiloState], W: np.ndarray, algo_cfg,
                 mix, faults: list[Fault]) -> list[SiloState]:
    """Forward every silo the updated models j with W_ij > 0 (its own included); each mixes its own row.

    A row that is e_i (an excluded silo's, or one whose senders all failed) needs no other silo's model
    and is mixed here; a silo that fails its mix message is excluded and keeps its round-start state ``start``.
    """
    mixed = list(states)
    contents = {}
    for i in range(len(states)):
        senders = [j for j in range(len(states)) if W[i, j] > 0]
        if senders == [i]:
            mixed[i] = mix_row(mix, i, {i: states[i]}, {i: float(W[i, i])}, algo_cfg)
            continue
        content = RecordDict({"mix": ConfigRecord({"senders": senders, "row": [float(W[i, j]) for j in senders]})})
        for j in senders:
            content[f"model-{j}"] = weights_record(states[j].weights)
        contents[i] = content
    replies, failures = silos.exchange(contents, "train.mix")
    for i, reply in replies.items():
        try:
            weights = record_weights(reply["mixed"], f"silo {i}'s mix reply")
            reason = weights_fault(weights, states[i].weights)
        except (KeyError, WeightsError) as exc:
            weights, reason = {}, str(exc)
        if reason is None:
            mixed[i] = replace(states[i], weights=weights)
        else:
            failures[i] = f"returned unusable weights: {reason}"
    for i, reason in failures.items():
        faults.append(Fault(i, f"mix: {silos.fail(i, reason)}"))
        mixed[i] = replace(start[i], grad_steps=0)
    return mixed


@dataclass
class FlowerSilos:
    """The round executor over Flower: a plan's tasks as waves of "train" messages, the mix where the plan says.

    A silo whose SuperNode fails (an error, no reply within the reply timeout, unusable weights) fails all
    its tasks of the round and is reported as a Fault, as the in-process executor reports one; the round
    loop (federated/rounds.py) applies the same health rules to both.
    """

    silos: Silos
    algorithm: ModuleType
    cfg: LocalTraining
    run_info: dict  # {"classes": the data types, "outputs": the model's output count}, in every message

    def train(self, round_: int, tasks: list[Task], states: list[SiloState]) -> tuple[list[SiloState], list[Fault]]:
        """Look again for the silos down last round, then run the tasks wave by wave (``run_waves``)."""
        self.silos.round_, self.silos.bytes_moved, self.silos.timings = round_, 0, []
        self.silos.rejoin(self.run_info)
        faults: list[Fault] = []
        updated = run_waves(self.silos, tasks, states, self.run_info, faults)
        for i in sorted(set(self.silos.down) - {f.silo for f in faults if f.host is None}):  # failed after its home update
            faults.append(Fault(i, self.silos.down[i]))
            updated[i] = replace(states[i], grad_steps=0)
        return updated, faults

    def mix(self, mix_at: MixAt, updated: list[SiloState], start: list[SiloState], W: np.ndarray
            ) -> tuple[list[SiloState], list[Fault]]:
        """"server": ``algorithm.mix`` here, as a client-server round's server; "silos": each silo mixes its own row."""
        if mix_at == "server":
            return self.algorithm.mix(updated, W, self.cfg), []
        faults: list[Fault] = []
        if mix_at == "silos":
            updated = mix_at_silos(self.silos, updated, start, W, self.cfg, self.algorithm.mix, faults)
        return updated, faults

    def round_metrics(self) -> dict:
        """The payload bytes the relay sent and received this round, and the mean timing of its messages."""
        return {"relay_bytes": self.silos.bytes_moved, "message_timing": mean_timing(self.silos.timings)}


def silo_sessions(silos: Silos, run_info: dict, n: int) -> list[dict] | None:
    """What every silo keeps between messages (``silo.session_tensors``), asked with "query.session"; None if one fails."""
    content = RecordDict({"run": ConfigRecord(run_info)})
    replies, failures = silos.exchange({i: content for i in range(n) if i not in silos.down}, "query.session")
    missing = sorted(set(range(n)) - set(replies))
    for i, reason in failures.items():
        log.warning("round %d, silo %d: %s", silos.round_, i, silos.fail(i, f"session: {reason}"))
    if missing:
        return None
    try:
        return [record_weights(replies[i]["session"], f"silo {i}'s session reply") for i in range(n)]
    except (KeyError, WeightsError) as exc:
        log.warning("round %d: %s", silos.round_, exc)
        return None


def restore_silos(silos: Silos, sessions: list[dict], run_info: dict) -> None:
    """Give every silo back what it kept at the checkpoint ("train.restore"), so the run goes on as it would have.

    Raises:
        SiloFailed: a silo did not take it (a resumed run could not reproduce the unbroken one).
    """
    contents = {i: RecordDict({"run": ConfigRecord(run_info), "session": weights_record(session)})
                for i, session in enumerate(sessions)}
    _, failures = silos.exchange(contents, "train.restore")
    if failures:
        silo, reason = min(failures.items())
        raise SiloFailed(f"silo {silo} could not restore its state from the checkpoint: {reason}")


def save_checkpoint(store: CheckpointStore, round_: int, states: list[SiloState], sessions: list[dict],
                    rng: np.random.Generator) -> None:
    """Write the relay's checkpoint of the end of ``round_``: every silo's weights and what it keeps, the relay's rng."""
    save_round(store, round_, states, {f"silo{i}.session.{k}": v for i, session in enumerate(sessions)
                                       for k, v in session.items()}, rng=rng.bit_generator.state)


def load_checkpoint(store: CheckpointStore, rng: np.random.Generator) -> tuple[int, list[SiloState], list[dict]] | None:
    """The newest intact relay checkpoint: (round, silo states, silo sessions), rng restored; None if there is none."""
    found = load_round(store)
    if found is None:
        return None
    round_, states, tensors, info = found
    rng.bit_generator.state = info["rng"]
    return round_, states, [tensors_under(tensors, f"silo{i}.session.") for i in range(len(states))]


def run(grid: Grid, run_config: UserConfig) -> dict:
    """Run a whole pre-training over the connected SuperNodes; writes the simulator's run folder on this machine.

    The run config's ``data``, if given, is a corpus on the relay's machine whose validation and test
    splits score the global model (its training split is not used here), as the simulator scores it;
    left empty, the silos score the models on images they hold out (``silo.evaluate``) and the relay
    takes the run's classes from theirs. ``out`` is the run folder, claimed as runfolder.owned_run_folder
    does (another run there is refused unless ``overwrite`` is true, or ``resume``: the same settings but
    RESUMABLE_CHANGES, continued from its newest intact checkpoint).

    Returns:
        The run's summary.json: {"test_<metric>", "final_val_<metric>", "rounds", "grad_steps", "bytes_sent"}.
    """
    cfg = pretrain_config(run_config).validate()
    if get_algorithm(cfg.algorithm).FACTS.pooled:
        raise ConfigError(f"--algorithm {cfg.algorithm} pools all data in one place; run it with fedefm pretrain")
    flags = {key: run_config.get(key, False) for key in ("overwrite", "resume")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(f"run config {key} = {value!r}: must be true or false (unquoted)")
    with owned_run_folder(Path(cfg.out), "flower", cfg.to_dict(), flags["resume"], flags["overwrite"],
                          RESUMABLE_CHANGES, field_defaults(cfg)):
        return relay_run(grid, run_config, cfg, flags["resume"])


def relay_run(grid: Grid, run_config: UserConfig, cfg: PretrainConfig, resume: bool = False) -> dict:
    """The body of :func:`run`, in the run folder it claimed."""
    algo_cfg = cfg.algorithm_config()
    objective = algo_cfg.objective
    out = Path(cfg.out)
    wait_s, timeout = float(run_config.get("connect-timeout", 120)), float(run_config.get("reply-timeout", 600))
    at_silos = evaluates_at_silos(run_config)
    corpus = silos_corpus(grid, cfg, wait_s, timeout) if at_silos else read_corpus(cfg)
    classes = corpus.class_names
    silos, sizes = connect(grid, cfg, classes, wait_s, timeout)
    log.info("silos on nodes %s with %s training images", silos.nodes, sizes)
    device = resolve_device(cfg.device)
    model = initial_model(cfg, len(corpus.model_classes(cfg)), device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = [SiloState(weights={k: v.clone() for k, v in initial.items()}, num_examples=n) for n in sizes]
    run_info = {"classes": classes, "outputs": len(corpus.model_classes(cfg))}
    rng = np.random.default_rng(cfg.seed)
    store = CheckpointStore(out / "checkpoints", prefix="round")
    first_round = 1
    restored = load_checkpoint(store, rng) if resume else None
    if restored is not None:
        done, states, sessions = restored
        restore_silos(silos, sessions, run_info)
        drop_rows_after(out / "metrics.jsonl", "round", done)
        first_round = done + 1
        log.info("resuming %s after round %d", out, done)
    else:
        start_run_folder(cfg, "flower", algo_cfg, corpus, sizes, topology.model_bytes(model))
    if at_silos:
        val, test = silo_evaluation(silos, run_info, "val"), silo_evaluation(silos, run_info, "test")
    else:
        def held(split: str) -> Evaluate:
            source = ImageSource(corpus.splits[split], cfg.image_size, True, device, corpus.source_spec(cfg))
            return scored_here(objective, model, source)

        val, test = held("val"), held("test")

    def save(round_: int, states: list[SiloState]) -> None:
        sessions = silo_sessions(silos, run_info, len(states))
        if sessions is None:  # the previous checkpoint stays the newest
            log.warning("round %d: no checkpoint, a silo did not send what it keeps (%s)", round_, silos.down)
            return
        save_checkpoint(store, round_, states, sessions, rng)

    algorithm = get_algorithm(cfg.algorithm)
    executor = FlowerSilos(silos, algorithm, algo_cfg, run_info)
    states = train_rounds(cfg, algorithm, algo_cfg, model, states, executor, rng, val, first_round=first_round,
                          save=save, last_good=f"The last good checkpoint is in {store.folder}", progress=False)
    return finish(cfg, out, model, states, test, corpus, objective)
