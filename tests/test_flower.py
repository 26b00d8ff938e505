"""The Flower apps: the pieces in-process, and whole runs over a real SuperLink and SuperNodes on 127.0.0.1."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from fedefm.data.datasets import list_silo_images  # noqa: E402
from fedefm.data.synth import write_pretrain_corpus  # noqa: E402
from fedefm.errors import ConfigError, DataError  # noqa: E402
from fedefm.federated import topology  # noqa: E402
from fedefm.federated.algorithms import dpsgd, fedefm  # noqa: E402
from fedefm.federated.algorithms.base import SiloState, mix_row  # noqa: E402
from fedefm.federated.config import PretrainConfig  # noqa: E402
from fedefm.federated.flower import deploy  # noqa: E402
from fedefm.federated.flower.messages import pretrain_config, record_weights, weights_record  # noqa: E402
from fedefm.federated.rounds import train_rounds  # noqa: E402
from fedefm.models.weights import load_weights  # noqa: E402
from flower_helpers import (  # noqa: E402
    REPO,
    RUN_TIMEOUT_S,
    SETTINGS,
    assert_same_run,
    corpus,  # noqa: F401 (a fixture)
    loopback,
    settings,
    simulated,
)


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


@pytest.mark.parametrize("algorithm,cfg", [(dpsgd, dpsgd.Config()), (fedefm, fedefm.Config())])
def test_each_silo_mixing_its_own_row_gives_the_simulators_mix_bit_for_bit(algorithm, cfg):
    states = random_states(5)
    ring = topology.build_overlay("ring", topology.get_underlay("gaia"), 5, 0.0, 1000).to_undirected()
    W = topology.mixing_matrix(ring)
    together = algorithm.mix(states, W, cfg)
    for i in range(5):
        received = {j: states[j] for j in range(5) if W[i, j] > 0}
        alone = mix_row(algorithm.mix, i, received, {j: W[i, j] for j in received}, cfg)
        assert torch.equal(alone.weights["w"], together[i].weights["w"])


def test_weights_travel_through_an_array_record_bit_for_bit():
    weights = {"a": torch.randn(3, 5, dtype=torch.float32), "n": torch.tensor([7], dtype=torch.int64)}
    back = record_weights(weights_record(weights))
    assert all(torch.equal(back[k], weights[k]) and back[k].dtype == weights[k].dtype for k in weights)


def test_run_config_becomes_the_pretrain_config():
    cfg = pretrain_config({"algorithm": "dpsgd", "local-steps": 3, "options": "beta=0.9 weighting=softmax",
                           "topology": "", "data": "/corpus", "out": "/runs/a"})
    assert (cfg.algorithm, cfg.local_steps, cfg.topology, cfg.options) == ("dpsgd", 3, None,
                                                                            {"beta": 0.9, "weighting": "softmax"})
    assert cfg.data == Path("/corpus") and cfg.out == Path("/runs/a")


def test_unknown_run_config_key_is_refused_naming_it():
    with pytest.raises(ConfigError, match="run config local_steps: not a fedefm setting"):
        pretrain_config({"local_steps": 3})


def test_a_silo_folder_with_a_class_the_federation_lacks_is_refused(tmp_path):
    write_pretrain_corpus(tmp_path / "corpus", per_class=2, size=32, seed=0)
    assert {item.label for item in list_silo_images(tmp_path / "corpus", sorted(os.listdir(tmp_path / "corpus")))}
    with pytest.raises(DataError, match="class 'clinical' is not one of the federation's classes"):
        list_silo_images(tmp_path / "corpus", ["animal", "phantom"])


class AnsweringGrid:
    """A Flower grid whose nodes answer each message at once: ``answer(node, message)`` → content, an error
    reason, or None (silent); ``nodes`` are the node ids online."""

    def __init__(self, nodes, answer):
        self.nodes, self.answer, self.replies, self.sent = list(nodes), answer, {}, []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        from flwr.app import Error, Message

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent.append(message)
            ids.append(message.metadata.message_id)
            answer = self.answer(message.metadata.dst_node_id, message)
            if answer is not None:
                content = Error(code=0, reason=answer) if isinstance(answer, str) else answer
                self.replies[ids[-1]] = Message(content, reply_to=message)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def silo_answers(silo_of, broken=None):
    """Each silo trains by adding 1 to every model it gets and mixes by keeping its own; ``broken(node, message)``
    may answer instead (non-None)."""
    from flwr.app import ConfigRecord, RecordDict

    from fedefm.federated.flower.messages import scalars_record

    def answer(node, message):
        if broken is not None and (special := broken(node, message)) is not None:
            return special
        content, silo = message.content, silo_of[node]
        if message.metadata.message_type == "query":
            return RecordDict({"silo": ConfigRecord({"silo-id": silo, "num-examples": 10})})
        if message.metadata.message_type == "train.mix":
            return RecordDict({"mixed": content[f"model-{silo}"]})
        reply = RecordDict()
        tasks = content["tasks"]
        for kind, model, user in zip(tasks["kinds"], tasks["models"], tasks["users"]):
            trained = {k: v + 1 for k, v in record_weights(content[f"model-{model}"]).items()}
            key = "home" if kind == "home" else f"expert-{model}"
            if kind == "home" or user != silo:
                reply[key] = weights_record(trained)
                reply[f"{key}.scalars"] = scalars_record(SiloState(weights=trained, num_examples=10, grad_steps=1))
        return reply

    return answer


def ring_round(grid, round_, states, out, min_healthy=2, silos=None):
    """Round ``round_`` of FedEFM on a 3-silo ring through the round loop and the Flower executor; (silos, (states, row))."""
    from fedefm.federated.flower.relay import FlowerSilos, Silos

    out.mkdir(parents=True, exist_ok=True)
    cfg = PretrainConfig(data=out, out=out, algorithm="fedefm", topology="ring", silos=3, rounds=round_,
                         min_healthy_silos=min_healthy)
    silos = silos or Silos(grid=grid, nodes=[11, 12, 13], timeout=0.2)
    executor = FlowerSilos(silos, fedefm, cfg.algorithm_config(), {"classes": ["a"], "outputs": 1})
    after = train_rounds(cfg, fedefm, executor.cfg, torch.nn.Linear(2, 1), states, executor,
                         np.random.default_rng(0), None, first_round=round_, progress=False)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return silos, (after, row)


def test_a_silo_that_fails_is_left_out_of_the_round_by_health_rules_and_rejoins_on_a_new_node(in_a_server_app, tmp_path):
    silo_of = {11: 0, 12: 1, 13: 2, 14: 2}
    grid = AnsweringGrid([11, 12, 13], silo_answers(silo_of, lambda node, message: "disk full" if node == 13 else None))
    states = [SiloState(weights={"w": torch.full((2,), float(i))}, num_examples=10) for i in range(3)]
    silos, (after, row) = ring_round(grid, 1, states, tmp_path)
    assert row["excluded"] == [{"silo": 2, "reason": "node 13: disk full"}]
    assert sorted((f["silo"], f["host"]) for f in row["dropped_experts"]) == [(0, 2), (1, 2)]
    assert sum(m.metadata.dst_node_id == 13 for m in grid.sent) == 1  # no more messages once it failed
    assert torch.equal(after[2].weights["w"], states[2].weights["w"]) and after[2].grad_steps == 0
    mixes = [m.content["mix"] for m in grid.sent if m.metadata.message_type == "train.mix"]
    assert [list(m["senders"]) for m in mixes] == [[0, 1], [0, 1]] and list(mixes[0]["row"]) == pytest.approx([0.5, 0.5])
    # its SuperNode restarts under a new node id and the next round finds it
    grid.nodes, grid.answer = [11, 12, 14], silo_answers(silo_of)
    silos, (_, row) = ring_round(grid, 2, after, tmp_path, silos=silos)
    assert silos.nodes == [11, 12, 14] and row["excluded"] == [] and row["dropped_experts"] == []


def test_both_executors_leave_a_failing_silo_out_of_the_round_the_same_way(in_a_server_app, tmp_path, monkeypatch):
    # The same failure (silo 2's machine fails everything it runs) in one process and over Flower messages.
    import itertools
    from types import SimpleNamespace

    from fedefm.federated.simulator import InProcess

    def plus_one(model, state, batches, cfg, trained=()):
        if next(batches) == 2:
            raise OSError("disk full")
        return SiloState(weights={k: v + 1 for k, v in state.weights.items()}, num_examples=10, grad_steps=1)

    algorithm = SimpleNamespace(round_plan=fedefm.round_plan, mix=fedefm.mix, local_update=plus_one,
                                overseas_expert=lambda model, visitor, batches, cfg: plus_one(model, visitor, batches, cfg))
    silos = [SimpleNamespace(batches=lambda i=i: itertools.repeat(i)) for i in range(3)]
    states = [SiloState(weights={"w": torch.full((2,), float(i))}, num_examples=10) for i in range(3)]
    cfg = PretrainConfig(data=tmp_path, out=tmp_path / "here", algorithm="fedefm", topology="ring", silos=3, rounds=1)
    cfg.out.mkdir()
    here = train_rounds(cfg, algorithm, cfg.algorithm_config(), torch.nn.Linear(2, 1), states,
                        InProcess(algorithm, cfg.algorithm_config(), None, silos), np.random.default_rng(0), None,
                        progress=False)
    here_row = json.loads((tmp_path / "here" / "metrics.jsonl").read_text())
    grid = AnsweringGrid([11, 12, 13], silo_answers({11: 0, 12: 1, 13: 2},
                                                    lambda node, message: "disk full" if node == 13 else None))
    _, (there, there_row) = ring_round(grid, 1, states, tmp_path / "there")

    for row in (here_row, there_row):
        assert [f["silo"] for f in row["excluded"]] == [2]
        assert sorted((f["silo"], f["host"]) for f in row["dropped_experts"]) == [(0, 2), (1, 2)]
    assert "disk full" in here_row["excluded"][0]["reason"] and "disk full" in there_row["excluded"][0]["reason"]
    for after in (here, there):  # the failed silo keeps its round-start model, with no steps counted
        assert torch.equal(after[2].weights["w"], states[2].weights["w"]) and after[2].grad_steps == 0


def test_a_silent_or_malformed_silo_is_named_and_too_few_healthy_silos_stop_the_run(in_a_server_app, tmp_path):
    from fedefm.federated.health import TooFewHealthySilos

    silo_of = {11: 0, 12: 1, 13: 2}

    def broken(node, message):
        if node == 13:
            return False  # never answers
        if node == 12 and message.metadata.message_type == "train" and "home" in message.content["tasks"]["kinds"]:
            reply = silo_answers(silo_of)(node, message)
            reply["home"] = weights_record({"w": torch.zeros(3)})
            return reply
        return None

    def answer(node, message):
        special = broken(node, message)
        return None if special is False else special or silo_answers(silo_of)(node, message)

    states = [SiloState(weights={"w": torch.zeros(2)}, num_examples=10) for _ in range(3)]
    _, (_, row) = ring_round(AnsweringGrid([11, 12, 13], answer), 1, states, tmp_path, min_healthy=1)
    reasons = {f["silo"]: f["reason"] for f in row["excluded"]}
    assert reasons[2] == "node 13: no reply within 0.2 s (is its SuperNode still running?)"
    assert reasons[1].startswith("node 12: returned unusable weights: home: w is (3,)")
    with pytest.raises(TooFewHealthySilos, match=r"round 1: 1 of 3 silos healthy, the run needs 2.*silo 2: node 13"):
        ring_round(AnsweringGrid([11, 12, 13], answer), 1, states, tmp_path / "again", min_healthy=2)


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


def test_flower_supernode_refuses_a_negative_silo_id_or_a_missing_data_folder_at_start_up(tmp_path):
    from typer.testing import CliRunner

    from fedefm.cli import app

    runner = CliRunner()
    base = ["flower", "supernode", "--superlink", "127.0.0.1:9092", "--data", str(tmp_path)]
    result = runner.invoke(app, [*base, "--silo-id", "-1"])
    assert result.exit_code == 2 and "-1 is not in the range x>=0" in result.output
    result = runner.invoke(app, [*base[:-1], str(tmp_path / "absent"), "--silo-id", "0"])
    assert result.exit_code == 1 and f"--data {tmp_path / 'absent'}: no such folder" in result.output


class Killed(Exception):
    """The relay's process dies (the SuperLink or ServerApp killed)."""


def in_process_silos(corpus, run_config, sessions, kill_at_round=None):
    # a grid whose silos answer with silo.answer in this process, on the corpus's partitions; a fresh
    # ``sessions`` dict is a restarted worker per silo
    from fedefm.federated.flower import silo

    def answer(node, message):
        if message.metadata.message_type == "train" and message.metadata.group_id == str(kill_at_round):
            raise Killed
        node_config = {"silo-id": node - 11, "data-path": str(corpus), "data-layout": "corpus"}
        reply, sessions[node] = silo.answer(message.metadata.message_type, message.content, node_config,
                                            run_config, sessions.get(node))
        return reply

    return AnsweringGrid([11, 12, 13], answer)


def relay_in_process(grid, run_config):
    from fedefm.federated.flower import relay

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return relay.run(grid, run_config)
    finally:
        torch.set_num_threads(threads)


def test_evaluation_at_the_silos_gives_the_simulators_validation_and_test_accuracy(in_a_server_app, corpus,
                                                                                   tmp_path):
    # the relay holds no corpus: silo k scores on share k of the corpus's validation and test splits, the relay
    # weights the silos' accuracies by their images; the silos' messages are answered in this process
    run_config = SETTINGS | {"algorithm": "fedavg", "data": "", "out": str(tmp_path / "flower")}
    grid = in_process_silos(corpus, run_config, {})
    flower = relay_in_process(grid, run_config)
    simulator_run = simulated(corpus, tmp_path / "simulator", "fedavg")
    simulator = json.loads((simulator_run / "summary.json").read_text())
    assert flower["test_acc"] == pytest.approx(simulator["test_acc"], abs=1e-12)
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (tmp_path / "flower", simulator_run)]
    assert [r["val_acc"] for r in rows[0]] == pytest.approx([r["val_acc"] for r in rows[1]], abs=1e-12)
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]]
    assert all(len(r["silo_val_acc"]) == 3 for r in rows[0])  # each silo's own model on its own share
    a, _ = load_weights(tmp_path / "flower" / "global.safetensors")
    b, _ = load_weights(simulator_run / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    split = {m.content["evaluate"]["split"] for m in grid.sent if m.metadata.message_type == "evaluate"}
    classes = json.loads((tmp_path / "flower" / "config.json").read_text())["classes"]
    assert split == {"val", "test"} and classes == sorted(p.name for p in corpus.iterdir() if p.is_dir())


def test_a_silo_holds_out_validation_and_test_images_only_when_the_relay_has_no_corpus(tmp_path):
    from fedefm.federated.flower import silo

    write_pretrain_corpus(tmp_path / "corpus", per_class=10, size=32, seed=0)
    own = tmp_path / "silo"
    for name in ("animal", "phantom"):  # a hospital holding two of the federation's data types
        shutil.copytree(tmp_path / "corpus" / name, own / name)
    shutil.copy(tmp_path / "corpus" / "labels.json", own / "labels.json")
    classes = sorted(p.name for p in (tmp_path / "corpus").iterdir() if p.is_dir())
    node_config = {"silo-id": 0, "data-path": str(own)}
    run_config = {"silos": 3, "image-size": 32, "val-fraction": 0.2, "test-fraction": 0.1}
    evaluating = silo.open_session(node_config, run_config | {"data": ""}, classes)
    assert [len(evaluating.held_out[s]) for s in ("val", "test")] == [4, 2]  # 2 and 1 of each class's 10
    assert len(evaluating.data.source) == 14
    assert {classes[item.label] for item in evaluating.held_out["val"]} == {"animal", "phantom"}
    training_only = silo.open_session(node_config, run_config | {"data": str(tmp_path / "corpus")}, classes)
    assert training_only.held_out == {} and len(training_only.data.source) == 20
    facts = silo.data_facts(node_config, run_config)["silo"]
    assert list(facts["classes"]) == ["animal", "phantom"] and list(facts["labels"])[0] == "background"


def test_silos_whose_label_tables_differ_are_refused_naming_both(in_a_server_app):
    from flwr.app import ConfigRecord, RecordDict

    from fedefm.federated.flower.relay import silos_corpus

    def answer(node, message):
        labels = ["background", "catheter"] if node == 13 else ["background", "vessel"]
        return RecordDict({"silo": ConfigRecord({"silo-id": node - 11, "classes": ["a"], "labels": labels,
                                                 "annotated": "{}"})})

    cfg = PretrainConfig(data=Path("unused"), out=Path("unused"), silos=3)
    with pytest.raises(ConfigError, match=r"silos 0 and 2 label their masks \['background', 'vessel'\] and "
                                          r"\['background', 'catheter'\]"):
        silos_corpus(AnsweringGrid([11, 12, 13], answer), cfg, 1.0, 1.0)


@pytest.mark.parametrize("algorithm", ["moon", "fedefm"])
def test_a_relay_killed_mid_run_resumes_to_the_unbroken_runs_weights_and_metrics(in_a_server_app, corpus, tmp_path,
                                                                                  algorithm):
    # MOON keeps each silo's previous model at the silo, FedEFM draws batches in waves: both travel in the checkpoint
    base = SETTINGS | {"algorithm": algorithm, "rounds": 3, "checkpoint-every": 1}
    unbroken = base | {"out": str(tmp_path / "unbroken")}
    relay_in_process(in_process_silos(corpus, unbroken, {}), unbroken)
    broken = base | {"out": str(tmp_path / "broken")}
    with pytest.raises(Killed):
        relay_in_process(in_process_silos(corpus, broken, {}, kill_at_round=3), broken)
    assert len((tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = broken | {"resume": True}
    relay_in_process(in_process_silos(corpus, resumed, {}), resumed)  # the workers restarted too: new sessions
    a, _ = load_weights(tmp_path / "broken" / "global.safetensors")
    b, _ = load_weights(tmp_path / "unbroken" / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "peak_rss_mb", "cycle_time_s",
                                                                       "message_timing")}
             for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("broken", "unbroken")]
    assert rows[0] == rows[1]


def test_resume_of_another_runs_folder_or_with_changed_settings_is_refused(in_a_server_app, corpus, tmp_path):
    run_config = SETTINGS | {"algorithm": "fedavg", "rounds": 1, "out": str(tmp_path / "run")}
    relay_in_process(in_process_silos(corpus, run_config, {}), run_config)
    changed = run_config | {"lr": 0.01, "resume": True}
    with pytest.raises(ConfigError, match="lr"):
        relay_in_process(in_process_silos(corpus, changed, {}), changed)
    with pytest.raises(ConfigError, match="resume"):
        relay_in_process(in_process_silos(corpus, run_config, {}), run_config | {"resume": "yes"})


# --- over a real SuperLink and SuperNodes (127.0.0.1 only) -----------------------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory, corpus):
    # one deployment serves every end-to-end test here: TLS, SuperNode authentication, a warm worker per silo
    # (the tests that kill and restart a SuperLink or SuperNode are in test_flower_restart.py)
    started = loopback(tmp_path_factory.mktemp("federation"), corpus, tls=True, auth=True)
    try:
        yield started
    finally:
        started.stop()


@pytest.mark.slow
def test_fedefm_on_a_ring_over_flower_writes_the_simulators_run_folder_bit_for_bit(federation, corpus, tmp_path):
    federation.run(settings(corpus, tmp_path / "flower", algorithm="fedefm", topology="ring"), timeout=RUN_TIMEOUT_S)
    assert_same_run(tmp_path / "flower", simulated(corpus, tmp_path / "simulator", "fedefm"))


@pytest.mark.slow
def test_a_dense_objective_over_flower_writes_the_simulators_run_folder_bit_for_bit(federation, corpus, tmp_path):
    # the silos read their own masks; the relay scores the global model's Dice on its validation split
    federation.run(settings(corpus, tmp_path / "flower", algorithm="dpsgd", objective="segment", rounds=1),
                   timeout=RUN_TIMEOUT_S)
    assert_same_run(tmp_path / "flower", simulated(corpus, tmp_path / "simulator", "dpsgd", "segment", rounds=1),
                    metric="dice")


@pytest.mark.slow
def test_fedavg_over_tls_with_supernode_authentication_evaluated_at_the_silos_matches_the_simulator(
        federation, corpus, tmp_path):
    # no corpus at the relay: the silos score the models through the ClientApp's evaluate handler
    record = federation.run(settings(corpus, tmp_path / "flower", algorithm="fedavg", data=""), timeout=RUN_TIMEOUT_S)
    assert record["status"] == "finished:completed" and record["network-traffic"]["total-bytes"] > 0
    assert "insecure" not in (federation.folder / "superlink.log").read_text().lower()
    assert_same_run(tmp_path / "flower", simulated(corpus, tmp_path / "simulator", "fedavg"), at_silos=True)


@pytest.mark.slow
def test_flower_run_without_a_superlink_exits_1_saying_so(corpus, tmp_path):
    from typer.testing import CliRunner

    from fedefm.cli import app

    address = f"127.0.0.1:{deploy.free_port()}"  # nothing listens there
    result = CliRunner().invoke(app, ["flower", "run", "--superlink", address, "--data", str(corpus),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "Connection to the SuperLink is unavailable" in result.output
