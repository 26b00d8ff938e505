"""The Flower apps: the pieces in-process, and whole runs over a real SuperLink and SuperNodes on 127.0.0.1."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from fedefm.config import PretrainConfig  # noqa: E402
from fedefm.data.datasets import list_silo_images  # noqa: E402
from fedefm.data.synth import write_pretrain_corpus  # noqa: E402
from fedefm.errors import ConfigError, DataError  # noqa: E402
from fedefm.federated import topology  # noqa: E402
from fedefm.federated.algorithms import dpsgd, fedefm  # noqa: E402
from fedefm.federated.algorithms.base import SiloState, Task, mix_row  # noqa: E402
from fedefm.federated.flower import deploy  # noqa: E402
from fedefm.federated.flower.messages import pretrain_config, record_weights, weights_record  # noqa: E402
from fedefm.federated.simulator import run as simulate  # noqa: E402
from fedefm.models.weights import load_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"silos": 3, "rounds": 2, "batch-size": 8, "image-size": 32, "eval-every": 1, "local-steps": 1,
            "dropout": 0.0, "reply-timeout": 120}


def random_states(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [SiloState(weights={"w": torch.randn(4, 3, generator=generator), "steps": torch.tensor(n)})
            for _ in range(n)]


def test_algorithms_and_simulator_run_without_importing_flwr():
    code = ("import sys, fedefm.federated.algorithms, fedefm.federated.simulator; "
            "print('flwr' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip() == "False"


@pytest.mark.parametrize("algorithm,cfg", [(dpsgd, dpsgd.Config()), (fedefm, fedefm.Config(update="ours"))])
def test_each_silo_mixing_its_own_row_gives_the_simulators_mix_bit_for_bit(algorithm, cfg):
    states = random_states(5)
    ring = topology.build_overlay("ring", topology.get_underlay("gaia"), 5, 0.0, 1000).to_undirected()
    W = topology.mixing_matrix(ring)
    together = algorithm.mix(states, W, cfg)
    for i in range(5):
        received = {j: states[j] for j in range(5) if W[i, j] > 0}
        alone = mix_row(algorithm.mix, i, received, {j: W[i, j] for j in received}, cfg)
        assert torch.equal(alone.weights["w"], together[i].weights["w"])


def test_fedefm_round_tasks_run_experts_before_each_home_update_in_silo_order():
    # ring of 3 silos: every silo neighbours the other two
    tasks = fedefm.round_tasks([[1, 2], [0, 2], [0, 1]], fedefm.Config())
    assert tasks[:3] == [Task(1, 0, "expert", 0), Task(2, 0, "expert", 0), Task(0, 0, "home", 0)]
    assert [t for t in tasks if t.silo == 1] == [Task(1, 0, "expert", 0), Task(1, 1, "home", 1), Task(1, 2, "expert", 2)]


def test_released_update_trains_the_neighbours_models_at_home_and_keeps_them():
    tasks = fedefm.round_tasks([[1], [0]], fedefm.Config(update="released"))
    assert tasks == [Task(0, 1, "expert", 0), Task(0, 0, "home", 0), Task(1, 0, "expert", 1), Task(1, 1, "home", 1)]


def test_weights_travel_through_an_array_record_bit_for_bit():
    weights = {"a": torch.randn(3, 5, dtype=torch.float32), "n": torch.tensor([7], dtype=torch.int64)}
    back = record_weights(weights_record(weights))
    assert all(torch.equal(back[k], weights[k]) and back[k].dtype == weights[k].dtype for k in weights)


def test_run_config_becomes_the_pretrain_config():
    cfg = pretrain_config({"algorithm": "dpsgd", "local-steps": 3, "options": "beta=0.9 update=literal",
                           "topology": "", "data": "/corpus", "out": "/runs/a"})
    assert (cfg.algorithm, cfg.local_steps, cfg.topology, cfg.options) == ("dpsgd", 3, None,
                                                                            {"beta": 0.9, "update": "literal"})
    assert cfg.data == Path("/corpus") and cfg.out == Path("/runs/a")


def test_unknown_run_config_key_is_refused_naming_it():
    with pytest.raises(ConfigError, match="run config local_steps: not a fedefm setting"):
        pretrain_config({"local_steps": 3})


def test_a_silo_folder_with_a_class_the_federation_lacks_is_refused(tmp_path):
    write_pretrain_corpus(tmp_path / "corpus", per_class=2, size=32, seed=0)
    assert {item.label for item in list_silo_images(tmp_path / "corpus", sorted(os.listdir(tmp_path / "corpus")))}
    with pytest.raises(DataError, match="class 'clinical' is not one of the federation's classes"):
        list_silo_images(tmp_path / "corpus", ["animal", "phantom"])


def test_a_silo_that_fails_or_stays_silent_stops_the_round_naming_each(monkeypatch):
    from flwr.app import Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedefm.federated.flower.relay import SiloFailed, Silos, check_replies

    for name in ("_run_id", "_node_id", "_task_id"):  # a message needs a run context, as inside a ServerApp
        monkeypatch.setattr(TaskIdentity, name, 1)
    silos = Silos(grid=None, nodes=[11, 12, 13], timeout=20, round_=4)
    sent = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in silos.nodes]
    replies = [Message(RecordDict(), reply_to=sent[0]), Message(Error(code=0, reason="disk full"), reply_to=sent[1])]
    with pytest.raises(SiloFailed, match=r"round 4: silo 1 \(node 12\): disk full; silo 2 \(node 13\): no reply within 20 s"):
        check_replies(silos, replies, [0, 1, 2])
    assert list(check_replies(silos, replies[:1], [0])) == [0]


def test_flower_cli_writes_test_certificates_node_keys_and_the_app_folder(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from typer.testing import CliRunner

    from fedefm.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["flower", "certificates", str(tmp_path / "certs"), "--nodes", "2"])
    assert result.exit_code == 0, result.output
    server = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert load_ssh_public_key((tmp_path / "certs" / "node_1.pub").read_bytes()).curve.name == "secp384r1"
    result = runner.invoke(app, ["flower", "app", str(tmp_path / "app")])
    assert result.exit_code == 0, result.output
    declared = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    assert declared["project"]["dependencies"] == ["flwr>=1.42,<1.43"]  # nothing for Flower to install, no torch
    assert declared["tool"]["flwr"]["app"]["config"]["local-steps"] == 2


# --- over a real SuperLink and SuperNodes (127.0.0.1 only) -----------------------------------------------------


def loopback(folder, corpus, **kwargs):
    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return deploy.LoopbackFederation(folder, corpus, env=env, **kwargs)


def settings(corpus, out, **overrides):
    return SETTINGS | {"data": str(corpus), "out": str(out)} | overrides


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower_corpus") / "pretrain"
    write_pretrain_corpus(root, per_class=12, size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def federation(tmp_path_factory, corpus):
    started = loopback(tmp_path_factory.mktemp("federation"), corpus)
    try:
        yield started
    finally:
        started.stop()


def simulated(corpus, out, algorithm, objective="classify", rounds=2):
    # One thread, as the SuperNodes' ClientApps run: another thread count may sum in another order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        simulate(PretrainConfig(data=corpus, out=out, algorithm=algorithm, objective=objective, silos=3, rounds=rounds,
                                batch_size=8, image_size=32, eval_every=1, local_steps=1, dropout=0.0), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def assert_same_run(flower_run: Path, simulator_run: Path, metric: str = "acc"):
    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    keys = ("round", "train_loss", "grad_steps", f"val_{metric}", f"silo_val_{metric}", "bytes_sent")
    assert [{k: r[k] for k in keys} for r in rows(flower_run)] == [{k: r[k] for k in keys} for r in rows(simulator_run)]
    assert all(r["relay_bytes"] > 0 for r in rows(flower_run))
    a, _ = load_weights(flower_run / "global.safetensors")
    b, _ = load_weights(simulator_run / "global.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def summary(run):  # peak memory is the process's own, not a result
        return {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k != "peak_rss_mb"}

    assert summary(flower_run) == summary(simulator_run)
    assert json.loads((flower_run / "config.json").read_text())["command"] == "flower"


@pytest.mark.slow
def test_fedefm_on_a_ring_over_flower_writes_the_simulators_run_folder_bit_for_bit(federation, corpus, tmp_path):
    federation.run(settings(corpus, tmp_path / "flower", algorithm="fedefm", topology="ring"))
    assert_same_run(tmp_path / "flower", simulated(corpus, tmp_path / "simulator", "fedefm"))


@pytest.mark.slow
def test_a_dense_objective_over_flower_writes_the_simulators_run_folder_bit_for_bit(federation, corpus, tmp_path):
    # the silos read their own masks; the relay scores the global model's Dice on its validation split (one
    # round: each ClientApp message starts a process, and make test must stay short)
    federation.run(settings(corpus, tmp_path / "flower", algorithm="dpsgd", objective="segment", rounds=1))
    assert_same_run(tmp_path / "flower", simulated(corpus, tmp_path / "simulator", "dpsgd", "segment", rounds=1),
                    metric="dice")


@pytest.mark.slow
def test_fedavg_over_tls_with_supernode_authentication_writes_the_simulators_run_folder(corpus, tmp_path):
    # fedavg runs only here, over TLS: one federation fewer keeps `make test` within its time
    secure = loopback(tmp_path, corpus, tls=True, auth=True)
    try:
        record = secure.run(settings(corpus, tmp_path / "flower", algorithm="fedavg"))
    finally:
        secure.stop()
    assert record["status"] == "finished:completed" and record["network-traffic"]["total-bytes"] > 0
    assert "insecure" not in (tmp_path / "superlink.log").read_text().lower()
    assert_same_run(tmp_path / "flower", simulated(corpus, tmp_path / "simulator", "fedavg"))


@pytest.mark.slow
def test_a_supernode_killed_mid_run_fails_the_run_naming_its_silo(corpus, tmp_path):
    federation = loopback(tmp_path, corpus)
    out = tmp_path / "flower"
    try:
        # the timeout must outlast a healthy reply (a new ClientApp process per message, slow on a busy CPU)
        run_id = federation.start_run(settings(corpus, out, algorithm="dpsgd", rounds=3, **{"reply-timeout": 60}))
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        federation.kill("silo2")
        with pytest.raises(deploy.FlowerRunFailed, match=r"finished:failed.*silo 2 \(node \d+\)"):
            deploy.wait_run(run_id, federation.home, timeout=300)
    finally:
        federation.stop()
    assert len((out / "metrics.jsonl").read_text().splitlines()) < 3
    assert not (out / "global.safetensors").exists()


@pytest.mark.slow
def test_flower_run_without_a_superlink_exits_1_saying_so(corpus, tmp_path):
    from typer.testing import CliRunner

    from fedefm.cli import app

    address = f"127.0.0.1:{deploy.free_port()}"  # nothing listens there
    result = CliRunner().invoke(app, ["flower", "run", "--superlink", address, "--data", str(corpus),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "Connection to the SuperLink is unavailable" in result.output
