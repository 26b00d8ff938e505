"""Start a SuperLink, a SuperNode per silo, and runs of the fedefm Flower App (the ``fedefm flower`` commands).

Every process gets ``flower_environment()``: no telemetry, no update check, and no runtime
installation of app dependencies. Flower 1.42's SuperLink otherwise runs ``uv sync`` on the app's
``[project].dependencies`` into a fresh environment, which would fetch another torch build than the
one installed; the app therefore declares only ``flwr`` (which Flower never reinstalls) and every
site installs ``fedefm[flower]`` itself, so the apps import the fedefm and torch already there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedefm import __version__
from fedefm.errors import ConfigError, FedefmError
from fedefm.federated.flower import wire
from fedefm.federated.flower.messages import default_run_config

APP_TOML = """\
# The fedefm Flower App: `flwr run` sends this folder to the SuperLink; the code is the fedefm package
# installed at every site (pip install 'fedefm[flower]'). Only flwr is listed as a dependency, so Flower's
# runtime installation (disabled anyway by `fedefm flower superlink`) has nothing to fetch.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedefm-flower"
version = "{version}"
description = "FedEFM federated pre-training across hospitals"
license = "Apache-2.0"
dependencies = ["flwr>=1.42,<1.43"]

[tool.flwr.app]
publisher = "fedefm"

[tool.flwr.app.components]
serverapp = "fedefm.federated.flower.server_app:app"
clientapp = "fedefm.federated.flower.client_app:app"

[tool.flwr.app.config]
{config}
"""

CONNECTION_TOML = """\
[superlink]
default = "fedefm"

[superlink.fedefm]
address = "{address}"
{security}
"""


class FlowerRunFailed(FedefmError, RuntimeError):
    """A Flower run finished without success, or did not finish in time; the message holds Flower's status."""


class WorkerStartFailed(FedefmError, RuntimeError):
    """A silo's worker exited, or did not answer, before it served; its own output says why."""


WORKER_START_TIMEOUT_S = 300.0  # importing torch and fedefm on a busy machine
SUPEREXEC_POLL_S = 0.1  # a local request to its own SuperNode: cheap, and each wave waits for it


def flower_environment(flwr_home: Path | None = None) -> dict[str, str]:
    """This process's environment for Flower's processes: no telemetry, update check or dependency installation.

    PATH starts with this Python's own bin folder, where pip put Flower's commands, which start each other by name.
    A SuperNode's SuperExec asks it for messages to run every SUPEREXEC_POLL_S seconds (Flower's default: 1 s).
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, PATH=path, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(SUPEREXEC_POLL_S))
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def toml_value(value) -> str:
    """A run-config value as TOML writes it (str, int, float or bool)."""
    return json.dumps(value)


def write_app(folder: Path, run_config: dict) -> Path:
    """Write the Flower App folder (its pyproject.toml): every run-config key, ``run_config`` over the defaults."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"{key} = {toml_value(value)}" for key, value in (default_run_config() | run_config).items())
    (folder / "pyproject.toml").write_text(APP_TOML.format(version=__version__, config=lines))
    return folder


def superlink_command(port: int, certificates: tuple[Path, Path, Path] | None = None,
                      enable_supernode_auth: bool = False, host: str = "127.0.0.1",
                      database: Path | None = None) -> list[str]:
    """``flower-superlink`` arguments: one HTTP API on host:port, TLS from (CA, cert, key) or insecure.

    ``database``: the SQLite file where the SuperLink keeps its state (runs, registered and connected
    SuperNodes), so that it survives a restart; without it the state is in memory, and a restarted
    SuperLink answers every SuperNode that was connected with 401, upon which the SuperNode exits.
    """
    command = ["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if database is not None:
        command += ["--database", str(Path(database).resolve())]
    if certificates is None:
        command.append("--insecure")
    else:
        ca, cert, key = certificates
        command += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    if enable_supernode_auth:
        command.append("--enable-supernode-auth")
    return command


def supernode_command(superlink: str, silo_id: int, data_path: Path, port: int, data_layout: str = "silo",
                      root_certificates: Path | None = None, private_key: Path | None = None,
                      worker_socket: Path | None = None) -> list[str]:
    """``flower-supernode`` arguments for one silo: its data, silo id and worker socket in the node config, its own
    Runtime API port."""
    node_config = f'silo-id={silo_id} data-path="{Path(data_path).resolve()}" data-layout="{data_layout}"'
    if worker_socket is not None:
        node_config += f' worker-socket="{worker_socket}"'
    command = ["flower-supernode", "--superlink", superlink, "--host", "127.0.0.1", "--port", str(port),
               "--node-config", node_config]
    command += ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    return command


def claim_worker_socket(folder: Path, superlink: str, silo_id: int) -> Path:
    """The socket path for silo ``silo_id`` of the federation at ``superlink``; a dead worker's socket is removed.

    Raises:
        ConfigError: the folder or an existing socket is another user's or open to others, or a live worker
            already serves this silo of this federation on this machine (a silo id already taken).
    """
    path = wire.worker_socket_path(wire.private_folder(folder), superlink, silo_id)
    if not os.path.lexists(path):
        return path
    wire.check_socket(path)
    try:
        answer, _ = wire.call(path, {"op": "ping"}, timeout=5.0)
    except wire.WireError:  # nothing answers: its worker is gone (killed), the socket is stale
        path.unlink()
        return path
    raise ConfigError(f"--silo-id {silo_id}: silo {silo_id} of the federation at {superlink} is already served on "
                      f"this machine (worker pid {answer.get('pid')}, {path}); give every SuperNode its own silo-id")


def start_worker(path: Path, silo_id: int, data_path: Path, data_layout: str, env: dict[str, str] | None = None,
                 timeout: float = WORKER_START_TIMEOUT_S) -> subprocess.Popen:
    """Start silo ``silo_id``'s warm worker at socket ``path`` and wait until it answers; returns its process.

    It exits by itself when this process does. Its output goes to this process's.

    Raises:
        WorkerStartFailed: it exited first (bad data, a broken install), or did not answer within ``timeout`` s.
    """
    command = [sys.executable, "-m", "fedefm.federated.flower.worker", "--socket", str(path), "--silo-id",
               str(silo_id), "--data-path", str(Path(data_path).resolve()), "--data-layout", data_layout,
               "--parent-pid", str(os.getpid())]
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise WorkerStartFailed(f"silo {silo_id}'s worker exited with code {process.returncode} before serving; "
                                    "its messages above say why")
        if os.path.lexists(path):
            try:
                wire.call(path, {"op": "ping"}, timeout=5.0)
                return process
            except wire.WireError:
                pass  # bound, not yet listening
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise WorkerStartFailed(f"silo {silo_id}'s worker did not answer at {path} within {timeout:g} s")


def wait_for_port(address: str, timeout: float = 60) -> None:
    """Wait until something accepts TCP connections at host:port (a SuperLink whose API is up).

    Raises:
        FlowerRunFailed: nothing listens there after ``timeout`` seconds.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise FlowerRunFailed(f"nothing answers at {address} after {timeout:g} s; is the SuperLink running?")
            time.sleep(0.2)


def write_connection(flwr_home: Path, superlink: str, root_certificates: Path | None = None) -> None:
    """Write $FLWR_HOME/config.toml with the SuperLink connection "fedefm" that ``flwr run`` and ``flwr ls`` use."""
    security = ("insecure = true" if root_certificates is None
                else f"root-certificates = {toml_value(str(Path(root_certificates).resolve()))}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(CONNECTION_TOML.format(address=superlink, security=security))


def flwr(arguments: list[str], flwr_home: Path, timeout: float = 120) -> dict:
    """Run the ``flwr`` CLI with ``--format json`` and return its JSON answer.

    Raises:
        FlowerRunFailed: flwr exited non-zero or printed no JSON; the message holds its output.
    """
    executable = shutil.which("flwr", path=flower_environment()["PATH"])
    if executable is None:
        raise ConfigError("the flwr command is not installed; pip install 'fedefm[flower]'")
    done = subprocess.run([executable, *arguments, "--format", "json"], capture_output=True, text=True,
                          env=flower_environment(flwr_home), timeout=timeout)
    try:
        answer = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        answer = None
    if done.returncode != 0 or answer is None or answer.get("success") is False:
        raise FlowerRunFailed(f"flwr {' '.join(arguments)} failed: {(done.stdout + done.stderr).strip()[-2000:]}")
    return answer


def start_run(app: Path, flwr_home: Path) -> int:
    """Submit a run of the app folder to the connection in ``flwr_home``; returns Flower's run id."""
    return int(flwr(["run", str(Path(app).resolve()), "fedefm"], flwr_home)["run-id"])


def wait_run(run_id: int, flwr_home: Path, timeout: float = 3600, poll_s: float = 3.0) -> dict:
    """Wait until run ``run_id`` finishes; returns Flower's record of it (status, elapsed, network traffic).

    Raises:
        FlowerRunFailed: the run failed or was stopped (with Flower's details), or ran past ``timeout``
            seconds (then it is stopped).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = flwr(["ls", "fedefm", "--run-id", str(run_id)], flwr_home)["runs"][0]
        if record["status"].startswith("finished"):
            if record["status"] != "finished:completed":
                raise FlowerRunFailed(f"Flower run {run_id} {record['status']}: {record['status-details']}")
            return record
        time.sleep(poll_s)
    flwr(["stop", str(run_id), "fedefm"], flwr_home)
    raise FlowerRunFailed(f"Flower run {run_id} did not finish within {timeout:g} s; stopped it")


def register_node(flwr_home: Path, public_key: Path) -> int:
    """Register a SuperNode's public key with the SuperLink (``--enable-supernode-auth``); returns its node id."""
    return int(flwr(["supernode", "register", str(Path(public_key).resolve()), "fedefm"], flwr_home)["node-id"])


def run_federation(superlink: str, run_config: dict, root_certificates: Path | None = None,
                   timeout: float = 3600) -> dict:
    """Write the app and a ``flwr`` connection into a temporary folder, run, wait; returns Flower's run record."""
    with tempfile.TemporaryDirectory(prefix="fedefm-flower-") as folder:
        home = Path(folder) / "flwr_home"
        write_connection(home, superlink, root_certificates)
        return wait_run(start_run(write_app(Path(folder) / "app", run_config), home), home, timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """The pids of every process started by ``pid``, its children's children included (from /proc; none
    where there is no /proc)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether a thread of process ``pid`` still runs; once none does, its files (and their locks) are closed.

    A killed process's first thread may show as a zombie while the others still exit, so each is looked at.
    """
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for thread in threads:
        try:
            if Path(f"/proc/{pid}/task/{thread}/stat").read_text().rpartition(")")[2].split()[0] not in "ZX":
                return True
        except OSError:
            pass
    return False


def silo_command(superlink: str, silo_id: int, corpus: Path, port: int, root_certificates: Path | None,
                 private_key: Path | None, worker: bool) -> list[str]:
    """A loopback silo's command: ``fedefm flower supernode`` (SuperNode and warm worker), or a bare SuperNode."""
    if not worker:
        return supernode_command(superlink, silo_id, corpus, port, "corpus", root_certificates, private_key)
    command = [sys.executable, "-m", "fedefm", "flower", "supernode", "--superlink", superlink, "--silo-id",
               str(silo_id), "--data", str(corpus), "--data-layout", "corpus", "--port", str(port)]
    command += [] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    return command + ([] if private_key is None else ["--auth-key", str(private_key)])


class LoopbackFederation:
    """A SuperLink (on ``host``, 127.0.0.1 by default) and one SuperNode per silo, for tests and benchmarks;
    ``stop`` ends them all.

    Every process runs in its own process group (Flower's SuperNodes start SuperExec and ClientApp
    children, ``fedefm flower supernode`` also the silo's worker), logs to FOLDER/NAME.log, and is
    killed with its group. SuperNodes read ``corpus`` with data-layout "corpus", so silo k holds
    partition k, as in ``fedefm pretrain``. ``worker=False`` starts bare ``flower-supernode``s, whose
    ClientApp processes do the silo's work themselves (import torch, decode the images) per message.
    ``database=True`` keeps the SuperLink's state in FOLDER/superlink.db, so that a restarted SuperLink
    still knows the SuperNodes (they reconnect by themselves) and the runs. A subclass may run each
    process elsewhere by overriding ``prefix`` (as ``NetnsFederation`` does).
    """

    def __init__(self, folder: Path, corpus: Path, silos: int = 3, tls: bool = False, auth: bool = False,
                 env: dict[str, str] | None = None, worker: bool = True, host: str = "127.0.0.1",
                 database: bool = False) -> None:
        from fedefm.federated.flower.certificates import write_node_key, write_test_certificates

        self.folder, self.corpus = Path(folder), Path(corpus)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.home = self.folder / "flwr_home"
        self.address = f"{host}:{free_port()}"  # a port free here is free in a fresh network namespace too
        self.env = flower_environment(self.home) | (env or {})
        self.processes: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, list[str]] = {}
        self.runs = 0
        try:
            certificates = write_test_certificates(self.folder / "certificates", (host, "localhost")) if tls else None
            self.ca = certificates[0] if certificates else None
            self.start("superlink", superlink_command(int(self.address.rpartition(":")[2]), certificates, auth,
                                                      host=host,
                                                      database=self.folder / "superlink.db" if database else None))
            wait_for_port(self.address)
            write_connection(self.home, self.address, self.ca)
            for k in range(silos):
                key = None
                if auth:
                    key, public = write_node_key(self.folder / "keys", f"node_{k}")
                    register_node(self.home, public)
                self.start(f"silo{k}", silo_command(self.address, k, self.corpus, free_port(), self.ca, key, worker))
        except BaseException:
            self.stop()
            raise

    def prefix(self, name: str) -> list[str]:
        """The command that process ``name`` runs under (none: it runs here, as this process does)."""
        return []

    def start(self, name: str, command: list[str]) -> None:
        """Start one process in its own group, appending to FOLDER/NAME.log."""
        self.commands[name] = command
        with open(self.folder / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(self.prefix(name) + command, env=self.env, stdout=log,
                                                    stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, name: str) -> None:
        """Kill process ``name`` and its children (its process group, and the group of every descendant that
        started its own: the SuperLink's SuperExec, whose children are the ServerApps) and reap it."""
        process = self.processes[name]
        children = []
        if process.poll() is None:
            children = descendants(process.pid)
            groups = {process.pid}
            for pid in children:
                try:
                    groups.add(os.getpgid(pid))
                except ProcessLookupError:
                    pass
            for group in sorted(groups - {os.getpgrp()}):
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:  # their files (locks) closed
            time.sleep(0.05)

    def restart(self, name: str) -> None:
        """Start process ``name`` again as it was first started: a SuperNode registers under a new node id, a
        SuperLink listens on the same address (with its database, if it has one)."""
        self.start(name, self.commands[name])

    def stop(self) -> None:
        """Kill every process this federation started."""
        for name in list(self.processes):
            self.kill(name)

    def run(self, run_config: dict, timeout: float = 900) -> dict:
        """Run the app with ``run_config`` and wait; returns Flower's record of the finished run."""
        return wait_run(self.start_run(run_config), self.home, timeout)

    def start_run(self, run_config: dict) -> int:
        """Submit a run of the app with ``run_config`` (its folder FOLDER/app_K); returns the run id."""
        self.runs += 1
        return start_run(write_app(self.folder / f"app_{self.runs}", run_config), self.home)


class NamespaceError(FedefmError, RuntimeError):
    """A network namespace or link could not be made or removed (it needs root and iproute2); ``ip`` says why."""


def ip(*arguments: str) -> None:
    """Run ``ip ARGUMENTS`` (iproute2).

    Raises:
        NamespaceError: ``ip`` is not installed, or refused (not root, no veth or bridge support); its words.
    """
    try:
        done = subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NamespaceError(f"ip {' '.join(arguments)}: {error}") from None
    if done.returncode != 0:
        raise NamespaceError(f"ip {' '.join(arguments)}: {done.stderr.strip()}")


class NetnsFederation(LoopbackFederation):
    """A ``LoopbackFederation`` whose SuperLink and SuperNodes each run in a network namespace of their own on
    this machine, as on separate hosts; ``stop`` also deletes the namespaces. Needs root and iproute2.

    The SuperLink's namespace holds a bridge at SUBNET.1/24, the SuperLink's address; silo k's namespace
    a veth into it at SUBNET.(10+k), and this process's namespace one at SUBNET.254, so ``flwr`` (run, ls,
    supernode register) reaches the SuperLink from outside, as an operator's machine would. Each namespace
    brings its own ``lo`` up, where a SuperNode's Runtime API listens. Names carry this process's id and
    SUBNET is 10.231.(pid mod 256), so federations of two processes whose ids differ mod 256 keep apart.
    """

    def __init__(self, folder: Path, corpus: Path, silos: int = 3, **kwargs) -> None:
        tag = f"fedefm{os.getpid()}"
        self.namespaces = {"superlink": f"{tag}-superlink"} | {f"silo{k}": f"{tag}-silo{k}" for k in range(silos)}
        self.host_link = tag  # an interface name: at most 15 bytes
        self.undo: list[tuple[str, ...]] = []  # `ip` arguments that remove what was made, in the order made
        subnet = f"10.231.{os.getpid() % 256}"
        try:
            self.make_network(subnet, silos)
            super().__init__(folder, corpus, silos, host=f"{subnet}.1", **kwargs)
        except BaseException:
            self.remove_network()
            raise

    def make_network(self, subnet: str, silos: int) -> None:
        """Create the namespaces, the SuperLink's bridge and a veth pair onto it per silo and for this namespace."""
        superlink = self.namespaces["superlink"]
        for name in self.namespaces.values():
            ip("netns", "add", name)
            self.undo.append(("netns", "delete", name))
            ip("-n", name, "link", "set", "lo", "up")
        ip("-n", superlink, "link", "add", "name", "br0", "type", "bridge")
        ip("-n", superlink, "addr", "add", f"{subnet}.1/24", "dev", "br0")
        ip("-n", superlink, "link", "set", "br0", "up")
        for k in range(silos):
            self.bridge(["-n", self.namespaces[f"silo{k}"]], "eth0", f"silo{k}", f"{subnet}.{10 + k}")
        self.bridge([], self.host_link, "host", f"{subnet}.254")

    def bridge(self, netns: list[str], end: str, peer: str, address: str) -> None:
        """A veth pair: END at ADDRESS/24 where ``netns`` (``ip`` options) says, PEER on the SuperLink's bridge."""
        superlink = self.namespaces["superlink"]
        ip(*netns, "link", "add", "name", end, "type", "veth", "peer", "name", peer, "netns", superlink)
        # deleted by name before the namespaces: a deleted namespace's veth pairs vanish only some time later
        self.undo.append((*netns, "link", "delete", end))
        ip("-n", superlink, "link", "set", peer, "master", "br0", "up")
        ip(*netns, "addr", "add", f"{address}/24", "dev", end)
        ip(*netns, "link", "set", end, "up")

    def prefix(self, name: str) -> list[str]:
        """``ip netns exec`` into process ``name``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[name]]

    def remove_network(self) -> None:
        """Delete this federation's link here and its namespaces (with their links), newest first.

        Raises:
            NamespaceError: something could not be removed; everything else was.
        """
        failures = []
        while self.undo:
            try:
                ip(*self.undo.pop())
            except NamespaceError as error:
                failures.append(str(error))
        if failures:
            raise NamespaceError("; ".join(failures))

    def stop(self) -> None:
        """Kill every process this federation started, then delete its namespaces and links."""
        try:
            super().stop()
        finally:
            self.remove_network()
