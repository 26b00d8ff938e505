"""Each table script's --quick mode writes its result file with the documented columns; BENCHMARKS.md is generated
from those files and refuses a table whose file is missing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BENCHMARKS, run_benchmark

COMMON = {"table", "machine", "command", "wall_s", "seed"}
MACHINE = {"platform", "cpu", "cores", "torch", "python", "fedefm", "threads", "cuda"}
FOUNDATION = COMMON | {"name", "setting", "algorithm", "topology", "options", "unseen", "silos", "shots", "rounds",
                       "local_steps", "batch_size", "image_size", "run", "summary", "rows"}
DOWNSTREAM = COMMON | {"domain", "shots", "init", "init_weights", "arch", "epochs", "image_size", "run", "transfer",
                       "best_epoch", "val_dice", "test"}
POSITION = COMMON | {"kind", "pooling", "shots", "init", "init_weights", "epochs", "image_size", "run", "transfer",
                     "best_epoch", "val_balanced_accuracy", "test", "correct"}
EXPECTED = {
    "t1": (FOUNDATION, {"centralized", "fedavg", "fedprox", "moon", "fedefm_star", "dpsgd", "matcha", "fedefm_ring"}),
    "t2": (FOUNDATION, {f"{a}_u{u}" for a in ("fedavg", "dpsgd", "fedefm") for u in (0, 1)}),
    "t3": (DOWNSTREAM, {"scratch", "centralized", "fedavg", "dpsgd", "fedefm_ring"}),
    "t4": (DOWNSTREAM, {"unet/scratch", "swinunetr/scratch", "transunet/scratch", "transunet/fedefm_ring"}),
    "t5": (FOUNDATION, {"emd", "uniform", "released", "kl_only", "sinkhorn", "star_shots1"}),
    "t6": (POSITION, {"mean/scratch", "mean/segmenter", "tip/segmenter", "mask/segmenter", "path/segmenter",
                      "path/segmenter_tips", "path/segmenter_cldice", "path/segmenter_unet", "path/segmenter_unet80",
                      "path/segmenter_unet160", "path/segmenter_unet_n4800", "path/segmenter_unet_tips_n4800",
                      "path/segmenter_unet_tips3_n4800", "mean/foundation", "tip/foundation"}),
    "t8": (DOWNSTREAM | {"crop", "samples_per_epoch", "eval_every", "budget", "train_s"}, {"scratch"}),
}
SCRIPTS = {"t1": "t1_foundation.py", "t2": "t2_unseen.py", "t3": "t3_downstream.py", "t4": "t4_backbones.py",
           "t5": "t5_fedefm_ablation.py", "t6": "t6_position.py", "t7": "t7_dense_foundation.py",
           "t8": "t8_guidewire.py"}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_names(table: str, rows: list[dict]) -> set[str]:
    if table in ("t3", "t8"):
        return {r["init"] for r in rows}
    if table == "t6":
        return {f"{r['pooling']}/{r['init']}" for r in rows if r["kind"] == "position"}
    if table == "t4":
        return {f"{r['arch']}/{r['init']}" for r in rows}
    return {r["name"] for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("table", list(EXPECTED))  # T7 has its own test below
def test_quick_mode_writes_every_run_with_the_documented_columns(quick_benchmarks, table):
    rows = read_rows(quick_benchmarks / table / "results.jsonl")
    if table == "t6":  # each segmenter the device-anchored models start from is a row of its own
        assert sorted((r["init"], r["arch"], r["loss"], r["tip_weight"]) for r in rows if r["kind"] == "segmenter") == [
            ("segmenter", "transunet", "dicece", 1.0), ("segmenter_cldice", "transunet", "cldice", 1.0),
            ("segmenter_tips", "transunet", "tips", 1.0), ("segmenter_unet", "unet", "dicece", 1.0),
            ("segmenter_unet160", "unet", "dicece", 1.0), ("segmenter_unet80", "unet", "dicece", 1.0),
            ("segmenter_unet_n4800", "unet", "dicece", 1.0), ("segmenter_unet_tips3_n4800", "unet", "tips", 3.0),
            ("segmenter_unet_tips_n4800", "unet", "tips", 1.0)]
        rows = [r for r in rows if r["kind"] == "position"]
    columns, names = EXPECTED[table]
    assert run_names(table, rows) == names
    for row in rows:
        assert columns <= set(row), columns - set(row)
        assert row["table"] == table.upper() and set(row["machine"]) == MACHINE
        assert row["command"].startswith(f"python benchmarks/{SCRIPTS[table]} --quick") and row["wall_s"] > 0
        if columns is FOUNDATION:
            assert 0 <= row["summary"]["test_acc"] <= 1 and len(row["rows"]) == row["rounds"] == 2
        elif DOWNSTREAM <= columns:
            assert set(row["test"]["per_class"]) == {"catheter", "guidewire"} and row["shots"] == 4
        else:
            assert set(row["test"]["per_class"]) == {"aortic_arch", "descending_aorta", "looped", "supra_aortic"}
            assert 0 <= row["test"]["balanced_accuracy"] <= 1 and row["shots"] == 2
            assert len(row["correct"]) == row["test"]["n_images"]


@pytest.mark.slow
def test_t7_pretrains_in_both_settings_and_scores_every_test_image_of_every_init(quick_benchmarks):
    rows = read_rows(quick_benchmarks / "t7" / "results.jsonl")
    pretrained = {(r["setting"], r["name"]) for r in rows if r["kind"] == "pretrain"}
    assert pretrained == {("joined", n) for n in ("classify_centralized", "segment_centralized", "segment_fedavg",
                                                  "segment_dpsgd", "segment_fedefm", "mim_centralized")} | {
        ("absent", "segment_centralized"), ("absent", "segment_fedefm")}
    joined = next(r for r in rows if r["kind"] == "pretrain" and r["name"] == "segment_fedefm" and r["setting"] == "joined")
    assert "images only" in (Path(joined["run"]) / "partition.txt").read_text() and "val_dice" in joined["rows"][0]
    tuned = [r for r in rows if r["kind"] == "finetune"]
    assert {(r["setting"], r["init"]) for r in tuned} >= {("any", "scratch"), ("any", "unet_scratch"),
                                                          ("joined", "segment_fedefm"), ("absent", "segment_fedefm")}
    for row in tuned:
        assert DOWNSTREAM <= set(row) and row["shots"] == 4
        n_test = row["test"]["n_images"]
        assert all(len(row["per_image"][c]) == n_test for c in ("catheter", "guidewire"))
    dense = next(r for r in tuned if r["init"] == "segment_fedefm")
    assert dense["transfer"].startswith("all: ") and "decoder.*" in dense["transfer"]


@pytest.mark.slow
def test_t2_runs_each_unseen_share_it_names(quick_benchmarks):
    rows = read_rows(quick_benchmarks / "t2" / "results.jsonl")
    assert {(r["algorithm"], r["unseen"]) for r in rows} == {(a, u) for a in ("fedavg", "dpsgd", "fedefm")
                                                             for u in (0.0, 1.0)}
    partitions = {r["unseen"]: (Path(r["run"]) / "partition.txt").read_text()
                  for r in rows if r["algorithm"] == "fedavg"}
    assert partitions[0.0] != partitions[1.0]


@pytest.mark.slow
def test_t3_starts_foundation_runs_from_the_t1_weights_it_names(quick_benchmarks):
    rows = read_rows(quick_benchmarks / "t3" / "results.jsonl")
    by_init = {r["init"]: r for r in rows}
    assert by_init["scratch"]["init_weights"] == "scratch" and by_init["scratch"]["transfer"] is None
    t1_weights = quick_benchmarks / "t1" / "runs" / "fedavg_s0" / "global.safetensors"
    assert by_init["fedavg"]["init_weights"] == str(t1_weights)
    assert by_init["fedavg"]["transfer"].startswith("encoder: loaded ")


@pytest.mark.slow
def test_a_rerun_skips_the_runs_already_recorded(quick_benchmarks, capsys):
    before = (quick_benchmarks / "t3" / "results.jsonl").read_text()
    run_benchmark("t3_downstream.py", "--quick", "--threads", "1", "--out", str(quick_benchmarks / "t3"),
                  "--foundation", str(quick_benchmarks / "t1"), "--inits", "scratch")
    assert (quick_benchmarks / "t3" / "results.jsonl").read_text() == before
    assert "clinical transunet scratch K=4 seed 0: already recorded, skipped" in capsys.readouterr().out


def test_t3_with_a_foundation_init_but_no_t1_folder_stops_before_training(tmp_path):
    with pytest.raises(SystemExit, match="needs --foundation"):
        run_benchmark("t3_downstream.py", "--quick", "--out", str(tmp_path), "--inits", "fedavg")
    assert not (tmp_path / "results.jsonl").exists()


def test_t3_names_the_t1_runs_it_found_when_one_is_missing(tmp_path):
    (tmp_path / "t1" / "runs" / "fedavg_s0").mkdir(parents=True)
    (tmp_path / "t1" / "runs" / "fedavg_s0" / "global.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="no finished pre-training 'dpsgd' \\(found: fedavg_s0\\)"):
        run_benchmark("t3_downstream.py", "--quick", "--out", str(tmp_path / "t3"),
                      "--foundation", str(tmp_path / "t1"), "--inits", "fedavg", "dpsgd")


def make_md(*args: str) -> None:
    run_benchmark("make_benchmarks_md.py", *args)


@pytest.mark.slow
def test_benchmarks_md_has_every_table_with_its_machine_command_and_seeds(quick_benchmarks, tmp_path):
    claims = tmp_path / "claims.md"
    claims.write_text("FedEFM beats FedAvg here: a hand-written sentence.")
    out = tmp_path / "BENCHMARKS.md"
    make_md("--results", str(quick_benchmarks), "--out", str(out), "--claims", str(claims))
    text = out.read_text()
    for table, script in SCRIPTS.items():
        assert f"## {table.upper()} — " in text
        assert f"python benchmarks/{script} --quick --threads 1 --out {quick_benchmarks / table}" in text
    assert text.count("Machine: ") == 8 and text.count("Seeds: 0.") == 8
    assert text.count("Quick mode (CI-sized)") == 8
    assert "catheter gain (Dice points, 95% CI)" in text
    assert "| fedefm_ring |" in text and "| transunet | fedefm_ring | 4 |" in text and "| 2 | tip | foundation |" in text
    assert text.rstrip().endswith("FedEFM beats FedAvg here: a hand-written sentence.")


@pytest.mark.slow
def test_benchmarks_md_without_a_claims_file_says_the_statement_is_not_written(quick_benchmarks, tmp_path):
    make_md("--results", str(quick_benchmarks), "--out", str(tmp_path / "B.md"), "--tables", "T2",
            "--claims", str(tmp_path / "absent.md"))
    assert "_Not written yet:" in (tmp_path / "B.md").read_text()


def test_benchmarks_md_refuses_a_table_whose_result_file_is_missing(tmp_path):
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "results.jsonl").write_text("")
    missing = tmp_path / "t2" / "results.jsonl"
    with pytest.raises(SystemExit, match=f"T2 \\(Unseen-share ablation\\): result file {missing} is missing; "
                                         "run python benchmarks/t2_unseen.py") as stop:
        make_md("--results", str(tmp_path), "--out", str(tmp_path / "BENCHMARKS.md"), "--tables", "T1", "T2")
    assert isinstance(stop.value.code, str)  # a message, so the interpreter exits with status 1
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_benchmarks_md_refuses_an_empty_result_file(tmp_path):
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "results.jsonl").write_text("")
    with pytest.raises(SystemExit, match="t1/results.jsonl: holds no results"):
        make_md("--results", str(tmp_path), "--out", str(tmp_path / "BENCHMARKS.md"), "--tables", "T1")


def test_the_committed_benchmarks_md_is_what_the_committed_result_files_generate(tmp_path, monkeypatch):
    monkeypatch.chdir(BENCHMARKS.parent)  # the generator's defaults are paths from the repository root
    make_md("--out", str(tmp_path / "BENCHMARKS.md"))
    assert (tmp_path / "BENCHMARKS.md").read_text() == (BENCHMARKS.parent / "BENCHMARKS.md").read_text()


def test_t6_oracles_record_each_input_and_the_contrast_once(tmp_path):
    run_benchmark("t6_oracles.py", "--quick", "--threads", "1", "--out", str(tmp_path))
    first = (tmp_path / "results.jsonl").read_text()
    rows = read_rows(tmp_path / "results.jsonl")
    oracles = [r for r in rows if r["kind"] == "oracle"]
    assert {r["input"] for r in oracles} == {"image", "true_mask", "image+true_mask", "true_mask_path", "true_mask_ends"}
    assert all(r["table"] == "T6" and 0 <= r["val_balanced_accuracy"] <= 1 and r["per_class"] == 4 for r in oracles)
    assert [(r["size"], r["frames"]) for r in rows if r["kind"] == "contrast"] == [(32, 16)]
    run_benchmark("t6_oracles.py", "--quick", "--threads", "1", "--out", str(tmp_path))
    assert (tmp_path / "results.jsonl").read_text() == first  # recorded runs are skipped


def test_reach_along_course_says_which_piece_of_the_catheter_the_segmenter_found(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from t6_oracles import reach_along_course

    truth = np.zeros((64, 64), np.float32)
    truth[10:63, 31:34] = 1  # a straight catheter entering at the bottom edge, its tip at row 10
    image = np.random.default_rng(0).normal(0.6, 0.01, (64, 64)).astype(np.float32) - 0.1 * truth
    found = truth.copy()
    found[:36] = 0  # the segmenter sees the entry half only
    reach = reach_along_course(torch.tensor(np.stack([image, truth, found])[None]), parts=4)
    assert reach["found"][:2] == [1.0, 1.0] and reach["found"][-1] == 0.0
    assert all(c > 5 for c in reach["contrast"])  # darker than its ring by 10 noise deviations
    assert reach["missed_probability"][-1] == 0.0 and np.isnan(reach["missed_probability"][0])  # none missed there


def test_reach_along_course_says_how_much_of_what_the_segmenter_found_lies_in_the_pieces_the_course_runs_through(
        monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from t6_oracles import reach_along_course

    truth = np.zeros((64, 64), np.float32)
    truth[10:63, 31:34] = 1
    wide, narrow = truth.copy(), truth.copy()
    wide[26:36] = 0  # a gap wider than the course bridges: the tip end is found but cut off from the entry piece
    narrow[32:36] = 0  # a gap the course bridges
    reach = reach_along_course(torch.tensor(np.stack([np.stack([truth, truth, found]) for found in (wide, narrow)])),
                               parts=4)
    assert reach["found"][0] == reach["found"][-1] == 1.0
    assert reach["on_traced"][0] == 1.0 and reach["on_traced"][-1] == 0.5  # the mean of 0 (wide) and 1 (narrow)


def test_segmenter_channels_split_its_misses_from_its_false_positives(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from t6_oracles import with_segmenter_mask

    from fedefm.models.presets import get_preset
    from fedefm.models.segmenters import TransUNet
    from fedefm.models.weights import model_metadata, save_weights

    x = torch.zeros(1, 2, 32, 32)
    x[0, 1, 8:24, 16] = 1  # the true catheter
    truth = x[0, 1]
    segmenter = TransUNet(get_preset("tiny"))
    for catheter_logit, hits, with_false_positives in ((-9.0, torch.zeros_like(truth), truth),  # finds nothing
                                                        (9.0, truth, torch.ones_like(truth))):  # calls it everywhere
        with torch.no_grad():  # a segmenter whose output is its head's bias alone
            for parameter in segmenter.parameters():
                parameter.zero_()
            segmenter.segmentation_head.bias.copy_(torch.tensor([0.0, catheter_logit, -9.0]))
        save_weights(tmp_path / "constant.safetensors", segmenter, model_metadata(segmenter))
        with_masks = with_segmenter_mask(x, tmp_path / "constant.safetensors")
        assert with_masks.shape == (1, 5, 32, 32) and torch.equal(with_masks[:, :2], x)
        assert torch.equal(with_masks[0, 3], hits) and torch.equal(with_masks[0, 4], with_false_positives)


def test_oracle_rows_of_two_segmenters_of_one_size_are_told_apart_by_their_command(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from t6_oracles import oracle_tables, segmenter_run

    def row(input_name: str, segmenter: str, accuracy: float) -> dict:
        return {"kind": "oracle", "size": 128, "input": input_name, "per_class": 16, "seed": 0,
                "val_balanced_accuracy": accuracy,
                "command": f"python benchmarks/t6_oracles.py --out OUT --segmenter runs/{segmenter}/model.safetensors"}

    rows = [row("segmenter_mask_path", "segmenter", 0.3), row("segmenter_mask_path", "segmenter_tips", 0.5),
            row("true_mask_path", "segmenter", 0.8)]
    assert segmenter_run(rows[1]) == "runs/segmenter_tips/model.safetensors" and segmenter_run(rows[2]) is None
    table = oracle_tables(rows)
    assert "segmenter_mask_path (`segmenter`) | 16 | 0.300" in table
    assert "segmenter_mask_path (`segmenter_tips`) | 16 | 0.500" in table and "| true_mask_path | 16 | 0.800" in table
