"""Weights on disk: safetensors with JSON metadata (preset, arch, classes), never pickle; transfer into a new model."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
from safetensors.torch import load as parse_safetensors
from safetensors.torch import save as serialize_safetensors
from torch import Tensor, nn

from fedefm import __version__
from fedefm.errors import ConfigError, WeightsError, choose
from fedefm.files import atomic_write
from fedefm.models.encoder import HybridEncoder
from fedefm.models.presets import PRESETS, get_preset

logger = logging.getLogger(__name__)

FORMAT = "fedefm-weights-1"
MAX_HEADER_BYTES = 100 * 2**20
ENCODER_PREFIX = "encoder."
PACKED_ORDER = "fedefm_order"  # the index entry of packed weights that keeps the names' order


def model_metadata(model: nn.Module) -> dict[str, Any]:
    """What rebuilds ``model``: its arch, preset name, n_classes and the preset's image size, and the arch of the
    whole segmenter it holds, if any (models/position.py HeldSegmenterClassifier)."""
    held = getattr(model, "segmenter", None)
    return {
        "arch": model.arch,
        "preset": model.preset.name,
        "n_classes": model.n_classes,
        "image_size": model.preset.image_size,
    } | ({"segmenter_arch": held.arch} if isinstance(held, nn.Module) else {})


def save_weights(path: Path, model_or_state: nn.Module | dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """Write tensors and metadata to ``path`` as safetensors, atomically.

    A model given directly contributes ``model_metadata(model)``, which ``metadata`` may extend or override. Each
    metadata value is stored JSON-encoded; ``fedefm_version`` and ``format`` are always added.
    """
    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict()
        metadata = {**model_metadata(model_or_state), **metadata}
    else:
        state = model_or_state
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    header = {**metadata, "fedefm_version": __version__, "format": FORMAT}
    data = serialize_safetensors(tensors, metadata={key: json.dumps(value) for key, value in header.items()})
    with atomic_write(path, "wb") as f:
        f.write(data)


def read_metadata_value(text: str) -> Any:
    """Decode one metadata value; files written by other tools may hold plain strings, kept as they are."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _header_length(path: Path, f: Any) -> tuple[bytes, int]:
    """The first 8 bytes of an open safetensors file and the header length they give, checked against its size.

    Raises:
        WeightsError: naming the file when it is too short or its header length cannot be right.
    """
    size = path.stat().st_size
    head = f.read(8)
    if len(head) < 8:
        raise not_safetensors(path, head, f"{size} bytes is too short for a safetensors file; the file is truncated")
    header_bytes = int.from_bytes(head, "little")
    # Checked before anything else is read: a hostile header length must not make us allocate it.
    if header_bytes > MAX_HEADER_BYTES or header_bytes > size - 8:
        raise not_safetensors(path, head, f"header claims {header_bytes} bytes but the file has {size}; "
                                          "the file is truncated or not a safetensors file")
    return head, header_bytes


def _metadata(header: dict[str, Any]) -> dict[str, Any]:
    """The decoded ``__metadata__`` of a parsed safetensors header."""
    return {key: read_metadata_value(value) for key, value in header.get("__metadata__", {}).items()}


def _require_file(path: Path) -> None:
    """Raise WeightsError naming ``path`` when no file is there."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; check the path (fedefm writes RUN/*.safetensors)")


def load_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a safetensors file: (tensors by name, metadata decoded from JSON). Never unpickles.

    Raises:
        WeightsError: naming the file when it is missing, a pickle / torch.save archive, truncated or corrupt.
    """
    path = Path(path)
    _require_file(path)
    with open(path, "rb") as f:
        head, header_bytes = _header_length(path, f)
        data = head + f.read()
    try:
        header = json.loads(data[8 : 8 + header_bytes])
        tensors = parse_safetensors(data)
    except (json.JSONDecodeError, UnicodeDecodeError, safetensors.SafetensorError) as error:
        raise not_safetensors(path, head, f"truncated or corrupt safetensors file ({error}); write it again") from error
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not tensor.isfinite().all():
            raise WeightsError(f"{path}: tensor {name} holds NaN or infinite values; these weights come from a "
                               "diverged run: use an earlier checkpoint or train again with a lower --lr")
    return tensors, _metadata(header)


def load_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a safetensors file (decoded from JSON), read from its header alone: no tensor is loaded.

    Raises:
        WeightsError: naming the file when it is missing, not a safetensors file or its header is corrupt.
    """
    path = Path(path)
    _require_file(path)
    with open(path, "rb") as f:
        head, header_bytes = _header_length(path, f)
        text = f.read(header_bytes)
    try:
        return _metadata(json.loads(text))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise not_safetensors(path, head, f"truncated or corrupt safetensors file ({error}); write it again") from error


def pack_weights(weights: dict[str, Tensor]) -> bytes:
    """Every tensor of ``weights`` (any dtype and shape) as one safetensors byte string: a JSON index, then the data.

    The index also records the names' order, which ``unpack_weights`` restores.
    """
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
    return serialize_safetensors(tensors, metadata={PACKED_ORDER: json.dumps(list(tensors))})


def unpack_weights(data: bytes, sender: str) -> dict[str, Tensor]:
    """The weights ``pack_weights`` packed, in their order, as writable tensors; never unpickles.

    Raises:
        WeightsError: naming ``sender`` when the bytes are truncated, the index is inconsistent with the data
            (offsets, dtypes, shapes) or lacks the names' order.
    """
    try:
        header_bytes = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
        if not 0 < header_bytes <= len(data) - 8:
            raise ValueError(f"{len(data)} bytes cannot hold a {header_bytes}-byte index")
        order = json.loads(json.loads(data[8 : 8 + header_bytes]).get("__metadata__", {})[PACKED_ORDER])
        tensors = parse_safetensors(data)
        if sorted(order) != sorted(tensors):
            raise ValueError(f"the index's order lists {len(order)} names for {len(tensors)} tensors")
    except (ValueError, KeyError, TypeError, AttributeError, safetensors.SafetensorError) as error:
        raise WeightsError(f"{sender}: packed weights are truncated or inconsistent ({error})") from error
    return {name: tensors[name].clone() for name in order}


def not_safetensors(path: Path, head: bytes, problem: str) -> WeightsError:
    """The error for a file safetensors cannot parse: a pickle / torch.save file is named as one, else ``problem``.

    Only asked after the parse failed: a valid safetensors header length may begin with 0x80 too.
    """
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        return WeightsError(f"{path}: is a pickle/torch.save file; fedefm only reads safetensors (never unpickles); "
                            "convert it with safetensors.torch.save_file")
    return WeightsError(f"{path}: {problem}")


def describe_keys(keys: list[str]) -> str:
    """Summarise tensor names by top-level module, e.g. 'decoder.* (36), segmentation_head.* (2)'."""
    counts = Counter(key.split(".")[0] for key in keys)
    return ", ".join(f"{prefix}.* ({count})" for prefix, count in counts.items()) or "none"


@dataclass(frozen=True)
class TransferReport:
    """Which tensors a transfer from pre-trained weights copied, left at their initial values, or skipped.

    Attributes:
        parts: what was transferred, "encoder" or "all" (``auto`` resolved).
        loaded: model keys copied from the checkpoint, in the model's order.
        new: model keys the checkpoint did not provide (or whose head did not fit), in the model's order.
        ignored: checkpoint keys the model does not use (e.g. a classifier's ``head.*``, ``reconstruction_head.*``),
            sorted.
        head: with ``parts`` "all", how the segmentation head was treated: which of the file's classes fill its
            output channels, or why it stayed new; empty for an encoder transfer.
    """

    parts: str
    loaded: list[str]
    new: list[str]
    ignored: list[str]
    head: str = ""

    def summary(self) -> str:
        """One line for the log: counts and module names of loaded, new and ignored tensors, and the head's fate."""
        line = (f"{self.parts}: loaded {len(self.loaded)}: {describe_keys(self.loaded)}; "
                f"new {len(self.new)}: {describe_keys(self.new)}; "
                f"ignored {len(self.ignored)}: {describe_keys(self.ignored)}")
        return f"{line}; segmentation head {self.head}" if self.head else line


INIT_PARTS = ("auto", "encoder", "all")
DECODER_PREFIX = "decoder."
HEAD_PREFIX = "segmentation_head."


def load_pretrained(model: nn.Module, path: Path, parts: str = "auto", classes: Sequence[str] = ()) -> TransferReport:
    """Initialise ``model`` (a TransUNet or Classifier) from pre-trained weights: the encoder, or the whole segmenter.

    ``parts`` "encoder" copies the file's ``encoder.*`` tensors (any fedefm pre-training: classifier or segmenter).
    "all" copies every tensor whose name the model shares with the file (encoder, decoder) and the segmentation head
    when the file's metadata ``classes`` hold every name in ``classes`` (the model's output channels in order, e.g.
    background, catheter, guidewire): the head's output rows of those classes, in the model's order. A file whose
    ``objective`` does not include ``segment`` (e.g. ``mim``) never trained its head, which then stays new. "auto"
    is "all" when the file holds ``decoder.*`` tensors and the model has a decoder, else "encoder".

    Raises:
        ConfigError: the model has no hybrid encoder (MONAI baselines), or ``parts`` is unknown.
        WeightsError: naming the file, when its preset differs from the model's, a shared tensor's shape or dtype
            differs, it holds no encoder tensor, or ("all") it is a classifier's weights, another architecture's,
            or holds no decoder.
    """
    if not isinstance(getattr(model, "encoder", None), HybridEncoder):
        arch = getattr(model, "arch", type(model).__name__)
        raise ConfigError(f"arch {arch} has no foundation encoder; use --arch transunet")
    parts = choose("--init-parts", parts, INIT_PARTS)
    tensors, metadata = load_weights(path)
    check_preset(path, metadata, model)
    model_state = model.state_dict()
    has_decoder = any(key.startswith(DECODER_PREFIX) for key in tensors)
    if parts == "auto":
        parts = "all" if has_decoder and hasattr(model, "decoder") else "encoder"
    head = ""
    if parts == "encoder":
        loaded = [key for key in model_state if key.startswith(ENCODER_PREFIX) and key in tensors]
        chosen = {key: tensors[key] for key in loaded}
    else:
        check_whole_model(path, metadata, tensors, model, has_decoder)
        chosen = {key: tensors[key] for key in model_state if key in tensors and not key.startswith(HEAD_PREFIX)}
        rows, head = head_rows(path, metadata, tensors, classes)
        if rows:
            chosen.update({key: tensors[key][list(rows)] for key in model_state if key.startswith(HEAD_PREFIX)})
        loaded = [key for key in model_state if key in chosen]
    for key in loaded:
        check_tensor(path, key, chosen[key], model_state[key], "the model")
    if not any(key.startswith(ENCODER_PREFIX) for key in loaded):
        raise WeightsError(
            f"{path}: holds no encoder.* tensor the model uses ({describe_keys(list(tensors))}); "
            "pass weights written by fedefm pretrain"
        )
    model.load_state_dict(chosen, strict=False)
    loaded_set = set(loaded)
    return TransferReport(
        parts=parts,
        loaded=loaded,
        new=[key for key in model_state if key not in loaded_set],
        ignored=sorted(key for key in tensors if key not in loaded_set),
        head=head,
    )


def load_segmenter(model: nn.Module, path: Path, parts: str = "auto", classes: Sequence[str] = ()) -> TransferReport:
    """Initialise a whole segmenter ``model`` (any models/segmenters.py arch) from a weights file: a TransUNet as
    :func:`load_pretrained` does (a dense foundation's body and head too); another arch only from a segmenter of
    the same arch and preset trained on ``classes``, every tensor (fedefm's MONAI networks share no encoder).

    Raises:
        WeightsError: naming the file, when (not a TransUNet) it is another arch's or preset's, names other
            classes, or its tensors differ from the model's.
    """
    if model.arch == "transunet":
        return load_pretrained(model, path, parts, classes)
    if choose("--init-parts", parts, INIT_PARTS) == "encoder":
        raise ConfigError(f"--init-parts encoder: a {model.arch} has no foundation encoder; use --init-parts all")
    tensors, metadata = load_weights(path)
    check_preset(path, metadata, model)
    if metadata.get("arch") != model.arch:
        raise WeightsError(f"{path}: holds the weights of a {metadata.get('arch', 'model of unknown arch')}, not of a "
                           f"{model.arch}; pass a {model.arch} segmenter written by fedefm finetune")
    if metadata.get("classes") != list(classes):
        raise WeightsError(f"{path}: its segmenter predicts {metadata.get('classes')}, not {list(classes)}; "
                           "pass a segmenter fine-tuned by fedefm finetune --task segment")
    load_every_tensor(path, model, tensors, f"{model.arch} ({model.preset.name})")
    return TransferReport(parts="all", loaded=list(model.state_dict()), new=[], ignored=[],
                          head=f"rows {', '.join(classes)} of the file's {', '.join(classes)}")


def check_preset(path: Path, metadata: dict[str, Any], model: nn.Module) -> None:
    """Raise WeightsError naming the file when its metadata ``preset`` differs from the model's (absent: a warning)."""
    preset = metadata.get("preset")
    if preset is None:
        logger.warning("%s: no 'preset' in the metadata; relying on tensor shapes only", path)
    elif preset != model.preset.name:
        raise WeightsError(
            f"{path}: weights are for preset {preset!r} but the model is preset {model.preset.name!r}; "
            f"use --preset {preset} or weights pretrained with --preset {model.preset.name}"
        )


def check_whole_model(path: Path, metadata: dict[str, Any], tensors: dict[str, Tensor], model: nn.Module,
                      has_decoder: bool) -> None:
    """Refuse ``--init-parts all`` from a classification run, another architecture, or a file without a decoder."""
    arch = metadata.get("arch")
    if arch == "classifier":
        raise WeightsError(
            f"{path}: --init-parts all needs a segmenter's weights, but this is a classification run's (arch "
            "classifier: encoder and classification head, no decoder); use --init-parts encoder"
        )
    if not hasattr(model, "decoder"):
        raise ConfigError(f"--init-parts all: a {model.arch} has no decoder to load; use --init-parts encoder")
    takes = {model.arch, getattr(model, "segmenter_arch", model.arch)}  # a position classifier takes a TransUNet's
    if arch is not None and arch not in takes:
        raise WeightsError(
            f"{path}: --init-parts all needs weights of a {' or '.join(sorted(takes))}, but these are of a {arch}; "
            f"use --init-parts encoder or --arch {arch} from scratch"
        )
    if not has_decoder:
        raise WeightsError(
            f"{path}: --init-parts all needs a segmenter's weights, but the file holds no decoder.* tensor "
            f"({describe_keys(list(tensors))}); use --init-parts encoder"
        )


def head_rows(path: Path, metadata: dict[str, Any], tensors: dict[str, Tensor], classes: Sequence[str]
              ) -> tuple[tuple[int, ...], str]:
    """The file's segmentation-head output channels for ``classes`` in order, and a note for the report.

    Returns ``((), why it stays new)`` when the head does not fit: no head tensors, no or other class names, or an
    objective that never trained it.

    Raises:
        WeightsError: naming the file, when its ``classes`` and its head's output channels disagree in number.
    """
    objective = metadata.get("objective")
    file_classes = metadata.get("classes")
    weight = tensors.get(f"{HEAD_PREFIX}weight")
    if weight is None or f"{HEAD_PREFIX}bias" not in tensors:
        return (), "new: the file has no segmentation_head.weight and .bias"
    if objective is not None and "segment" not in str(objective):
        return (), f"new: objective {objective!r} did not train it"
    if not isinstance(file_classes, list) or not classes:
        return (), "new: the file's metadata names no classes to match by name"
    if len(file_classes) != weight.shape[0]:
        raise WeightsError(
            f"{path}: metadata names {len(file_classes)} classes but segmentation_head.weight has "
            f"{weight.shape[0]} output channels; the file is inconsistent, write it again"
        )
    missing = [name for name in classes if name not in file_classes]
    if missing:
        return (), f"new: the file's classes ({', '.join(map(str, file_classes))}) lack {', '.join(missing)}"
    rows = tuple(file_classes.index(name) for name in classes)
    return rows, f"rows {', '.join(classes)} of the file's {', '.join(file_classes)}"


def check_tensor(path: Path, key: str, tensor: Tensor, expected: Tensor, where: str) -> None:
    """Raise WeightsError naming the file and tensor when its shape or dtype differs from the model's."""
    if tensor.shape != expected.shape:
        raise WeightsError(
            f"{path}: tensor {key} has shape {tuple(tensor.shape)} in the file but {tuple(expected.shape)} in "
            f"{where}; the weights come from another architecture"
        )
    if tensor.dtype != expected.dtype:
        raise WeightsError(f"{path}: tensor {key} is {tensor.dtype} in the file but {expected.dtype} in {where}; "
                           "save the weights in the model's dtype")


def list_keys(keys: list[str], most: int = 8) -> str:
    """Name up to ``most`` keys and count the rest, so an error message stays readable."""
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def load_every_tensor(path: Path, model: nn.Module, tensors: dict[str, Tensor], name: str) -> None:
    """Load ``tensors`` into ``model`` strictly: each of its tensors, of the same shape and dtype, and no other.

    Raises:
        WeightsError: naming the file and the model (``name``), when tensors are missing, unexpected or differ.
    """
    model_state = model.state_dict()
    missing = [key for key in model_state if key not in tensors]
    unexpected = [key for key in tensors if key not in model_state]
    if missing or unexpected:
        raise WeightsError(f"{path}: does not match a {name} model: missing {list_keys(missing) or 'none'}; "
                           f"unexpected {list_keys(unexpected) or 'none'}")
    for key, tensor in tensors.items():
        check_tensor(path, key, tensor, model_state[key], f"a {name} model")
    model.load_state_dict(tensors)


def build_from_weights(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a weights file names (arch, preset, n_classes) and load every tensor strictly.

    Returns:
        The model (in train mode, as built) and the file's metadata (including ``classes`` when the writer stored them).

    Raises:
        WeightsError: naming the file, when metadata is missing or unknown, or tensors are missing, unexpected
            or of the wrong shape.
    """
    # Imported here: segmenters pulls in MONAI, which a Flower silo (a new process per message) never needs.
    from fedefm.models.position import POSITION_MODELS, HeldSegmenterClassifier
    from fedefm.models.segmenters import ARCHS, build_classifier, build_segmenter

    tensors, metadata = load_weights(path)
    absent = [key for key in ("arch", "preset", "n_classes") if key not in metadata]
    if absent:
        raise WeightsError(f"{path}: metadata lacks {', '.join(absent)}; only files written by fedefm can be rebuilt")
    arch, preset_name, n_classes = metadata["arch"], metadata["preset"], metadata["n_classes"]
    if preset_name not in PRESETS:
        raise WeightsError(f"{path}: unknown preset {preset_name!r}; known: {', '.join(PRESETS)}")
    classifiers = {"classifier": build_classifier} | {model.arch: model for model in POSITION_MODELS.values()}
    if arch not in classifiers and arch not in ARCHS:
        raise WeightsError(f"{path}: unknown arch {arch!r}; known: {', '.join([*classifiers, *ARCHS])}")
    preset = get_preset(preset_name)
    holders = [model.arch for model in POSITION_MODELS.values() if issubclass(model, HeldSegmenterClassifier)]
    held = {"segmenter_arch": metadata["segmenter_arch"]} if "segmenter_arch" in metadata else {}
    if held and (arch not in holders or held["segmenter_arch"] not in ARCHS):
        raise WeightsError(f"{path}: segmenter_arch {held['segmenter_arch']!r} for a {arch}; only "
                           f"{' and '.join(holders)} hold a segmenter, one of {', '.join(ARCHS)}")
    model = (classifiers[arch](preset, n_classes, **held) if arch in classifiers
             else build_segmenter(arch, preset, n_classes))
    load_every_tensor(path, model, tensors, f"{arch} ({preset_name})")
    return model, metadata
