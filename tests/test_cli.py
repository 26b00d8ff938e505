import json

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


def test_synth_seg_full_wire_label_is_recorded_and_a_misspelt_one_is_refused(tmp_path):
    out = tmp_path / "seg"
    result = runner.invoke(app, ["synth", "seg", str(out), "--n", "1", "--size", "32", "--wire-label", "full"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["wire_label"] == "full"
    result = runner.invoke(app, ["synth", "seg", str(tmp_path / "x"), "--n", "1", "--wire-label", "leed"])
    assert result.exit_code == 1 and "did you mean 'lead'" in result.output
    assert not (tmp_path / "x").exists()
