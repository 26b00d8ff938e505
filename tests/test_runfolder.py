"""Run folders are owned: manifest, --resume with the same settings, --overwrite, and a lock against a second writer."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedefm.data.synth import write_seg_dataset
from fedefm.errors import ConfigError
from fedefm.federated.config import PretrainConfig
from fedefm.federated.simulator import run as pretrain
from fedefm.finetune import train
from fedefm.finetune.config import FinetuneConfig
from fedefm.runfolder import LOCK, MANIFEST, config_differences, owned_run_folder
from test_simulator import corpus  # noqa: F401 - the pre-training corpus fixture

SRC = Path(__file__).resolve().parent.parent / "src"
ENV = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg") / "clinical"
    write_seg_dataset(root, "clinical", 12, size=64, seed=0)
    return root


def pretrain_config(corpus, out, **overrides):
    settings = dict(data=corpus, out=out, algorithm="fedavg", topology="star", silos=3, rounds=1, batch_size=8,
                    image_size=32, eval_every=1, checkpoint_every=1, local_steps=1)
    return PretrainConfig(**(settings | overrides))


def finetune_config(data, out, **overrides):
    settings = dict(data=data, out=out, shots=4, epochs=1, batch_size=4, samples_per_epoch=4, image_size=64,
                    device="cpu")
    return FinetuneConfig(**(settings | overrides))


def test_a_run_folder_gets_a_manifest_and_its_lock_is_gone_afterwards(tmp_path):
    with owned_run_folder(tmp_path / "run", "pretrain", {"silos": 3}) as out:
        lock = json.loads((out / LOCK).read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "pretrain" and manifest["config"] == {"silos": 3}
    assert not (out / LOCK).exists()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with owned_run_folder(tmp_path, "pretrain", {}):
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on host "):
            with owned_run_folder(tmp_path, "pretrain", {}, resume=True):
                pass


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fedefm.runfolder import owned_run_folder\n"
         "with owned_run_folder(sys.argv[1], 'pretrain', {}):\n    print('held', flush=True); time.sleep(60)",
         str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            with owned_run_folder(tmp_path, "pretrain", {}, resume=True):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == holder.pid  # the crash left its lock file behind
    with owned_run_folder(tmp_path, "pretrain", {}, resume=True):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert f'"pid": {holder.pid}' in caplog.text


def test_a_folder_of_other_files_is_refused_even_with_overwrite_and_kept(tmp_path):
    (tmp_path / "thesis.tex").write_text("irreplaceable")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"holds 1 entries that are not a fedefm run \(thesis.tex\)"):
            with owned_run_folder(tmp_path, "finetune", {}, overwrite=overwrite):
                pass
    assert (tmp_path / "thesis.tex").read_text() == "irreplaceable"


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        with owned_run_folder(tmp_path / "out", "predict", {}):
            pass


def test_a_folder_holding_only_the_manifest_of_a_failed_start_is_taken_without_asking(tmp_path):
    with pytest.raises(RuntimeError):
        with owned_run_folder(tmp_path, "finetune", {"epochs": 1}):
            raise RuntimeError("data error before anything was written")
    with owned_run_folder(tmp_path, "finetune", {"epochs": 2}):
        pass
    assert json.loads((tmp_path / MANIFEST).read_text())["config"] == {"epochs": 2}


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--resume and --overwrite exclude each other"):
        with owned_run_folder(tmp_path, "finetune", {}, resume=True, overwrite=True):
            pass


def test_pretrain_on_the_folder_of_another_run_is_refused_and_leaves_it_as_it_was(corpus, tmp_path):
    pretrain(pretrain_config(corpus, tmp_path), progress=False)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a pretrain run .*pass --resume to continue it, --overwrite"):
        pretrain(pretrain_config(corpus, tmp_path, silos=2), progress=False)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_pretrain_overwrite_removes_the_old_run_first(corpus, tmp_path):
    pretrain(pretrain_config(corpus, tmp_path, silos=3), progress=False)
    assert (tmp_path / "silos" / "silo_2.safetensors").is_file()
    pretrain(pretrain_config(corpus, tmp_path, silos=2), progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "silos").iterdir()) == ["silo_0.safetensors", "silo_1.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["config"]["silos"] == 2


def test_pretrain_resume_with_another_algorithm_and_silo_count_lists_both_differences(corpus, tmp_path):
    pretrain(pretrain_config(corpus, tmp_path), progress=False)
    with pytest.raises(ConfigError, match=r"algorithm='fedavg' \(now 'dpsgd'\); silos=3 \(now 2\).*"
                                          r"pass --overwrite to replace the run"):
        pretrain(pretrain_config(corpus, tmp_path, algorithm="dpsgd", topology="ring", silos=2, rounds=2),
                 resume=True, progress=False)


def test_finetune_on_the_folder_of_another_run_is_refused(seg_data, tmp_path):
    train.run(finetune_config(seg_data, tmp_path), progress=False)
    model = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a finetune run"):
        train.run(finetune_config(seg_data, tmp_path, seed=1), progress=False)
    assert (tmp_path / "model.safetensors").read_bytes() == model


def test_finetune_resume_in_a_pretrain_folder_is_refused_naming_both_kinds(corpus, seg_data, tmp_path):
    pretrain(pretrain_config(corpus, tmp_path), progress=False)
    with pytest.raises(ConfigError, match="holds a pretrain run, not a finetune run"):
        train.run(finetune_config(seg_data, tmp_path), resume=True, progress=False)


@pytest.mark.slow
def test_two_pretrain_processes_on_one_out_let_only_the_first_write(corpus, tmp_path):
    command = [sys.executable, "-m", "fedefm", "pretrain", "--data", str(corpus), "--out", str(tmp_path / "run"),
               "--algorithm", "fedavg", "--silos", "3", "--rounds", "30", "--image-size", "32", "--batch-size", "8",
               "--local-steps", "1", "--eval-every", "30", "--checkpoint-every", "30"]
    first = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / LOCK).is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.run(command, env=ENV, capture_output=True, text=True)
    finally:
        first.wait(timeout=600)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"in use by another run (pid {first.pid} on host" in " ".join(second.stderr.split())
    assert first.returncode == 0, first.stderr
    rounds = [json.loads(line)["round"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, 31))


def test_flower_relay_on_the_folder_of_another_run_is_refused_before_any_silo_is_asked(corpus, tmp_path):
    pytest.importorskip("flwr")
    from fedefm.federated.flower import relay

    pretrain(pretrain_config(corpus, tmp_path), progress=False)
    run_config = {"algorithm": "fedavg", "silos": 3, "rounds": 1, "image-size": 32, "data": str(corpus),
                  "out": str(tmp_path)}
    with pytest.raises(ConfigError, match="already holds a pretrain run"):
        relay.run(None, run_config)  # no grid: the refusal comes before any message


def test_a_broken_manifest_is_refused_and_the_folder_kept(tmp_path):
    (tmp_path / MANIFEST).write_text('{"kind": "pretr')
    (tmp_path / "global.safetensors").write_bytes(b"weights")
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        with pytest.raises(ConfigError, match="not valid JSON.*cannot tell which run the folder holds"):
            with owned_run_folder(tmp_path, "pretrain", {}, resume=resume, overwrite=overwrite):
                pass
    assert (tmp_path / "global.safetensors").read_bytes() == b"weights"


def test_flower_overwrite_given_as_text_is_refused_not_read_as_true(corpus, tmp_path):
    pytest.importorskip("flwr")
    from fedefm.federated.flower import relay

    pretrain(pretrain_config(corpus, tmp_path), progress=False)
    run_config = {"algorithm": "fedavg", "silos": 3, "data": str(corpus), "out": str(tmp_path), "overwrite": "false"}
    with pytest.raises(ConfigError, match="run config overwrite = 'false': must be true or false"):
        relay.run(None, run_config)
    assert (tmp_path / "global.safetensors").is_file()


def test_a_run_folder_from_before_manifests_is_known_by_its_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"command": "finetune", "config": {"epochs": 1, "out": "old"}}))
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with owned_run_folder(tmp_path, "finetune", {"epochs": 1, "out": "new"}, resume=True):
        pass
    with pytest.raises(ConfigError, match=r"epochs=1 \(now 2\)"):
        with owned_run_folder(tmp_path, "finetune", {"epochs": 2}, resume=True):
            pass
    with pytest.raises(ConfigError, match="already holds a finetune run"):
        with owned_run_folder(tmp_path, "finetune", {"epochs": 2}):
            pass


def test_a_setting_absent_from_the_saved_config_is_a_difference_unless_at_its_default():
    saved, defaults = {"epochs": 2}, {"epochs": 30, "weights": (1.0, 2.0), "tip_weight": 1.0}
    assert config_differences(saved, {"epochs": 2, "tip_weight": 1.0, "weights": (1.0, 2.0)}, (), defaults) == []
    assert config_differences(saved, {"epochs": 2, "tip_weight": 3.0}, (), defaults) == ["tip_weight=None (now 3.0)"]
    assert config_differences(saved, {"epochs": 2, "tip_weight": 1.0}, ()) == ["tip_weight=None (now 1.0)"]
    assert config_differences(saved, {"epochs": 30}, (), defaults) == ["epochs=2 (now 30)"]  # saved: not predated


def test_a_setting_the_resumed_run_predates_counts_as_unchanged_only_at_its_default(seg_data, tmp_path):
    cfg = finetune_config(seg_data, tmp_path / "run")
    train.run(cfg, progress=False)
    manifest = json.loads((cfg.out / MANIFEST).read_text())
    del manifest["config"]["tip_weight"]  # as a run started before --tip-weight existed wrote it
    (cfg.out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"tip_weight=None \(now 3.0\)"):
        train.run(finetune_config(seg_data, cfg.out, loss="tips", tip_weight=3.0), resume=True, progress=False)
    train.run(finetune_config(seg_data, cfg.out, epochs=1), resume=True, progress=False)
