"""A silo's side of every algorithm, on its own data: what the worker (or, without one, the ClientApp) computes.

Node config (``flower-supernode --node-config``, or the worker's command line):
    silo-id: the silo's place on the overlay, 0 … S-1 (its neighbours follow from it).
    data-path: the silo's folder, ROOT/CLASS/*.png; every image there is a training image, unless the
        silos evaluate (the relay holds no corpus): then val-fraction and test-fraction of each class
        are held out, cut as ``fedefm pretrain`` cuts a corpus.
    data-layout: "silo" (default, the folder above) or "corpus": data-path is the whole corpus and the
        silo takes partition ``silo-id`` of its training split, exactly as ``fedefm pretrain`` does
        (one machine playing several hospitals, for tests and comparisons), and, when the silos
        evaluate, share ``silo-id`` of its validation and test splits (consecutive, near-equal shares).

Messages (from ``relay``): "query" asks for the silo id and training-set size (with no classes yet:
for the silo's class folders and label table, which a relay without a corpus takes the run's from);
"train" carries this wave's tasks in order (overseas experts to host, the home update) with the models
they need; "train.mix" carries the models the silo mixes its own with; "evaluate" the global model
(and the silo's own) to score on the silo's held-out validation or test images; "query.session" asks
for what the silo keeps between messages (for the relay's checkpoint) and "train.restore" sets it
(on resume). Replies hold weights and scalars, never images. What
the silo keeps between messages of a run (its decoded images, its batch generator, torch's generator
for dropout, MOON's previous model) is a ``Session``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict, UserConfig

from fedefm.config import resolve_device
from fedefm.data.datasets import ClassificationItem, find_silo_splits, list_silo_classes, read_label_spec
from fedefm.errors import ConfigError, DataError, choose
from fedefm.federated.algorithms import get_algorithm
from fedefm.federated.algorithms.base import SiloState, Weights, at_silo, mix_row
from fedefm.federated.config import PretrainConfig
from fedefm.federated.flower.messages import (
    DATA_LAYOUTS,
    evaluates_at_silos,
    pretrain_config,
    record_state,
    record_weights,
    scalars_record,
    weights_record,
)
from fedefm.federated.rounds import score
from fedefm.federated.runs import memory_slots, memory_tensors, tensors_under
from fedefm.federated.silo_data import Corpus, ImageSource, SiloData, read_corpus, silo_data, silo_partition


@dataclass
class Session:
    """What one silo keeps between the messages of one run."""

    silo: int
    cfg: PretrainConfig
    corpus: Corpus
    data: SiloData
    held_out: dict[str, list[ClassificationItem]]  # "val" and "test" when the silos evaluate, else empty
    sources: dict[str, ImageSource] = field(default_factory=dict)  # held-out images, decoded when first scored
    generators: dict[str, torch.Tensor] | None = None  # batches' and torch's, after the last "train"; None: unseeded
    memory: dict[str, Weights] = field(default_factory=dict)  # the algorithm's (MOON's previous model)


def silo_id(node_config: UserConfig) -> int:
    """The node config's silo-id; a missing or negative one is a ConfigError."""
    if "silo-id" not in node_config:
        raise ConfigError("node config has no silo-id; start the SuperNode with --node-config 'silo-id=0 data-path=...'")
    silo = int(node_config["silo-id"])
    if silo < 0:
        raise ConfigError(f"node config silo-id={silo}: must be 0 or more")
    return silo


def open_session(node_config: UserConfig, run_config: UserConfig, classes: list[str]) -> Session:
    """This node's silo id, the run's settings and its training data, decoded (generators seeded from the run's seed).

    When the silos evaluate (``evaluates_at_silos``) the silo also holds out its validation and test images.

    Raises:
        ConfigError: node config without silo-id or data-path, or an unknown data-layout.
        DataError: the data folder is missing, empty, or holds a class the federation does not know.
    """
    silo = silo_id(node_config)
    data, layout = data_path(node_config, silo)
    cfg = pretrain_config(run_config, data=data)
    at_silos = evaluates_at_silos(run_config)
    if layout == "corpus":
        corpus = silo_partition(cfg)
        if corpus.class_names != classes:
            raise DataError(f"silo {silo}: {data} holds classes {corpus.class_names}, the run's are {classes}")
        if silo >= len(corpus.silo_indices):
            raise ConfigError(f"silo {silo}: the run has only {len(corpus.silo_indices)} silos "
                              f"(silo-id 0 … {len(corpus.silo_indices) - 1})")
        items = [corpus.splits["train"][k] for k in corpus.silo_indices[silo]]
        held_out = {split: [corpus.splits[split][k] for k in np.array_split(np.arange(len(corpus.splits[split])),
                                                                             cfg.silos)[silo]]
                    for split in ("val", "test")} if at_silos else {}
    else:
        corpus = Corpus({}, classes, read_label_spec(Path(data)), [])
        fractions = (cfg.val_fraction, cfg.test_fraction) if at_silos else (0.0, 0.0)
        splits = find_silo_splits(Path(data), classes, cfg.seed, *fractions)
        items, held_out = splits["train"], {split: splits[split] for split in ("val", "test")} if at_silos else {}
    if not items:
        raise DataError(f"silo {silo} ({data}): no training images")
    return Session(silo, cfg, corpus, silo_data(cfg, corpus, items, silo, resolve_device(cfg.device)), held_out)


def data_path(node_config: UserConfig, silo: int) -> tuple[str, str]:
    """The node config's data-path and data-layout.

    Raises:
        ConfigError: no data-path, or an unknown data-layout.
    """
    if "data-path" not in node_config:
        raise ConfigError(f"silo {silo}: node config has no data-path; add data-path=\"/path/to/ROOT\"")
    return (str(node_config["data-path"]),
            choose("node config data-layout", str(node_config.get("data-layout", "silo")), DATA_LAYOUTS))


def data_facts(node_config: UserConfig, run_config: UserConfig) -> RecordDict:
    """The "query" reply before the run's classes are known: the silo id, its class folders and its label table."""
    silo = silo_id(node_config)
    data, layout = data_path(node_config, silo)
    if layout == "corpus":
        corpus = read_corpus(pretrain_config(run_config, data=data))
        classes, spec = corpus.class_names, corpus.spec
    else:
        classes, spec = list_silo_classes(Path(data)), read_label_spec(Path(data))
    annotated = {name: [spec.labels[k] for k in ids] for name, ids in spec.annotated.items()}
    return RecordDict({"silo": ConfigRecord({"silo-id": silo, "classes": classes, "labels": list(spec.labels),
                                             "annotated": json.dumps(annotated)})})


def restore_generators(session: Session) -> None:
    """Continue the silo's batch and dropout generators where its last "train" message left them."""
    if session.generators is None:
        torch.manual_seed(session.cfg.seed * 1000 + session.silo)
        return
    session.data.generator.set_state(session.generators["batches"])
    torch.random.set_rng_state(session.generators["torch"])


def describe(session: Session) -> RecordDict:
    """The "query" reply: the silo id and its number of training images."""
    return RecordDict({"silo": ConfigRecord({"silo-id": session.silo, "num-examples": len(session.data.source)})})


def train(session: Session, content: RecordDict) -> RecordDict:
    """The "train" reply: run this wave's tasks in order (host overseas experts, then, if listed, the home update)."""
    silo, cfg, data = session.silo, session.cfg, session.data
    algorithm = get_algorithm(cfg.algorithm)
    algo_cfg = cfg.algorithm_config()
    outputs = int(content["run"]["outputs"])
    model = algo_cfg.objective.build_model(cfg.model_preset(), outputs).to(data.source.device)
    restore_generators(session)  # after building: the model's initialisation must not move the generators
    batches = data.batches()
    tasks = content["tasks"]
    reply = RecordDict()
    kept: list[SiloState] = []
    for kind, owner, user in zip(tasks["kinds"], tasks["models"], tasks["users"]):
        if kind == "expert":
            visitor = SiloState(weights=record_weights(content[f"model-{owner}"]))
            expert = at_silo(silo, algorithm.overseas_expert, model, visitor, batches, algo_cfg)
            if user == silo:
                kept.append(expert)
            else:
                reply[f"expert-{owner}"] = weights_record(expert.weights)
                reply[f"expert-{owner}.scalars"] = scalars_record(expert)
            continue
        state = SiloState(weights=record_weights(content[f"model-{silo}"]), memory=dict(session.memory),
                          num_examples=len(data.source))
        trained = [record_state(content[f"trained-{k}"], content[f"trained-{k}.scalars"])
                   for k in range(int(tasks["n-trained"]))]
        new = at_silo(silo, algorithm.local_update, model, state, batches, algo_cfg, trained + kept)
        session.memory.update(new.memory)
        reply["home"] = weights_record(new.weights)
        reply["home.scalars"] = scalars_record(new)
    session.generators = {"batches": data.generator.get_state(), "torch": torch.random.get_rng_state()}
    return reply


def mix(cfg: PretrainConfig, silo: int, content: RecordDict) -> RecordDict:
    """The "train.mix" reply: the silo's updated model mixed with its neighbours' by its row of W (the algorithm's mix)."""
    senders = [int(j) for j in content["mix"]["senders"]]
    row = dict(zip(senders, (float(w) for w in content["mix"]["row"])))
    received = {j: SiloState(weights=record_weights(content[f"model-{j}"])) for j in senders}
    mixed = mix_row(get_algorithm(cfg.algorithm).mix, silo, received, row, cfg.algorithm_config())
    return RecordDict({"mixed": weights_record(mixed.weights)})


def evaluate(session: Session, content: RecordDict) -> RecordDict:
    """The "evaluate" reply: the objective's score of "model-global" (and "model-own", if sent) on a held-out split.

    The reply's "scores" MetricRecord holds "num-examples" (0: the silo holds no such images; no score
    then), "global" and "own".

    Raises:
        ConfigError: the run does not evaluate at the silos, or the split is not "val" or "test".
    """
    split = choose("evaluate split", str(content["evaluate"]["split"]), ("val", "test"))
    if not session.held_out:
        raise ConfigError(f"silo {session.silo}: this run's relay holds the evaluation corpus (run config data), "
                          "so the silo holds out no images to score")
    if split not in session.sources:
        session.sources[split] = ImageSource(session.held_out[split], session.cfg.image_size, True,
                                             session.data.source.device, session.corpus.source_spec(session.cfg))
    source = session.sources[split]
    scores = MetricRecord({"num-examples": len(source)})
    if len(source):
        objective = session.cfg.algorithm_config().objective
        model = objective.build_model(session.cfg.model_preset(), int(content["run"]["outputs"]))
        model = model.to(source.device)
        for name in ("global", "own"):
            if f"model-{name}" in content:
                scores[name] = score(objective, model, record_weights(content[f"model-{name}"]), source)
    return RecordDict({"scores": scores})


def answer(message_type: str, content: RecordDict, node_config: UserConfig, run_config: UserConfig,
           session: Session | None) -> tuple[RecordDict, Session | None]:
    """The reply to one message, and the session after it (opened here for a "query", "train" or "evaluate" when
    ``session`` is None; a "query" without classes opens none).

    Raises:
        ConfigError: an unknown message type, or a bad node config (``open_session``).
    """
    if message_type == "train.mix":
        return mix(pretrain_config(run_config), silo_id(node_config), content), session
    known = ("query", "train", "evaluate", "query.session", "train.restore")
    if message_type not in known:
        raise ConfigError(f"message type {message_type!r}: the fedefm ClientApp answers train.mix, {', '.join(known)}")
    classes = list(content["run"]["classes"])
    if message_type == "query" and not classes:
        return data_facts(node_config, run_config), session
    if session is None:
        session = open_session(node_config, run_config, classes)
    if message_type == "query":
        return describe(session), session
    if message_type == "query.session":
        return RecordDict({"session": weights_record(session_tensors(session))}), session
    if message_type == "train.restore":
        restore_session(session, record_weights(content["session"], f"silo {session.silo}'s restore message"))
        return RecordDict(), session
    return (train(session, content) if message_type == "train" else evaluate(session, content)), session


# Messages that read or change what a silo keeps between messages (without a worker: the Context's state).
SESSION_MESSAGES = ("train", "train.restore", "query.session")


def session_tensors(session: Session) -> Weights:
    """What a silo keeps between messages, as named tensors: its generators' states and the algorithm's memory."""
    return ({f"generator.{name}": state for name, state in (session.generators or {}).items()}
            | {f"memory.{key}": value for key, value in memory_tensors(session.memory).items()})


def restore_session(session: Session, tensors: Weights) -> Session:
    """Set a session's generators and memory from ``session_tensors``' output (a checkpoint's, on resume)."""
    session.generators = tensors_under(tensors, "generator.") or None
    session.memory = memory_slots(tensors_under(tensors, "memory."))
    return session


def save_session(state: RecordDict, session: Session) -> None:
    """Keep a session's generators and memory in a Flower Context's state (a ClientApp without a worker)."""
    state["session"] = weights_record(session_tensors(session))


def load_session(state: RecordDict, session: Session) -> Session:
    """Restore the generators and memory ``save_session`` kept into a freshly opened ``session``."""
    return restore_session(session, record_weights(state["session"])) if "session" in state else session
