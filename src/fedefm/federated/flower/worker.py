"""The warm per-silo worker: imports torch and fedefm once, decodes the silo's images once per run, and answers
the ClientApp's messages over a Unix socket (``wire``), so a Flower message costs no imports.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message; ``client_app`` is therefore
a thin forwarder that hands each message to this process and returns its reply. ``fedefm flower
supernode`` starts it beside the SuperNode (``python -m fedefm.federated.flower.worker``); it serves
one connection at a time (a silo's messages come one after the other), keeps a ``silo.Session`` per
Flower run, and exits when the process that started it is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import time
from pathlib import Path

from fedefm.errors import FedefmError
from fedefm.federated.flower import silo, wire

log = logging.getLogger(__name__)

KEPT_RUNS = 4  # sessions kept (one per Flower run); the oldest goes first
REQUEST_TIMEOUT_S = 120.0  # how long a connected forwarder may take to send its request


def serve(path: Path, node_config: dict, parent_pid: int | None = None) -> None:
    """Answer frames at the socket ``path`` (created 0600) until the parent process ``parent_pid`` is gone.

    A request's meta is {"op": "ping"} (reply: this process's pid and silo id) or {"op": "message",
    "run-id", "message-type", "run-config"} with the message's records (reply: the answer's records and
    {"compute-s"}, or {"error": "Type: reason"}, which the forwarder raises so Flower reports it to the relay).
    """
    silo_number = silo.silo_id(node_config)
    sessions: dict[int, silo.Session] = {}
    old_umask = os.umask(0o177)  # the socket is created 0600; no window in which others may connect
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    identity = os.stat(path).st_ino
    server.listen(8)
    server.settimeout(1.0)
    log.info("silo %d worker (pid %d) serving at %s", silo_number, os.getpid(), path)
    try:
        while parent_pid is None or os.getppid() == parent_pid:
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(REQUEST_TIMEOUT_S)
                serve_one(connection, path, node_config, silo_number, sessions)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == identity:  # not a successor's socket
                os.unlink(path)


def serve_one(connection: socket.socket, path: Path, node_config: dict, silo_number: int,
              sessions: dict[int, silo.Session]) -> None:
    """Read one request from ``connection`` and write its reply; a broken request is logged, never fatal."""
    try:
        meta, content = wire.receive(connection, f"a forwarder on {path}")
        if meta.get("op") == "ping":
            wire.send(connection, {"pid": os.getpid(), "silo-id": silo_number})
            return
        started = time.perf_counter()
        run_id = int(meta["run-id"])
        reply, session = silo.answer(str(meta["message-type"]), content, node_config, meta["run-config"],
                                     sessions.get(run_id))
        if session is not None:
            sessions[run_id] = sessions.pop(run_id, session)  # most recent last
            while len(sessions) > KEPT_RUNS:
                del sessions[next(iter(sessions))]
        wire.send(connection, {"compute-s": time.perf_counter() - started}, reply)
    except Exception as exc:  # noqa: BLE001 - one bad message must not stop the silo's worker
        expected = isinstance(exc, FedefmError | OSError | KeyError | ValueError | TypeError)
        if expected:
            log.warning("silo %d: %s: %s", silo_number, type(exc).__name__, exc)
        else:  # a bug: leave the traceback in the log
            log.exception("silo %d: unexpected error", silo_number)
        with contextlib.suppress(OSError):  # the forwarder may be gone (its ClientApp stopped)
            wire.send(connection, {"error": f"{type(exc).__name__}: {exc}"
                                   + ("" if expected else " (traceback in the worker's log)")})


def main(argv: list[str] | None = None) -> None:
    """``python -m fedefm.federated.flower.worker --socket PATH --silo-id K --data-path D [--data-layout L]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--silo-id", type=int, required=True)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--data-layout", default="silo", choices=silo.DATA_LAYOUTS)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedefm worker %(levelname)s %(message)s",
                        stream=sys.stderr)
    node_config = {"silo-id": args.silo_id, "data-path": args.data_path, "data-layout": args.data_layout}
    serve(args.socket, node_config, args.parent_pid)


if __name__ == "__main__":
    main()
