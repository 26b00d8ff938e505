"""What travels between the relay and the silos: weights as ArrayRecords, scalars as MetricRecords, the run's settings.

A model travels as one Flower Array: its tensors packed into one safetensors byte string (a JSON
index, then the data; ``models.weights.pack_weights``), so a message moves one object per model
instead of one per tensor, and comes back bit for bit, in any dtype. The run's
settings are Flower's run config (``[tool.flwr.app.config]`` of the app, overridden by
``flwr run --run-config``); relay and silos read the same ``PretrainConfig`` from it.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Array, ArrayRecord, MetricRecord, UserConfig

from fedefm.config import parse_settings
from fedefm.errors import ConfigError, WeightsError
from fedefm.federated.algorithms.base import SiloState, Weights
from fedefm.federated.config import PretrainConfig
from fedefm.models.weights import pack_weights, unpack_weights
from fedefm.runfolder import field_defaults

# Run-config keys (Flower's spelling) → PretrainConfig fields; "options" holds "NAME=VALUE NAME=VALUE".
RUN_CONFIG_FIELDS = {
    "algorithm": "algorithm", "objective": "objective", "topology": "topology", "underlay": "underlay", "silos": "silos",
    "partition": "partition", "unseen": "unseen", "alpha": "alpha", "rounds": "rounds",
    "local-steps": "local_steps", "batch-size": "batch_size", "lr": "lr", "preset": "preset",
    "image-size": "image_size", "dropout": "dropout", "shots": "shots", "eval-every": "eval_every",
    "val-fraction": "val_fraction", "test-fraction": "test_fraction", "seed": "seed",
    "min-healthy-silos": "min_healthy_silos", "checkpoint-every": "checkpoint_every",
}
# How a SuperNode's data-path is read: its own silo's folder, or partition silo-id of a whole corpus (tests).
DATA_LAYOUTS = ("silo", "corpus")
# Run-config keys the relay reads itself.
RELAY_KEYS = ("data", "out", "overwrite", "resume", "options", "images-only", "reply-timeout", "connect-timeout")


def default_run_config() -> dict:
    """Every run-config key with its default, as the app declares them ("" where the default is None).

    Flower accepts ``--run-config`` overrides only for keys the app declares.
    """
    defaults = field_defaults(PretrainConfig)
    settings = {key: "" if defaults[field] is None else defaults[field] for key, field in RUN_CONFIG_FIELDS.items()}
    return settings | {"data": "", "out": "runs/flower", "overwrite": False, "resume": False, "options": "",
                       "images-only": "",
                       "reply-timeout": 600.0,
                       "connect-timeout": 120.0}


def pretrain_config(run_config: UserConfig, data: str | Path | None = None) -> PretrainConfig:
    """The run's PretrainConfig from Flower's run config; ``data`` replaces the run config's corpus (a silo's own).

    An empty string leaves a field at its default (``topology = ""``: the algorithm's own, ``dropout = ""``:
    the preset's).

    Raises:
        ConfigError: an unknown key, naming the known ones.
    """
    unknown = sorted(set(run_config) - set(RUN_CONFIG_FIELDS) - set(RELAY_KEYS))
    if unknown:
        raise ConfigError(f"run config {unknown[0]}: not a fedefm setting; known: "
                          f"{', '.join(sorted([*RUN_CONFIG_FIELDS, *RELAY_KEYS]))}")
    fields = {field: run_config[key] for key, field in RUN_CONFIG_FIELDS.items()
              if key in run_config and run_config[key] != ""}
    options = str(run_config.get("options", "")).split()
    return PretrainConfig(data=Path(data if data is not None else run_config.get("data", "")),
                          out=Path(str(run_config.get("out", "flower_run"))), options=parse_settings(options),
                          images_only=tuple(str(run_config.get("images-only", "")).split()), **fields)


def evaluates_at_silos(run_config: UserConfig) -> bool:
    """Whether the silos score the models on their own held-out images: the relay holds no corpus (``data`` empty)."""
    return not str(run_config.get("data", ""))


PACKED = "safetensors"  # the one Array of a weights record


def weights_record(weights: Weights) -> ArrayRecord:
    """An ArrayRecord of one Array: every tensor of ``weights`` packed (copied to CPU)."""
    packed = pack_weights(weights)
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(packed),), stype=PACKED, data=packed)})


def record_weights(record: ArrayRecord, sender: str = "a message") -> Weights:
    """The weights an ArrayRecord holds, as writable tensors.

    Raises:
        WeightsError: naming ``sender`` when the record is not one packed model, or its bytes are truncated or
            inconsistent.
    """
    if list(record) != [PACKED]:
        raise WeightsError(f"{sender}: weights record holds {sorted(record)[:3]}, not one packed model")
    return unpack_weights(bytes(record[PACKED].data), sender)


def scalars_record(state: SiloState) -> MetricRecord:
    """The scalars that travel with a silo's weights."""
    return MetricRecord({"num-examples": state.num_examples, "train-loss": state.train_loss,
                         "grad-steps": state.grad_steps})


def record_state(weights: ArrayRecord, scalars: MetricRecord, sender: str = "a message") -> SiloState:
    """A SiloState from its weights and scalars records (memory stays at the silo)."""
    return SiloState(weights=record_weights(weights, sender), num_examples=int(scalars["num-examples"]),
                     train_loss=float(scalars["train-loss"]), grad_steps=int(scalars["grad-steps"]))

