"""Weights files: safetensors round trip with metadata, refusal of unsafe or damaged files, encoder and whole-model
transfer."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedefm import __version__
from fedefm.errors import ConfigError, WeightsError
from fedefm.models.presets import get_preset
from fedefm.models.segmenters import build_classifier, build_segmenter
from fedefm.data.labels import LABEL_NAMES
from fedefm.models.segmenters import TransUNet
from fedefm.models.weights import (
    build_from_weights,
    load_metadata,
    load_pretrained,
    load_weights,
    model_metadata,
    pack_weights,
    save_weights,
    unpack_weights,
)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def classifier_file(tmp_path):
    path = tmp_path / "global.safetensors"
    save_weights(path, build_classifier(get_preset("tiny"), 6), {"classes": ["a", "b", "c", "d", "e", "f"]})
    return path


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    save_weights(path, state, {"preset": "tiny", "classes": ["catheter", "guidewire"], "round": 3})
    tensors, metadata = load_weights(path)
    assert tensors.keys() == state.keys()
    torch.testing.assert_close(tensors["a"], state["a"])
    assert tensors["b"].dtype == torch.int64
    assert metadata == {
        "preset": "tiny",
        "classes": ["catheter", "guidewire"],
        "round": 3,
        "fedefm_version": __version__,
        "format": "fedefm-weights-1",
    }


def test_metadata_values_are_stored_as_json_strings(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {"a": torch.zeros(1)}, {"classes": ["x"], "n_classes": 1})
    with safetensors.safe_open(path, "pt") as f:
        raw = f.metadata()
    assert raw["classes"] == '["x"]'
    assert raw["n_classes"] == "1"
    assert raw["format"] == '"fedefm-weights-1"'


def test_non_contiguous_tensor_is_saved(tmp_path):
    path = tmp_path / "w.safetensors"
    transposed = torch.arange(6.0).reshape(2, 3).t()
    save_weights(path, {"t": transposed}, {})
    torch.testing.assert_close(load_weights(path)[0]["t"], transposed)


def test_saving_a_model_records_arch_preset_and_classes(classifier_file):
    _, metadata = load_weights(classifier_file)
    assert (metadata["arch"], metadata["preset"], metadata["n_classes"], metadata["image_size"]) == (
        "classifier",
        "tiny",
        6,
        128,
    )
    assert metadata["classes"] == ["a", "b", "c", "d", "e", "f"]


def test_save_leaves_no_temporary_file(tmp_path):
    save_weights(tmp_path / "w.safetensors", {"a": torch.zeros(2)}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_foreign_safetensors_metadata_that_is_not_json_is_kept_as_text(tmp_path):
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(1)}, str(path), metadata={"format": "pt"})
    assert load_weights(path)[1] == {"format": "pt"}


def test_missing_file_is_refused_with_its_name(tmp_path):
    with pytest.raises(WeightsError, match="nowhere.safetensors: weights file not found"):
        load_weights(tmp_path / "nowhere.safetensors")


def test_torch_save_pickle_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match=r"model.pth: is a pickle/torch.save file.*safetensors.torch.save_file"):
        load_weights(path)


def test_legacy_pickle_stream_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"a": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match="old.pt: is a pickle"):
        load_weights(path)


def test_safetensors_whose_header_length_starts_with_the_pickle_byte_loads(tmp_path):
    path = tmp_path / "w.safetensors"
    data = next(data for n in range(512)
                if (data := safetensors.torch.save({"a": torch.zeros(1)}, {"pad": "x" * n}))[0] == 0x80)
    path.write_bytes(data)
    assert load_weights(path)[0].keys() == {"a"}


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file_is_refused_with_its_name(classifier_file, tmp_path, keep):
    data = classifier_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(WeightsError, match="cut.safetensors: .*truncated"):
        load_weights(cut)


def test_metadata_is_read_from_the_header_alone(classifier_file, tmp_path):
    assert load_metadata(classifier_file) == load_weights(classifier_file)[1]
    data = classifier_file.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cut = tmp_path / "tensors_cut.safetensors"
    cut.write_bytes(data[: header_end + 10])  # the header whole, the tensors cut off
    assert load_metadata(cut) == load_metadata(classifier_file)
    with pytest.raises(WeightsError, match="tensors_cut.safetensors: .*truncated"):
        load_weights(cut)
    for name, damaged in (("short.safetensors", data[:20]), ("garbled.safetensors", data[:8] + b"x" * (header_end - 8))):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(WeightsError, match=f"{name}: .*(header claims|corrupt)"):
            load_metadata(tmp_path / name)
    with pytest.raises(WeightsError, match="absent.safetensors: weights file not found"):
        load_metadata(tmp_path / "absent.safetensors")


def test_file_cut_inside_the_header_is_refused(classifier_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(classifier_file.read_bytes()[:20])
    with pytest.raises(WeightsError, match="cut.safetensors: header claims"):
        load_weights(cut)


def test_huge_header_length_is_refused_before_reading_it(tmp_path):
    path = tmp_path / "hostile.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}" * 1000)
    with pytest.raises(WeightsError, match=f"hostile.safetensors: header claims {2**40} bytes"):
        load_weights(path)


def test_garbage_header_is_refused_as_corrupt(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes((4).to_bytes(8, "little") + b"\xff\xfe{x" + b"\x00" * 16)
    with pytest.raises(WeightsError, match="garbage.safetensors: truncated or corrupt"):
        load_weights(path)


def test_encoder_transfer_copies_encoder_and_reports_decoder_as_new_and_head_as_ignored(classifier_file):
    checkpoint, _ = load_weights(classifier_file)
    segmenter = build_segmenter("transunet", get_preset("tiny"))
    report = load_pretrained(segmenter, classifier_file, "encoder")
    state = segmenter.state_dict()
    assert report.loaded == [key for key in state if key.startswith("encoder.")]
    assert set(report.loaded) == {key for key in checkpoint if key.startswith("encoder.")}
    for key in report.loaded:
        torch.testing.assert_close(state[key], checkpoint[key], rtol=0, atol=0)
    assert report.new == [key for key in state if not key.startswith("encoder.")]
    assert {key.split(".")[0] for key in report.new} == {"decoder", "segmentation_head"}
    assert report.ignored == ["head.linear.bias", "head.linear.weight", "head.norm.bias", "head.norm.weight"]
    assert report.summary() == (f"encoder: loaded {len(report.loaded)}: encoder.* ({len(report.loaded)}); "
                                f"new {len(report.new)}: decoder.* ({len(report.new) - 2}), segmentation_head.* (2); "
                                "ignored 4: head.* (4)")


def test_encoder_transfer_from_another_preset_names_both_presets(tmp_path):
    path = tmp_path / "small.safetensors"
    save_weights(path, build_classifier(get_preset("small"), 6), {})
    with pytest.raises(WeightsError, match=r"small.safetensors: weights are for preset 'small' .* preset 'tiny'"):
        load_pretrained(build_segmenter("transunet", get_preset("tiny")), path)


def test_encoder_transfer_with_a_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    segmenter = build_segmenter("transunet", get_preset("tiny"))
    path = tmp_path / "odd.safetensors"
    save_weights(path, {"encoder.patch_embed.bias": torch.zeros(7)}, {"preset": "tiny"})
    shapes = r"shape \(7,\) in the file but \(96,\) in the model"
    with pytest.raises(WeightsError, match=r"odd.safetensors: tensor encoder.patch_embed.bias has " + shapes):
        load_pretrained(segmenter, path)


def test_encoder_transfer_from_a_file_without_encoder_tensors_is_refused(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_weights(path, build_segmenter("unet", get_preset("tiny")), {})
    with pytest.raises(WeightsError, match="unet.safetensors: holds no encoder"):
        load_pretrained(build_segmenter("transunet", get_preset("tiny")), path)


def test_encoder_transfer_into_a_monai_baseline_points_to_transunet(classifier_file):
    with pytest.raises(ConfigError, match="arch unet has no foundation encoder; use --arch transunet"):
        load_pretrained(build_segmenter("unet", get_preset("tiny")), classifier_file)


DENSE_CLASSES = ["background", "catheter", "guidewire", "vessel"]


def dense_pretraining_file(path, classes=DENSE_CLASSES, preset="tiny", **metadata):
    """A dense pre-training run's global model: a TransUNet over ``classes`` plus a MIM reconstruction head."""
    torch.manual_seed(7)
    model = TransUNet(get_preset(preset), n_classes=len(classes))
    state = dict(model.state_dict()) | {"reconstruction_head.weight": torch.randn(1, 16, 3, 3),
                                         "reconstruction_head.bias": torch.randn(1)}
    save_weights(path, state, model_metadata(model) | {"classes": list(classes), "objective": "segment+mim"} | metadata)
    return path


def test_whole_model_transfer_copies_encoder_and_decoder_value_for_value_and_reports_the_rest(tmp_path):
    path = dense_pretraining_file(tmp_path / "global.safetensors")
    checkpoint, _ = load_weights(path)
    segmenter = TransUNet(get_preset("tiny"), n_classes=3)
    report = load_pretrained(segmenter, path, "all", LABEL_NAMES)
    state = segmenter.state_dict()
    body = [key for key in state if not key.startswith("segmentation_head.")]
    assert {key.split(".")[0] for key in body} == {"encoder", "decoder"}
    for key in body:
        torch.testing.assert_close(state[key], checkpoint[key], rtol=0, atol=0)
    assert report.parts == "all" and report.loaded == list(state) and report.new == []
    assert report.ignored == ["reconstruction_head.bias", "reconstruction_head.weight"]
    assert report.summary().endswith("ignored 2: reconstruction_head.* (2); segmentation head rows background, "
                                     "catheter, guidewire of the file's background, catheter, guidewire, vessel")


def test_whole_model_transfer_picks_the_head_rows_by_class_name(tmp_path):
    path = dense_pretraining_file(tmp_path / "global.safetensors", ["vessel", "guidewire", "background", "catheter"])
    checkpoint, _ = load_weights(path)
    segmenter = TransUNet(get_preset("tiny"), n_classes=3)
    load_pretrained(segmenter, path, "all", LABEL_NAMES)
    for name in ("segmentation_head.weight", "segmentation_head.bias"):
        # shape: (3, ...) rows background, catheter, guidewire = the file's rows 2, 3, 1
        torch.testing.assert_close(segmenter.state_dict()[name], checkpoint[name][[2, 3, 1]], rtol=0, atol=0)


@pytest.mark.parametrize(("classes", "metadata", "why"), [
    (["background", "catheter", "vessel"], {}, r"new: the file's classes \(background, catheter, vessel\) lack guidewire"),
    (DENSE_CLASSES, {"objective": "mim"}, "new: objective 'mim' did not train it"),
])
def test_whole_model_transfer_keeps_a_head_that_does_not_fit_new(tmp_path, classes, metadata, why):
    path = dense_pretraining_file(tmp_path / "global.safetensors", classes, **metadata)
    segmenter = TransUNet(get_preset("tiny"), n_classes=3)
    initial = segmenter.segmentation_head.weight.detach().clone()
    report = load_pretrained(segmenter, path, "all", LABEL_NAMES)
    assert report.new == ["segmentation_head.weight", "segmentation_head.bias"]
    assert re.search(why, report.head)
    assert "segmentation_head.weight" in report.ignored
    torch.testing.assert_close(segmenter.segmentation_head.weight, initial, rtol=0, atol=0)
    assert any(key.startswith("decoder.") for key in report.loaded)


def test_auto_transfers_the_whole_model_from_a_segmenter_and_the_encoder_from_a_classifier(tmp_path, classifier_file):
    dense = dense_pretraining_file(tmp_path / "dense.safetensors")
    assert load_pretrained(TransUNet(get_preset("tiny")), dense, "auto", LABEL_NAMES).parts == "all"
    report = load_pretrained(TransUNet(get_preset("tiny")), classifier_file, "auto", LABEL_NAMES)
    assert report.parts == "encoder" and report.head == ""


def test_encoder_transfer_from_a_segmenter_ignores_its_decoder_and_head(tmp_path):
    path = dense_pretraining_file(tmp_path / "global.safetensors")
    report = load_pretrained(build_classifier(get_preset("tiny"), 4), path, "auto")
    assert report.parts == "encoder"
    assert {key.split(".")[0] for key in report.ignored} == {"decoder", "segmentation_head", "reconstruction_head"}
    assert {key.split(".")[0] for key in report.new} == {"head"}


def test_whole_model_transfer_from_a_classification_run_is_refused(classifier_file):
    with pytest.raises(WeightsError, match=r"global.safetensors: --init-parts all needs a segmenter's weights, but this "
                                           r"is a classification run's .*use --init-parts encoder"):
        load_pretrained(TransUNet(get_preset("tiny")), classifier_file, "all", LABEL_NAMES)


def test_whole_model_transfer_from_another_architecture_is_refused(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_weights(path, build_segmenter("unet", get_preset("tiny")), {"classes": list(LABEL_NAMES)})
    with pytest.raises(WeightsError, match="unet.safetensors: --init-parts all needs weights of a transunet, but these "
                                           "are of a unet"):
        load_pretrained(TransUNet(get_preset("tiny")), path, "all", LABEL_NAMES)


def test_whole_model_transfer_from_another_preset_names_both_presets(tmp_path):
    path = dense_pretraining_file(tmp_path / "small.safetensors", preset="small")
    with pytest.raises(WeightsError, match=r"small.safetensors: weights are for preset 'small' .* preset 'tiny'"):
        load_pretrained(TransUNet(get_preset("tiny")), path, "all", LABEL_NAMES)


def test_whole_model_transfer_without_decoder_tensors_is_refused(tmp_path):
    path = tmp_path / "encoder_only.safetensors"
    encoder = {k: v for k, v in TransUNet(get_preset("tiny")).state_dict().items() if k.startswith("encoder.")}
    save_weights(path, encoder, {"preset": "tiny"})
    with pytest.raises(WeightsError, match="encoder_only.safetensors: .*holds no decoder.* tensor"):
        load_pretrained(TransUNet(get_preset("tiny")), path, "all", LABEL_NAMES)


def test_whole_model_transfer_refuses_classes_that_disagree_with_the_head(tmp_path):
    path = dense_pretraining_file(tmp_path / "odd.safetensors")
    tensors, metadata = load_weights(path)
    save_weights(path, tensors, metadata | {"classes": DENSE_CLASSES[:3]})
    with pytest.raises(WeightsError, match="odd.safetensors: metadata names 3 classes but segmentation_head.weight has 4"):
        load_pretrained(TransUNet(get_preset("tiny")), path, "all", LABEL_NAMES)


def test_whole_model_transfer_into_a_classifier_is_refused(tmp_path):
    path = dense_pretraining_file(tmp_path / "global.safetensors")
    with pytest.raises(ConfigError, match="--init-parts all: a classifier has no decoder"):
        load_pretrained(build_classifier(get_preset("tiny"), 4), path, "all")


@pytest.mark.parametrize("arch", ["transunet", "unet"])
def test_build_from_weights_rebuilds_a_model_with_identical_outputs(tmp_path, arch):
    model = build_segmenter(arch, get_preset("tiny")).eval()
    path = tmp_path / "best.safetensors"
    save_weights(path, model, {"classes": ["background", "catheter", "guidewire"]})
    rebuilt, metadata = build_from_weights(path)
    assert model_metadata(rebuilt) == model_metadata(model)
    assert metadata["classes"] == ["background", "catheter", "guidewire"]
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x))


def test_build_from_weights_lists_missing_and_unexpected_tensors(tmp_path):
    model = build_classifier(get_preset("tiny"), 2)
    state = dict(model.state_dict())
    del state["head.linear.bias"]
    state["head.extra"] = torch.zeros(1)
    path = tmp_path / "edited.safetensors"
    save_weights(path, state, model_metadata(model))
    with pytest.raises(WeightsError, match="edited.safetensors: .*missing head.linear.bias; unexpected head.extra"):
        build_from_weights(path)


def test_build_from_weights_needs_arch_and_preset_in_the_metadata(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_weights(path, {"a": torch.zeros(1)}, {"n_classes": 3})
    with pytest.raises(WeightsError, match="bare.safetensors: metadata lacks arch, preset"):
        build_from_weights(path)


def test_build_from_weights_refuses_an_unknown_arch(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_weights(path, {"a": torch.zeros(1)}, {"arch": "resnet", "preset": "tiny", "n_classes": 3})
    with pytest.raises(WeightsError, match="odd.safetensors: unknown arch 'resnet'"):
        build_from_weights(path)



def test_build_from_weights_refuses_a_tensor_of_another_dtype(tmp_path):
    model = build_classifier(get_preset("tiny"), 6)
    state = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "double.safetensors"
    save_weights(path, state, model_metadata(model))
    with pytest.raises(WeightsError, match=r"double.safetensors: tensor .* is torch.float64 in the file but torch.float32"):
        build_from_weights(path)


def test_encoder_transfer_refuses_a_tensor_of_another_dtype(tmp_path):
    path = tmp_path / "half.safetensors"
    save_weights(path, {"encoder.patch_embed.bias": torch.zeros(96, dtype=torch.float16)}, {"preset": "tiny"})
    with pytest.raises(WeightsError, match="half.safetensors: tensor encoder.patch_embed.bias is torch.float16"):
        load_pretrained(build_segmenter("transunet", get_preset("tiny")), path)


def test_header_declaring_a_tensor_larger_than_the_file_is_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}).encode()
    path = tmp_path / "liar.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 64)
    with pytest.raises(WeightsError, match="liar.safetensors: truncated or corrupt"):
        load_weights(path)


FUZZ_CASES = []


@pytest.fixture(scope="module", autouse=True)
def report_fuzz_cases():
    yield
    print(f"\nfuzzed weights files: {len(FUZZ_CASES)} cases")


@settings(max_examples=150, deadline=timedelta(seconds=5), derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255), st.booleans()), min_size=1, max_size=4))
def test_fuzzed_weights_files_load_or_raise_weights_error(tmp_path, edits):
    FUZZ_CASES.append(1)
    data = bytearray(safetensors.torch.save({"a": torch.arange(8.0), "b": torch.ones(2, 2, dtype=torch.int64)},
                                           metadata={"preset": '"tiny"'}))
    for where, value, cut in edits:
        at = int(where * (len(data) - 1))
        if cut:
            del data[at:]
        else:
            data[at] = value
        if not data:
            break
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(data))
    try:
        tensors, _ = load_weights(path)
    except WeightsError as exc:
        assert str(exc).startswith(str(path))
    else:
        assert set(tensors) <= {"a", "b"}


def test_a_safetensors_file_whose_header_length_starts_with_0x80_loads(tmp_path):
    # About 1 file in 256: the low byte of the 8-byte header length is 0x80, which is also a pickle's first byte.
    path = tmp_path / "global.safetensors"
    for pad in range(300):
        save_weights(path, {"w": torch.ones(2)}, {"note": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    tensors, metadata = load_weights(path)
    assert torch.equal(tensors["w"], torch.ones(2)) and metadata["note"] == "x" * pad


def test_a_checkpoint_whose_header_length_starts_with_0x80_resumes(tmp_path):
    from fedefm.checkpoints import CheckpointStore

    store = CheckpointStore(tmp_path)
    for pad in range(300):
        path = store.save(1, {"w": torch.ones(3)}, {"round": 1, "pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    tensors, info = store.load_latest()
    assert path.read_bytes()[:1] == b"\x80" and info["round"] == 1 and torch.equal(tensors["w"], torch.ones(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_holding_nan_or_inf_are_refused_naming_the_file_and_tensor(tmp_path, bad):
    model = build_segmenter("transunet", get_preset("tiny"), 3)
    state = dict(model.state_dict())
    key = next(k for k in state if k.startswith("encoder.") and state[k].is_floating_point())
    state[key] = state[key].clone().fill_(bad)
    path = tmp_path / "diverged.safetensors"
    save_weights(path, state, model_metadata(model))
    with pytest.raises(WeightsError, match=rf"diverged.safetensors: tensor {key} holds NaN or infinite values"):
        build_from_weights(path)
    with pytest.raises(WeightsError, match="diverged.safetensors: tensor"):
        load_pretrained(build_segmenter("transunet", get_preset("tiny"), 3), path)


# --- packed weights (one byte string per model, as Flower messages carry them) ---------------------------------

PACKED_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                 torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 5), (2, 0, 4), (2, 3, 1, 4)])
def test_packed_weights_round_trip_every_dtype_and_shape_in_order(shape):
    generator = torch.Generator().manual_seed(0)
    weights = {f"t{k}.{dtype}".replace("torch.", ""): (torch.randn(shape, generator=generator) * 50).to(dtype)
               for k, dtype in enumerate(reversed(PACKED_DTYPES))}
    weights["strided"] = torch.arange(24.0).reshape(4, 6)[:, ::2]  # not contiguous
    back = unpack_weights(pack_weights(weights), "silo 1")
    assert list(back) == list(weights)
    for name, tensor in weights.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)
    back["strided"] += 1  # writable, owned by the receiver
    assert not torch.equal(back["strided"], weights["strided"])


def test_truncated_packed_weights_are_refused_naming_the_sender():
    packed = pack_weights({"w": torch.randn(4, 4), "b": torch.zeros(4)})
    for broken in (packed[:-1], packed[:20], packed[:7], b""):
        with pytest.raises(WeightsError, match="silo 2's reply: packed weights are truncated or inconsistent"):
            unpack_weights(broken, "silo 2's reply")


def test_packed_weights_with_an_inconsistent_index_are_refused():
    packed = pack_weights({"w": torch.randn(4, 4)})
    size = int.from_bytes(packed[:8], "little")
    index = json.loads(packed[8 : 8 + size])

    def rebuilt(index) -> bytes:
        header = json.dumps(index).encode()
        header += b" " * (-len(header) % 8)
        return len(header).to_bytes(8, "little") + header + packed[8 + size :]

    wrong_shape = index | {"w": index["w"] | {"shape": [4, 5]}}
    wrong_offsets = index | {"w": index["w"] | {"data_offsets": [0, 32]}}
    no_order = {"w": index["w"]}
    extra_name = index | {"__metadata__": {"fedefm_order": json.dumps(["w", "v"])}}
    for bad in (wrong_shape, wrong_offsets, no_order, extra_name):
        with pytest.raises(WeightsError, match="packed weights are truncated or inconsistent"):
            unpack_weights(rebuilt(bad), "silo 0")
    assert torch.equal(unpack_weights(rebuilt(index), "silo 0")["w"], unpack_weights(packed, "silo 0")["w"])
