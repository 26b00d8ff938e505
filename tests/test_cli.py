import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from fedefm import __version__
from fedefm.cli import app

runner = CliRunner()


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_lists_every_sub_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("synth", "data", "finetune", "evaluate", "predict", "demo", "report"):
        assert command in result.output


def test_synth_seg_writes_images_masks_and_manifest(tmp_path):
    out = tmp_path / "seg"
    result = runner.invoke(app, ["synth", "seg", str(out), "--domain", "phantom", "--n", "3", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "images").glob("*.png"))) == len(list((out / "masks").glob("*.png"))) == 3
    assert json.loads((out / "manifest.json").read_text())["domain"] == "phantom"


def test_synth_seg_unknown_domain_suggests_the_right_one(tmp_path):
    result = runner.invoke(app, ["synth", "seg", str(tmp_path / "x"), "--domain", "clinicl", "--n", "2"])
    assert result.exit_code == 1
    assert "clinical" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_synth_pretrain_writes_one_folder_per_class(tmp_path):
    out = tmp_path / "corpus"
    result = runner.invoke(app, ["synth", "pretrain", str(out), "--per-class", "2", "--size", "64"])
    assert result.exit_code == 0, result.output
    classes = [p for p in out.iterdir() if p.is_dir()]
    assert len(classes) >= 6 and all(len(list(c.glob("*.png"))) == 2 for c in classes)
    assert (out / "labels.json").is_file() and "phantom: masks of vessel" in result.output
    plain = tmp_path / "plain"
    assert runner.invoke(app, ["synth", "pretrain", str(plain), "--per-class", "2", "--size", "64", "--no-masks"]
                         ).exit_code == 0
    assert not (plain / "labels.json").exists() and not list(plain.glob("*/masks"))


def test_data_check_passes_a_good_folder_and_names_every_bad_file(tmp_path):
    out = tmp_path / "seg"
    assert runner.invoke(app, ["synth", "seg", str(out), "--n", "4", "--size", "64"]).exit_code == 0
    good = runner.invoke(app, ["data", "check", str(out)])
    assert good.exit_code == 0, good.output
    masks = sorted((out / "masks").glob("*.png"))
    masks[0].write_bytes(b"garbage")
    masks[1].write_bytes(masks[1].read_bytes()[:40])
    bad = runner.invoke(app, ["data", "check", str(out)])
    assert bad.exit_code == 1
    assert masks[0].name in bad.output and masks[1].name in bad.output


def test_pretrain_writes_the_run_folder_and_names_a_bad_option(tmp_path):
    corpus = tmp_path / "corpus"
    assert runner.invoke(app, ["synth", "pretrain", str(corpus), "--per-class", "6", "--size", "32"]).exit_code == 0
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(corpus), "--out", str(out), "--algorithm", "fedavg", "--silos", "2",
            "--rounds", "1", "--image-size", "32", "--batch-size", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "global.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    bad = runner.invoke(app, args + ["--option", "mu=0.1"])
    assert bad.exit_code == 1 and "--option mu: not a setting of fedavg" in bad.output


def test_topology_prints_the_cycle_time_of_every_overlay():
    result = runner.invoke(app, ["topology", "--underlay", "gaia", "--preset", "tiny", "--silos", "5"])
    assert result.exit_code == 0, result.output
    for overlay in ("star", "ring", "mst", "complete", "matcha"):
        assert overlay in result.output


def test_data_partition_prints_disjoint_silos_at_full_unseen(tmp_path):
    corpus = tmp_path / "corpus"
    assert runner.invoke(app, ["synth", "pretrain", str(corpus), "--per-class", "6", "--size", "32"]).exit_code == 0
    result = runner.invoke(app, ["data", "partition", str(corpus), "--silos", "3", "--unseen", "1"])
    assert result.exit_code == 0, result.output
    assert "clinical" in result.output and "ct_slice" in result.output
    assert "catheter  guidewire  vessel  images only" in result.output


def one_line_error(result, *names):
    """The command failed with exit 1 and one 'error:' line naming each of ``names``, and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert text.startswith("error: ") and all(name in text for name in names), result.output


def test_out_below_a_file_names_the_path_and_the_errno(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "notes").write_text("")
    out = tmp_path / "notes" / "run"
    result = runner.invoke(app, ["pretrain", "--data", str(tmp_path / "data"), "--out", str(out), "--silos", "2"])
    one_line_error(result, str(out), "Not a directory (ENOTDIR)", "choose another path")


def test_a_full_disk_names_the_file_and_says_how_to_go_on(tmp_path, monkeypatch):
    import errno

    import fedefm.files

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fedefm.files.os, "fsync", full)
    (tmp_path / "data").mkdir()
    result = runner.invoke(app, ["pretrain", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                 "--silos", "2"])
    one_line_error(result, str(tmp_path / "run" / "run.json"), "No space left on device (ENOSPC)", "--resume")


@pytest.mark.parametrize(("module", "command"), [("flwr", ["flower", "app"]), ("cryptography", ["flower", "certificates"])])
def test_flower_commands_without_the_flower_extra_say_how_to_install_it(tmp_path, monkeypatch, module, command):
    for name in [name for name in sys.modules if name.startswith(("fedefm.federated.flower", module))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import flwr / cryptography now raises ModuleNotFoundError
    result = runner.invoke(app, [*command, str(tmp_path / "out")])
    one_line_error(result, f"module {module} is not installed", "pip install 'fedefm[flower]'")


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    from fedefm.data.synth import write_seg_dataset
    from fedefm.finetune import train
    from fedefm.finetune.config import FinetuneConfig

    root = tmp_path_factory.mktemp("segmenter")
    write_seg_dataset(root / "data", "clinical", 8, size=64, seed=0)
    train.run(FinetuneConfig(data=root / "data", out=root / "run", shots=2, epochs=1, batch_size=2,
                             samples_per_epoch=2, image_size=64, device="cpu"), progress=False)
    return root / "run" / "model.safetensors", root / "data" / "images"


def dicom_with_frames_field(path, value: bytes):
    """A 2-frame DICOM whose NumberOfFrames bytes are replaced by ``value`` (2 bytes)."""
    from test_readers import write_dicom

    write_dicom(path, np.ones((2, 16, 16), dtype=np.uint16))
    data = path.read_bytes()
    at = data.index(b"\x28\x00\x08\x00IS\x02\x00") + 8
    path.write_bytes(data[:at] + value + data[at + 2 :])
    return path


def hostile_inputs(folder, good_image):
    """Two good inputs, a DICOM whose NumberOfFrames is '1A' and a float TIFF holding NaN."""
    folder.mkdir()
    shutil.copy(good_image, folder / "good.png")
    dicom_with_frames_field(folder / "frames_1a.dcm", b"1A")
    nan = np.ones((16, 16), dtype=np.float32)
    nan[3, 3] = np.nan
    tifffile.imwrite(folder / "nan.tif", nan)
    shutil.copy(good_image, folder / "zz_good.png")
    return folder


def test_predict_skip_bad_lists_every_bad_input_and_writes_the_good_ones(segmenter, tmp_path):
    model, images = segmenter
    inputs = hostile_inputs(tmp_path / "in", next(images.glob("*.png")))
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", "--model", str(model), "--out", str(out), "--skip-bad", str(inputs)])
    assert result.exit_code == 0, result.output
    skipped = (out / "skipped.txt").read_text()
    assert "frames_1a.dcm" in skipped and "NumberOfFrames" in skipped and "nan.tif" in skipped and "NaN" in skipped
    assert sorted(p.name for p in out.glob("*_mask.png")) == ["good_mask.png", "zz_good_mask.png"]


def test_predict_stops_at_a_bad_input_with_one_line_and_writes_nothing(segmenter, tmp_path):
    model, images = segmenter
    inputs = hostile_inputs(tmp_path / "in", next(images.glob("*.png")))
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", "--model", str(model), "--out", str(out), str(inputs)])
    one_line_error(result, "frames_1a.dcm", "NumberOfFrames is not a whole number")
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
    (inputs / "frames_1a.dcm").unlink()
    result = runner.invoke(app, ["predict", "--model", str(model), "--out", str(out), str(inputs)])
    one_line_error(result, "nan.tif", "NaN")
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]  # good.png's mask was written, then taken back


def test_predict_keeps_the_outputs_of_same_named_inputs_apart(segmenter, tmp_path):
    model, images = segmenter
    source = sorted(images.glob("*.png"))
    for folder, image in zip("ab", source):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "x.png")
    (tmp_path / "c").mkdir()
    from test_readers import write_dicom

    write_dicom(tmp_path / "c" / "x.dcm", np.arange(256, dtype=np.uint16).reshape(16, 16))
    out = tmp_path / "out"
    inputs = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), str(tmp_path / "c" / "x.dcm")]
    result = runner.invoke(app, ["predict", "--model", str(model), "--out", str(out), *inputs])
    assert result.exit_code == 0, result.output
    masks = sorted(p.name for p in out.glob("*_mask.png"))
    assert masks == ["a__x_mask.png", "b__x_mask.png", "c__x_mask.png"]


def test_predict_into_the_folder_of_an_earlier_prediction_needs_overwrite(segmenter, tmp_path):
    model, images = segmenter
    image = str(next(images.glob("*.png")))
    out = tmp_path / "out"
    assert runner.invoke(app, ["predict", "--model", str(model), "--out", str(out), image]).exit_code == 0
    one_line_error(runner.invoke(app, ["predict", "--model", str(model), "--out", str(out), image]),
                   str(out), "already holds a predict run", "--overwrite")
    result = runner.invoke(app, ["predict", "--model", str(model), "--out", str(out), "--overwrite", image])
    assert result.exit_code == 0, result.output


def test_nan_weights_given_to_evaluate_predict_and_finetune_init_are_named(segmenter, tmp_path):
    from fedefm.models.weights import load_weights, save_weights

    model, images = segmenter
    tensors, metadata = load_weights(model)
    key = next(k for k in tensors if k.startswith("encoder.") and tensors[k].is_floating_point())
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    diverged = tmp_path / "diverged.safetensors"
    save_weights(diverged, tensors, metadata)
    data = images.parent
    for command in (["evaluate", "--model", str(diverged), "--data", str(data)],
                    ["predict", "--model", str(diverged), "--out", str(tmp_path / "masks"), str(images)],
                    ["finetune", "--data", str(data), "--out", str(tmp_path / "run"), "--init", str(diverged),
                     "--epochs", "1", "--image-size", "64", "--device", "cpu"]):
        one_line_error(runner.invoke(app, command), "diverged.safetensors", f"tensor {key} holds NaN")


def test_data_check_names_a_malformed_dicom_and_keeps_pydicom_tracebacks_off_the_terminal(tmp_path):
    import subprocess

    import pydicom.data

    root = tmp_path / "corpus"
    for name in ("angio", "phantom"):
        (root / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((16, 16), 40 * k, dtype=np.uint8)).save(root / name / f"{k}.png")
    dicom_with_frames_field(root / "angio" / "frames_1a.dcm", b"1A")
    shutil.copy(pydicom.data.get_testdata_file("JPEG-lossy.dcm"), root / "angio" / "broken_jpeg.dcm")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    done = subprocess.run([sys.executable, "-m", "fedefm", "data", "check", str(root)], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "frames_1a.dcm" in done.stderr and "broken_jpeg.dcm" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr and "UserWarning" not in done.stderr


def test_an_error_naming_a_path_with_brackets_prints_the_brackets(tmp_path):
    out = tmp_path / "[run]"
    out.mkdir()
    (out / "notes.txt").write_text("")
    (tmp_path / "data").mkdir()
    result = runner.invoke(app, ["pretrain", "--data", str(tmp_path / "data"), "--out", str(out), "--silos", "2"])
    one_line_error(result, f"--out {out}: holds 1 entries that are not a fedefm run (notes.txt)")


def test_synth_seg_full_wire_label_is_recorded_and_a_misspelt_one_is_refused(tmp_path):
    out = tmp_path / "seg"
    result = runner.invoke(app, ["synth", "seg", str(out), "--n", "1", "--size", "32", "--wire-label", "full"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["wire_label"] == "full"
    result = runner.invoke(app, ["synth", "seg", str(tmp_path / "x"), "--n", "1", "--wire-label", "leed"])
    assert result.exit_code == 1 and "did you mean 'lead'" in result.output
    assert not (tmp_path / "x").exists()
