"""The ClientApp a hospital's SuperNode runs: its silo's side of every algorithm, on its own data.

Node config (``flower-supernode --node-config``):
    silo-id: the silo's place on the overlay, 0 … S-1 (its neighbours follow from it).
    data-path: the silo's folder, ROOT/CLASS/*.png; every image there is a training image.
    data-layout: "silo" (default, the folder above) or "corpus": data-path is the whole corpus and the
        silo takes partition ``silo-id`` of its training split, exactly as ``fedefm pretrain`` does
        (one machine playing several hospitals, for tests and comparisons).

Messages (from ``relay``): "query" asks for the silo id and training-set size; "train" carries this
wave's tasks in order (overseas experts to host, the home update) with the models they need; "train.mix"
carries the models the silo mixes its own with. Replies hold weights and scalars, never images. What
the silo keeps between messages (its batch generator, torch's generator for dropout, MOON's previous
model) lives in ``context.state``, on the SuperNode.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedefm.config import PretrainConfig, resolve_device
from fedefm.data.datasets import list_silo_images, read_label_spec
from fedefm.errors import ConfigError, DataError, choose
from fedefm.federated.algorithms import get_algorithm
from fedefm.federated.algorithms.base import SiloState, Weights, at_silo, mix_row
from fedefm.federated.flower.messages import (
    pretrain_config,
    record_state,
    record_weights,
    scalars_record,
    weights_record,
)
from fedefm.federated.simulator import Corpus, SiloData, silo_data, silo_partition

app = ClientApp()

DATA_LAYOUTS = ("silo", "corpus")


def silo_id(context: Context) -> int:
    """The node config's silo-id; a missing or negative one is a ConfigError."""
    if "silo-id" not in context.node_config:
        raise ConfigError("node config has no silo-id; start the SuperNode with --node-config 'silo-id=0 data-path=...'")
    silo = int(context.node_config["silo-id"])
    if silo < 0:
        raise ConfigError(f"node config silo-id={silo}: must be 0 or more")
    return silo


def load_silo(context: Context, classes: list[str]) -> tuple[int, PretrainConfig, SiloData]:
    """This node's silo id, the run's settings and its training data (generator restored from context.state).

    Raises:
        ConfigError: node config without silo-id or data-path, or an unknown data-layout.
        DataError: the data folder is missing, empty, or holds a class the federation does not know.
    """
    silo = silo_id(context)
    if "data-path" not in context.node_config:
        raise ConfigError(f"silo {silo}: node config has no data-path; add data-path=\"/path/to/ROOT\"")
    data = str(context.node_config["data-path"])
    layout = choose("node config data-layout", str(context.node_config.get("data-layout", "silo")), DATA_LAYOUTS)
    cfg = pretrain_config(context.run_config, data=data)
    if layout == "corpus":
        corpus = silo_partition(cfg)
        if corpus.class_names != classes:
            raise DataError(f"silo {silo}: {data} holds classes {corpus.class_names}, the run's are {classes}")
        if silo >= len(corpus.silo_indices):
            raise ConfigError(f"silo {silo}: the run has only {len(corpus.silo_indices)} silos "
                              f"(silo-id 0 … {len(corpus.silo_indices) - 1})")
        items = [corpus.splits["train"][k] for k in corpus.silo_indices[silo]]
    else:
        corpus = Corpus({}, classes, read_label_spec(Path(data)), [])
        items = list_silo_images(data, classes)
    if not items:
        raise DataError(f"silo {silo} ({data}): no training images")
    silo_set = silo_data(cfg, corpus, items, silo, resolve_device(cfg.device))
    return silo, cfg, silo_set


def restore_generators(context: Context, silo: int, cfg: PretrainConfig, data: SiloData) -> None:
    """Continue the silo's batch and dropout generators where the last message left them."""
    saved = context.state.get("generators")
    if saved is None:
        torch.manual_seed(cfg.seed * 1000 + silo)
        return
    states = record_weights(saved)
    data.generator.set_state(states["batches"])
    torch.random.set_rng_state(states["torch"])


def save_generators(context: Context, data: SiloData) -> None:
    """Keep the generators' states for the silo's next message."""
    context.state["generators"] = weights_record({"batches": data.generator.get_state(),
                                                  "torch": torch.random.get_rng_state()})


def memory(context: Context) -> dict[str, Weights]:
    """The algorithm's memory this silo kept from the last round (MOON's previous model)."""
    return {key.removeprefix("memory."): record_weights(record) for key, record in context.state.items()
            if key.startswith("memory.")}


@app.query()
def describe(message: Message, context: Context) -> Message:
    """Reply with the silo id and its number of training images."""
    classes = list(message.content["run"]["classes"])
    silo, _, data = load_silo(context, classes)
    return Message(RecordDict({"silo": ConfigRecord({"silo-id": silo, "num-examples": len(data.source)})}),
                   reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Run this wave's tasks in order: host overseas experts, then (if listed) the home update."""
    content = message.content
    classes = list(content["run"]["classes"])
    silo, cfg, data = load_silo(context, classes)
    algorithm = get_algorithm(cfg.algorithm)
    algo_cfg = cfg.algorithm_config()
    outputs = int(content["run"]["outputs"])
    model = algo_cfg.objective.build_model(cfg.model_preset(), outputs).to(data.source.device)
    restore_generators(context, silo, cfg, data)
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
        state = SiloState(weights=record_weights(content[f"model-{silo}"]), memory=memory(context),
                          num_examples=len(data.source))
        if algorithm.EXCHANGE == "overseas":
            trained = [record_state(content[f"trained-{k}"], content[f"trained-{k}.scalars"])
                       for k in range(int(tasks["n-trained"]))]
            new = at_silo(silo, algorithm.home_update, model, state, batches, algo_cfg, trained + kept)
        else:
            new = at_silo(silo, algorithm.local_update, model, state, batches, algo_cfg)
        for slot, weights in new.memory.items():
            context.state[f"memory.{slot}"] = weights_record(weights)
        reply["home"] = weights_record(new.weights)
        reply["home.scalars"] = scalars_record(new)
    save_generators(context, data)
    return Message(reply, reply_to=message)


@app.train("mix")
def mix(message: Message, context: Context) -> Message:
    """Mix the silo's updated model with its neighbours' by its row of W (the algorithm's own ``mix``)."""
    content = message.content
    silo = silo_id(context)
    cfg = pretrain_config(context.run_config)
    senders = [int(j) for j in content["mix"]["senders"]]
    row = dict(zip(senders, (float(w) for w in content["mix"]["row"])))
    received = {j: SiloState(weights=record_weights(content[f"model-{j}"])) for j in senders}
    mixed = mix_row(get_algorithm(cfg.algorithm).mix, silo, received, row, cfg.algorithm_config())
    return Message(RecordDict({"mixed": weights_record(mixed.weights)}), reply_to=message)

