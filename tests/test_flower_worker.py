"""The warm silo worker: its socket's frames, who may use its socket, and the worker process itself."""

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from fedefm.data.synth import write_pretrain_corpus  # noqa: E402
from fedefm.errors import ConfigError  # noqa: E402
from fedefm.federated.flower import deploy, wire  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534


def through_a_socket(meta, content):
    a, b = socket.socketpair()
    with a, b:
        wire.send(a, meta, content)
        return wire.receive(b, "test peer")


def test_a_frame_carries_config_metric_and_array_records_unchanged():
    content = RecordDict({
        "tasks": ConfigRecord({"kinds": ["expert", "home"], "models": [1, 0], "row": [0.5, 0.25], "flag": True,
                               "name": "x"}),
        "home.scalars": MetricRecord({"num-examples": 10, "train-loss": 0.1 + 0.2, "grad-steps": 3}),
        "home": ArrayRecord({"safetensors": Array(dtype="uint8", shape=(5,), stype="safetensors", data=b"\x00\x01ab\xff"),
                             "empty": Array(dtype="float32", shape=(0,), stype="numpy.ndarray", data=b"")}),
    })
    meta, back = through_a_socket({"op": "message", "run-id": 7}, content)
    assert meta == {"op": "message", "run-id": 7}
    assert list(back) == list(content)
    assert dict(back["tasks"]) == dict(content["tasks"]) and type(back["tasks"]["models"][0]) is int
    assert dict(back["home.scalars"]) == dict(content["home.scalars"])  # floats bit for bit (JSON's repr)
    for name, array in content["home"].items():
        got = back["home"][name]
        assert (got.dtype, tuple(got.shape), got.stype, bytes(got.data)) == (array.dtype, tuple(array.shape),
                                                                              array.stype, bytes(array.data))


def raw_frame(header: bytes, body: bytes = b"", magic: bytes = wire.MAGIC) -> bytes:
    return magic + struct.pack(">I", len(header)) + header + body


@pytest.mark.parametrize("frame,message", [
    (raw_frame(b"{}", magic=b"\x80\x04\x95"), "not a fedefm worker frame"),  # a pickle is not a frame
    (raw_frame(b'{"meta": {}, "records": [["w", "array", [["a", "uint8", [4], "raw", 4]]]]}', b"ab"),
     "connection closed after 2 of 4 bytes"),
    (raw_frame(b'{"meta": {}, "records": [["w", "array", [["a", "uint8", [4], "raw", -4]]]]}'),
     "unreadable frame header"),
    (raw_frame(b'{"meta": {}, "records": [["w", "tensor", {}]]}'), "record 'w' of kind 'tensor' is not valid"),
    (raw_frame(b"not json"), "unreadable frame header"),
])
def test_a_truncated_or_inconsistent_frame_is_refused_naming_the_peer(frame, message):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(wire.WireError, match=f"test peer: .*{message}"):
            wire.receive(b, "test peer")


def bound_socket(path: Path, mode: int = 0o600) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, mode)
    return server


def test_a_worker_folder_or_socket_open_to_others_or_owned_by_another_user_is_refused(tmp_path):
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    with pytest.raises(ConfigError, match="has mode 0755: other users can enter it"):
        wire.private_folder(open_folder)
    folder = wire.private_folder(tmp_path / "mine")
    assert (folder.stat().st_mode & 0o777) == 0o700
    with bound_socket(folder / "open.sock", 0o666):
        with pytest.raises(ConfigError, match="open.sock has mode 0666: other users could connect"):
            wire.check_socket(folder / "open.sock")
    if os.getuid() != 0:
        pytest.skip("making a file another user's needs root")
    with bound_socket(folder / "theirs.sock"):
        os.chown(folder / "theirs.sock", NOBODY, NOBODY)
        with pytest.raises(ConfigError, match=f"belongs to user id {NOBODY}, not you"):
            wire.check_socket(folder / "theirs.sock")
        with pytest.raises(ConfigError, match=f"belongs to user id {NOBODY}"):
            wire.call(folder / "theirs.sock", {"op": "ping"})
    os.chown(open_folder, NOBODY, NOBODY)
    open_folder.chmod(0o700)
    with pytest.raises(ConfigError, match=f"worker folder {open_folder} belongs to user id {NOBODY}"):
        wire.private_folder(open_folder)


def test_a_stale_socket_is_replaced_and_a_socket_path_names_silo_and_federation(tmp_path):
    folder = wire.private_folder(tmp_path / "w")
    path = deploy.claim_worker_socket(folder, "10.0.0.1:9092", 2)
    assert path.name.startswith("silo2-") and path != wire.worker_socket_path(folder, "10.0.0.2:9092", 2)
    bound_socket(path).close()  # a killed worker's socket: nothing listens
    assert deploy.claim_worker_socket(folder, "10.0.0.1:9092", 2) == path and not path.exists()
    with pytest.raises(ConfigError, match="longer than the 103 bytes"):
        wire.worker_socket_path(tmp_path / ("x" * 120), "10.0.0.1:9092", 0)


def test_the_client_app_forwarder_does_not_import_torch():
    code = "import sys, fedefm.federated.flower.client_app; print('torch' in sys.modules, 'ot' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["False", "False"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    corpus = root / "corpus"
    write_pretrain_corpus(corpus, per_class=6, size=32, seed=0)
    path = deploy.claim_worker_socket(wire.private_folder(root / "sockets"), "127.0.0.1:1", 1)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    process = deploy.start_worker(path, 1, corpus, "corpus", env=env, timeout=120)
    try:
        yield path, process
    finally:
        process.kill()
        process.wait()


def test_the_worker_serves_on_a_0600_socket_and_a_second_one_for_its_silo_is_refused(worker):
    path, process = worker
    assert (path.stat().st_mode & 0o777) == 0o600
    answer, _ = wire.call(path, {"op": "ping"})
    assert answer == {"pid": process.pid, "silo-id": 1}
    with pytest.raises(ConfigError, match=rf"--silo-id 1: silo 1 of the federation at 127.0.0.1:1 is already served "
                                          rf"on this machine \(worker pid {process.pid}"):
        deploy.claim_worker_socket(path.parent, "127.0.0.1:1", 1)


def test_the_worker_answers_a_query_and_names_a_bad_message_without_stopping(worker):
    from fedefm.federated.flower.messages import pretrain_config
    from fedefm.federated.silo_data import silo_partition

    path, _ = worker
    run_config = {"silos": 3, "image-size": 32, "data": "unused"}
    corpus = silo_partition(pretrain_config(run_config, data=path.parent.parent / "corpus"))
    query = RecordDict({"run": ConfigRecord({"classes": corpus.class_names})})
    meta = {"op": "message", "run-id": 5, "message-type": "query", "run-config": run_config}
    answer, reply = wire.call(path, meta, query)
    assert dict(reply["silo"]) == {"silo-id": 1, "num-examples": len(corpus.silo_indices[1])}
    assert answer["compute-s"] > 0
    answer, _ = wire.call(path, meta | {"message-type": "predict"}, query)
    assert answer["error"].startswith("ConfigError: message type 'predict': the fedefm ClientApp answers")
    evaluate = RecordDict({"run": ConfigRecord({"classes": corpus.class_names, "outputs": 6}),
                           "evaluate": ConfigRecord({"split": "val"})})
    answer, _ = wire.call(path, meta | {"message-type": "evaluate"}, evaluate)  # the relay holds the corpus
    assert "this run's relay holds the evaluation corpus" in answer["error"]
    _, facts = wire.call(path, meta, RecordDict({"run": ConfigRecord({"classes": []})}))
    assert facts["silo"]["silo-id"] == 1 and list(facts["silo"]["classes"]) == corpus.class_names
    assert wire.call(path, {"op": "ping"})[0]["silo-id"] == 1  # still serving


def test_flower_supernode_refuses_an_open_worker_folder_or_a_taken_silo_id_in_one_line(worker, tmp_path):
    from typer.testing import CliRunner

    from fedefm.cli import app

    path, process = worker
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    base = ["flower", "supernode", "--superlink", "127.0.0.1:1", "--data", str(tmp_path)]
    result = CliRunner().invoke(app, [*base, "--silo-id", "0", "--worker-folder", str(open_folder)])
    assert result.exit_code == 1 and "has mode 0777: other users can enter it" in result.output
    result = CliRunner().invoke(app, [*base, "--silo-id", "1", "--worker-folder", str(path.parent)])
    assert result.exit_code == 1 and f"already served on this machine (worker pid {process.pid}" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_without_a_worker_the_client_app_computes_the_workers_replies_message_after_message(worker, in_a_server_app):
    from flwr.app import Context, Message

    from fedefm.federated.flower import client_app
    from fedefm.federated.flower.messages import pretrain_config, record_weights, weights_record
    from fedefm.federated.runs import initial_model
    from fedefm.federated.silo_data import silo_partition

    path, _ = worker
    corpus_path = path.parent.parent / "corpus"
    run_config = {"algorithm": "moon", "silos": 3, "image-size": 32, "batch-size": 4, "local-steps": 1,
                  "dropout": 0.0, "data": "unused"}  # MOON: its memory must carry over too
    cfg = pretrain_config(run_config, data=corpus_path)
    classes = silo_partition(cfg).class_names
    model = initial_model(cfg, len(classes), torch.device("cpu"))
    content = RecordDict({"run": ConfigRecord({"classes": classes, "outputs": len(classes)}),
                          "tasks": ConfigRecord({"kinds": ["home"], "models": [1], "users": [1], "n-trained": 0}),
                          "model-1": weights_record(model.state_dict())})
    node_config = {"silo-id": 1, "data-path": str(corpus_path), "data-layout": "corpus"}
    context = Context(run_id=9, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    meta = {"op": "message", "run-id": 9, "message-type": "train", "run-config": run_config}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's (OMP_NUM_THREADS=1): another count may sum in another order
    try:
        for _ in range(2):  # the second continues the first's batch stream, dropout generator and memory
            alone = client_app.forward(Message(content, dst_node_id=1, message_type="train"), context).content
            _, served = wire.call(path, meta, content)
            assert bytes(alone["home"]["safetensors"].data) == bytes(served["home"]["safetensors"].data)
            assert dict(alone["home.scalars"]) == dict(served["home.scalars"])
    finally:
        torch.set_num_threads(threads)
    kept = record_weights(context.state["session"])
    assert {"generator.batches", "generator.torch"} <= set(kept) and any(k.startswith("memory.previous.") for k in kept)
