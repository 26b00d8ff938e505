"""Crash and resume: runs killed with SIGKILL (mid-round, mid-checkpoint-write) resume to the uninterrupted result.

The killed runs are real processes (``python -m fedefm``); the damaged-checkpoint cases edit files on disk.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace as replace_config
from pathlib import Path

import pytest
import torch

import fedefm
from fedefm.checkpoints import CheckpointStore
from fedefm.data.synth import write_position_dataset, write_pretrain_corpus, write_seg_dataset
from fedefm.errors import WeightsError
from fedefm.finetune import classify, train
from fedefm.finetune.config import FinetuneConfig
from fedefm.models.weights import load_weights

MEASURED = ("wall_s", "cycle_time_s", "peak_rss_mb", "train_images_per_s")  # timings, not results
ENV = os.environ | {"PYTHONPATH": str(Path(fedefm.__file__).parents[1]), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
# Dies (SIGKILL) after the checkpoint of round 2 is written and fsynced, just before its rename.
KILLED_BEFORE_RENAME = """
import os, signal, sys
real_replace = os.replace
def replace(src, dst):
    if str(dst).endswith("round_00002.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
from fedefm.cli import app
app(sys.argv[1:], prog_name="fedefm")
"""


def results(run_folder):
    rows = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in MEASURED} for row in rows]


def same_tensors(a_path, b_path):
    a, _ = load_weights(a_path)
    b, _ = load_weights(b_path)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fedefm_command(*args):
    return [sys.executable, "-m", "fedefm", *args]


def kill_when(process, ready, timeout_s=600):
    """SIGKILL ``process`` as soon as ``ready()`` holds; returns the process's exit code."""
    deadline = time.monotonic() + timeout_s
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    return process.wait()


def metric_rows(path):
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "pretrain"
    write_pretrain_corpus(root, per_class=8, size=32, seed=0)
    return root


def pretrain_args(corpus, out):
    return ["pretrain", "--data", str(corpus), "--out", str(out), "--algorithm", "dpsgd", "--silos", "3",
            "--rounds", "4", "--local-steps", "1", "--batch-size", "4", "--image-size", "32", "--eval-every", "1",
            "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "whole"
    subprocess.run(fedefm_command(*pretrain_args(corpus, out)), env=ENV, check=True, capture_output=True)
    return out


@pytest.mark.slow
def test_pretrain_killed_mid_round_resumes_to_the_uninterrupted_run(corpus, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(fedefm_command(*pretrain_args(corpus, out)), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(process, lambda: metric_rows(out / "metrics.jsonl") >= 2) == -signal.SIGKILL
    assert not (out / "global.safetensors").exists()

    subprocess.run(fedefm_command(*pretrain_args(corpus, out), "--resume"), env=ENV, check=True, capture_output=True)
    assert [r["round"] for r in results(out)] == [1, 2, 3, 4]  # no row twice
    assert results(out) == results(uninterrupted)
    assert same_tensors(out / "global.safetensors", uninterrupted / "global.safetensors")


@pytest.mark.slow
def test_pretrain_killed_mid_checkpoint_write_resumes_from_the_previous_checkpoint(corpus, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RENAME, *pretrain_args(corpus, out)], env=ENV,
                            check=False, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = out / "checkpoints"
    assert [p.name for p in checkpoints.glob("round_*.safetensors")] == ["round_00001.safetensors"]
    assert list(checkpoints.glob(".round_00002.safetensors.*.tmp"))  # the complete but unrenamed write

    subprocess.run(fedefm_command(*pretrain_args(corpus, out), "--resume"), env=ENV, check=True, capture_output=True)
    assert not list(checkpoints.glob(".*.tmp"))
    assert results(out) == results(uninterrupted)
    assert same_tensors(out / "global.safetensors", uninterrupted / "global.safetensors")


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg") / "clinical"
    write_seg_dataset(root, "clinical", 16, size=32, seed=1)
    return root


def finetune_args(data, out):
    return ["finetune", "--data", str(data), "--out", str(out), "--shots", "4", "--epochs", "3",
            "--batch-size", "2", "--samples-per-epoch", "4", "--image-size", "32", "--device", "cpu"]


def finetune_config(data, out, epochs=3):
    return FinetuneConfig(data=data, out=out, shots=4, epochs=epochs, batch_size=2, samples_per_epoch=4,
                          image_size=32, device="cpu")


@pytest.mark.slow
def test_finetune_killed_with_sigkill_resumes_to_the_uninterrupted_run(seg_data, tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(fedefm_command(*finetune_args(seg_data, whole)), env=ENV, check=True, capture_output=True)
    process = subprocess.Popen(fedefm_command(*finetune_args(seg_data, out)), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(process, lambda: metric_rows(out / "metrics.jsonl") >= 1) == -signal.SIGKILL

    subprocess.run(fedefm_command(*finetune_args(seg_data, out), "--resume"), env=ENV, check=True, capture_output=True)
    assert [r["epoch"] for r in results(out)] == [1, 2, 3]
    assert results(out) == results(whole)
    assert same_tensors(out / "model.safetensors", whole / "model.safetensors")


@pytest.fixture(scope="module")
def position_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("positions")
    write_position_dataset(root, 24, size=32, seed=1)
    return root


@pytest.mark.parametrize("task", ["segment", "classify"])
def test_finetune_interrupted_after_an_epoch_resumes_to_the_uninterrupted_run(task, seg_data, position_data, tmp_path,
                                                                                monkeypatch):
    module, data = (train, seg_data) if task == "segment" else (classify, position_data)
    whole, parts = tmp_path / "whole", tmp_path / "parts"

    def config(out):
        return replace_config(finetune_config(data, out, epochs=2), task=task)

    module.run(config(whole), progress=False)
    real_evaluate, calls = module.evaluate, []

    def crash_in_epoch_2(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies in epoch 2, after epoch 1's checkpoint
        return real_evaluate(*args)

    monkeypatch.setattr(module, "evaluate", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        module.run(config(parts), progress=False)
    monkeypatch.setattr(module, "evaluate", real_evaluate)
    module.run(config(parts), resume=True, progress=False)
    assert results(parts) == results(whole)
    assert same_tensors(parts / "model.safetensors", whole / "model.safetensors")
    last = Path("checkpoints") / "epoch_00002.safetensors"  # weights, optimizer moments and RNG state
    assert same_tensors(parts / last, whole / last)


def test_finetune_resume_with_other_settings_is_refused(seg_data, tmp_path):
    train.run(finetune_config(seg_data, tmp_path, epochs=1), progress=False)
    with pytest.raises(Exception, match=r"started with other settings: epochs=1 \(now 2\)"):
        train.run(finetune_config(seg_data, tmp_path, epochs=2), resume=True, progress=False)


def two_checkpoints(folder):
    store = CheckpointStore(folder)
    for index in (1, 2):
        store.save(index, {"w": torch.full((64,), float(index))}, {"round": index})
    return store


def truncate(path):
    path.write_bytes(path.read_bytes()[:-40])


def flip_a_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor: the file still parses, only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_a_payload_byte])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one_with_a_warning(tmp_path, caplog, damage):
    store = two_checkpoints(tmp_path)
    damage(tmp_path / "round_00002.safetensors")
    with caplog.at_level(logging.WARNING, logger="fedefm"):
        tensors, metadata = store.load_latest()
    assert metadata["round"] == 1 and torch.equal(tensors["w"], torch.full((64,), 1.0))
    assert "round_00002.safetensors" in caplog.text and "resuming from the older checkpoint" in caplog.text


def test_only_damaged_checkpoints_are_a_clear_error(tmp_path):
    store = two_checkpoints(tmp_path)
    for path in store.paths():
        flip_a_payload_byte(path)
    with pytest.raises(WeightsError, match="every checkpoint is damaged.*start the run again with --overwrite"):
        store.load_latest()


def test_checkpoint_metadata_is_covered_by_the_checksum(tmp_path):
    store = two_checkpoints(tmp_path)
    path = tmp_path / "round_00002.safetensors"
    path.write_bytes(path.read_bytes().replace(b'\\"round\\": 2', b'\\"round\\": 9'))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        store.verify(path)
