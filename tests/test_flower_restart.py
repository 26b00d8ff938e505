"""Killed and restarted Flower processes over a real SuperLink and SuperNodes on 127.0.0.1: a SuperLink that
comes back resumes the run, a SuperNode that dies is left out of its rounds and rejoins when restarted.

Each test has its own federation, so these run beside test_flower.py's under pytest-xdist (make test)."""

import fcntl
import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from fedefm.federated.flower import deploy  # noqa: E402
from fedefm.models.weights import load_weights  # noqa: E402
from flower_helpers import RUN_TIMEOUT_S, corpus, loopback, settings, simulated  # noqa: E402, F401 (corpus: a fixture)


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []


@pytest.mark.slow
def test_a_superlink_killed_mid_run_then_resumed_gives_the_unbroken_runs_weights_and_metrics(corpus, tmp_path):
    # Its own federation, insecure, whose SuperLink keeps its state in a --database file: with Flower 1.42's
    # default in-memory state a restarted SuperLink has forgotten every SuperNode, answers their next heartbeat
    # and pull with 401, and they exit (so they would have to be restarted too). With the database they retry
    # while it is down and go on, under the same node ids, once it is back.
    federation = loopback(tmp_path / "federation", corpus, database=True)
    out = tmp_path / "flower"
    run_config = settings(corpus, out, algorithm="fedavg", rounds=4, **{"checkpoint-every": 1, "reply-timeout": 60})
    try:
        federation.start_run(run_config)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(metrics_rows(out)) < 2:
            assert time.monotonic() < deadline, "no 2 metrics rows in time"
            time.sleep(0.2)
        silos = {name: process.pid for name, process in federation.processes.items() if name.startswith("silo")}
        # The coordinator dies. Flower starts the ServerApp under a SuperExec in a session of its own, so killing
        # the SuperLink's process group alone leaves it running: the SuperExec sees its parent gone (0.2 s polls)
        # and exits, the ServerApp then gets SIGINT from its own parent watch but takes it only when its pull's
        # retry pause ends, and reports its status to the SuperLink on the way out (seen: 10-15 s later, over the
        # restarted SuperLink). kill takes the SuperExec's process group, ServerApp included, with the SuperLink's.
        federation.kill("superlink")
        # a row is written before its round's checkpoint (which first asks every silo for its session): the
        # resumed run redoes the rounds after the newest checkpoint, and keeps the rows up to it as written
        before = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
        kept = max(int(path.stem.removeprefix("round_")) for path in (out / "checkpoints").glob("round_*.safetensors"))
        assert 1 <= kept <= len(before) < 4
        with open(out / "run.lock") as lock:  # left by the killed ServerApp, and held by no relay any more
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        federation.restart("superlink")
        deploy.wait_for_port(federation.address)
        record = federation.run(run_config | {"resume": True}, timeout=RUN_TIMEOUT_S)
        assert record["status"] == "finished:completed"
        # the same SuperNode processes served the resumed run: none exited when the SuperLink was gone
        assert {name: federation.processes[name].pid for name in silos} == silos
        assert all(federation.processes[name].poll() is None for name in silos)
    finally:
        federation.stop()
    assert (out / "metrics.jsonl").read_text().startswith("".join(before[:kept]))
    unbroken = simulated(corpus, tmp_path / "simulator", "fedavg", rounds=4)
    a, _ = load_weights(out / "global.safetensors")
    b, _ = load_weights(unbroken / "global.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    volatile = ("wall_s", "peak_rss_mb", "cycle_time_s", "message_timing", "relay_bytes")
    rows = [[{k: v for k, v in row.items() if k not in volatile} for row in metrics_rows(run)]
            for run in (out, unbroken)]
    assert [row["round"] for row in rows[0]] == [1, 2, 3, 4]
    assert rows[0] == rows[1]


@pytest.mark.slow
def test_a_supernode_killed_mid_run_is_left_out_then_rejoins_when_restarted(corpus, tmp_path):
    # TLS and SuperNode authentication, as test_flower.py's federation: the restarted SuperNode signs in again
    federation = loopback(tmp_path / "federation", corpus, tls=True, auth=True)
    out = tmp_path / "flower"

    def rows_when(ready, timeout=RUN_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready(rows := metrics_rows(out)):
                return rows
            time.sleep(0.2)
        raise AssertionError(f"no such metrics rows within {timeout} s")

    try:
        # enough rounds after the kill for the restarted worker and SuperNode to start and be found
        run_id = federation.start_run(settings(corpus, out, algorithm="dpsgd", rounds=6, **{"reply-timeout": 60}))
        rows_when(lambda rows: len(rows) >= 1)
        federation.kill("silo2")
        rows_when(lambda rows: any(row["excluded"] for row in rows))
        federation.restart("silo2")
        record = deploy.wait_run(run_id, federation.home, timeout=RUN_TIMEOUT_S)
    finally:
        federation.stop()
    rows = metrics_rows(out)
    assert record["status"] == "finished:completed" and len(rows) == 6
    left_out = [row for row in rows if row["excluded"]]
    assert left_out and all([f["silo"] for f in row["excluded"]] == [2] for row in left_out)
    assert rows[-1]["excluded"] == []  # restarted, it rejoined
    assert (out / "global.safetensors").is_file()
