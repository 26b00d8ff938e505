"""A whole Flower run across hosts: the SuperLink and each SuperNode in a network namespace of its own (veth pairs
onto a bridge), over TLS with SuperNode authentication; needs root and iproute2, else skipped."""

import os
import subprocess

import pytest

pytest.importorskip("flwr")

from fedefm.federated.flower import deploy  # noqa: E402
from flower_helpers import (  # noqa: E402
    FEDERATION_ENV,
    RUN_TIMEOUT_S,
    assert_same_run,
    corpus,  # noqa: F401 (a fixture)
    settings,
    simulated,
)


def namespaces_unavailable() -> str | None:
    """Why this machine cannot give the test its namespaces (try one, with a bridge and a veth pair), or None."""
    probe = f"fedefm{os.getpid()}-probe"
    try:
        deploy.ip("netns", "add", probe)
    except deploy.NamespaceError as error:
        return f"cannot make a network namespace (needs root and iproute2): {error}"
    try:
        deploy.ip("-n", probe, "link", "add", "name", "br0", "type", "bridge")
        deploy.ip("-n", probe, "link", "add", "name", "a", "type", "veth", "peer", "name", "b")
    except deploy.NamespaceError as error:
        return f"cannot make a bridge or veth pair in a network namespace: {error}"
    finally:
        deploy.ip("netns", "delete", probe)
    return None


def our_namespaces() -> list[str]:
    """The network namespaces this test process made that still exist."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    return [name for name in listed if name.startswith(f"fedefm{os.getpid()}-")]


@pytest.mark.slow
def test_fedavg_with_each_node_in_its_own_network_namespace_writes_the_simulators_run_folder(corpus, tmp_path):
    if (reason := namespaces_unavailable()) is not None:
        pytest.skip(reason)
    federation = deploy.NetnsFederation(tmp_path / "federation", corpus, tls=True, auth=True, env=FEDERATION_ENV)
    try:
        assert federation.address.rpartition(":")[0] != "127.0.0.1"
        record = federation.run(settings(corpus, tmp_path / "flower", algorithm="fedavg", rounds=1),
                                timeout=RUN_TIMEOUT_S)
        for name, process in federation.processes.items():  # each ran in its own namespace, none here
            where = subprocess.run(["ip", "netns", "identify", str(process.pid)], capture_output=True, text=True)
            assert where.stdout.strip() == federation.namespaces[name]
    finally:
        federation.stop()
    assert our_namespaces() == []
    assert record["status"] == "finished:completed" and record["network-traffic"]["total-bytes"] > 0
    assert "insecure" not in (federation.folder / "superlink.log").read_text().lower()
    assert_same_run(tmp_path / "flower", simulated(corpus, tmp_path / "simulator", "fedavg", rounds=1))
