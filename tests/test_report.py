"""fedefm report: every section from the quick benchmark outputs, a note for each section without input, and a page
that headless Chromium renders."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedefm.cli import app
from fedefm.errors import ConfigError, DataError
from fedefm.models.weights import save_weights
from fedefm.report import SECTIONS, build_report, consensus_distance, read_partition
from fedefm.results import downstream_summary, markdown, mean_std

DOWNSTREAM_ROW = {
    "table": "T3", "domain": "clinical", "shots": 4, "init": "scratch", "arch": "transunet", "seed": 0,
    "test": {"n_images": 3, "per_class": {c: {"dice": 0.5, "iou": 0.25, "cldice": 0.4, "hd95": 12.0}
                                          for c in ("catheter", "guidewire")},
             "mean": {"dice": 0.5, "iou": 0.25, "cldice": 0.4, "hd95": 12.0}},
}


@pytest.fixture(scope="module")
def quick_report(quick_benchmarks, tmp_path_factory):
    """(page path, {section: had content}) of the report of every quick benchmark output."""
    out = tmp_path_factory.mktemp("report") / "report.html"
    return out, build_report([quick_benchmarks], out)


@pytest.mark.slow
def test_report_of_the_quick_benchmarks_fills_every_section_with_embedded_figures(quick_report):
    out, shown = quick_report
    assert shown == {title: True for title in SECTIONS}
    page = out.read_text()
    assert re.findall(r"<h2>(.*?)</h2>", page) == list(SECTIONS)
    assert "Not shown:" in page  # only the per-round consensus note: metrics rows carry no consensus_distance
    assert page.count("Not shown:") == 1
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 5
    assert not re.search(r'(src|href)="(http|file|/)', page)
    for name in ("fedefm_ring", "released", "swinunetr", "clinical_transunet_fedavg_k4_s0"):
        assert name in page


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(quick_report, tmp_path):
    page, shot = quick_report[0], tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (3000, 1200)
    assert (pixels < 200).mean() > 0.05  # text, plots and heat maps, not a blank page
    assert pixels.std() > 30


def test_sections_without_input_say_what_they_needed(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.jsonl").write_text(json.dumps(DOWNSTREAM_ROW) + "\n")
    shown = build_report([tmp_path / "bench"], tmp_path / "report.html")
    assert [title for title, has in shown.items() if has] == ["Downstream tables"]
    page = (tmp_path / "report.html").read_text()
    assert page.count('<p class="absent">Not shown:') == 5
    assert "no fine-tuning run folder" in page and "no pre-training run" in page
    assert "0.500 ± 0.000" in page


def test_consensus_distance_is_the_mean_distance_of_silo_weights_to_their_mean(tmp_path):
    # silo weights (0, 0) and (3, 4): mean (1.5, 2), each 2.5 away
    for i, w in enumerate(([0.0, 0.0], [3.0, 4.0])):
        tensors = {"w": torch.tensor(w), "steps": torch.tensor([7])}  # integer tensors do not count
        save_weights(tmp_path / "silos" / f"silo_{i}.safetensors", tensors, {})
    assert consensus_distance(tmp_path) == pytest.approx(2.5)


def test_consensus_distance_of_a_single_silo_is_undefined(tmp_path):
    save_weights(tmp_path / "silos" / "silo_0.safetensors", {"w": torch.zeros(2)}, {})
    assert consensus_distance(tmp_path) is None


def test_partition_table_reads_back_as_counts(tmp_path):
    (tmp_path / "partition.txt").write_text("silo   animal  clinical  total\n0  5  0  5\n1  0  7  7\ntotal  5  7  12\n")
    classes, counts = read_partition(tmp_path / "partition.txt")
    assert classes == ["animal", "clinical"] and counts.tolist() == [[5, 0], [0, 7]]


def test_report_refuses_a_missing_folder_and_one_without_runs(tmp_path):
    with pytest.raises(ConfigError, match="nowhere: no such folder"):
        build_report([tmp_path / "nowhere"], tmp_path / "r.html")
    with pytest.raises(DataError, match="no pre-training or fine-tuning run folder and no results.jsonl"):
        build_report([tmp_path], tmp_path / "r.html")


def test_cli_report_writes_the_page_and_names_the_sections_without_input(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(DOWNSTREAM_ROW) + "\n")
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # rich wraps at the terminal width
    assert "1 of 6 sections with content; no input for: Accuracy vs round" in printed
    assert (tmp_path / "r.html").is_file()
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such folder" in result.output


def test_mean_std_skips_undefined_values_and_says_so_when_none_is_left():
    assert mean_std([1.0, None, 3.0, float("nan")]) == "2.000 ± 1.000"
    assert mean_std([None]) == "-"


def test_downstream_summary_leaves_out_position_rows():
    position = {"table": "T6", "shots": 4, "init": "scratch", "seed": 0,
                "test": {"accuracy": 0.5, "per_class": {"looped": {"precision": 1.0, "recall": 0.5, "f1": 0.67}}}}
    _, lines = downstream_summary([position, DOWNSTREAM_ROW])
    assert [line[:3] for line in lines] == [["clinical", "4", "scratch"]]


def test_downstream_summary_averages_seeds_per_group():
    rows = [DOWNSTREAM_ROW, DOWNSTREAM_ROW | {"seed": 1, "test": {"per_class": {
        c: {"dice": 0.7, "iou": 0.45, "cldice": 0.6, "hd95": 8.0} for c in ("catheter", "guidewire")}}}]
    table = markdown(downstream_summary(rows))
    per_class = "0.600 ± 0.100 | 0.350 ± 0.100 | 0.500 ± 0.100 | 10.0 ± 2.0"
    assert table.splitlines()[2] == f"| clinical | 4 | scratch | {per_class} | {per_class} | 2 |"


def test_a_cut_or_broken_metrics_line_is_skipped_and_named(tmp_path, caplog):
    run = tmp_path / "fedavg_s0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"command": "pretrain", "seed": 0, "config": {}}))
    (run / "summary.json").write_text(json.dumps({"test_acc": 0.5, "final_val_acc": 0.5}))
    row = {"round": 1, "val_acc": 0.4, "grad_steps": 2, "bytes_sent": 10, "cycle_time_s": 0.1}
    lines = [json.dumps(row), json.dumps(row | {"round": 2})[:25], "[1, 2]", json.dumps(row | {"round": 3})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    shown = build_report([tmp_path], tmp_path / "report.html")
    assert shown["Accuracy vs round"] and shown["Cycle time and cost"]
    assert f"{run / 'metrics.jsonl'}, line 2: skipped" in caplog.text
    assert f"{run / 'metrics.jsonl'}, line 3: skipped" in caplog.text


def test_a_run_whose_silo_weights_are_broken_is_left_out_of_the_consensus_distance(tmp_path, caplog):
    from fedefm.report import consensus_section

    good, broken = tmp_path / "good", tmp_path / "broken"
    for run, values in ((good, [[0.0, 0.0], [3.0, 4.0]]), (broken, [[0.0, 0.0], [float("nan"), 4.0]])):
        for i, w in enumerate(values):
            save_weights(run / "silos" / f"silo_{i}.safetensors", {"w": torch.tensor(w)}, {})
    page = consensus_section([good, broken], [])
    assert "good" in page and "2.5000" in page
    assert f"{broken}: left out of the consensus distance" in caplog.text and "holds NaN" in caplog.text


def test_a_dense_run_partition_with_a_label_table_reads_its_class_table(tmp_path):
    from fedefm.report import read_partition

    path = tmp_path / "partition.txt"
    path.write_text("silo  a  b  total\n0     2  0      2\n1     0  3      3\ntotal 2  3      5\n\n"
                    "silo  catheter  images only\n0     2         0\n1     0         3\ntotal 2         3\n")
    classes, counts = read_partition(path)
    assert classes == ["a", "b"] and counts.tolist() == [[2, 0], [0, 3]]
