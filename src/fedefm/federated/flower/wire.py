"""The silo worker's Unix socket: where it lives, who may use it, and the frames that travel on it (no torch here).

A frame is b"FEW1", the header's length (4 bytes, big-endian), a JSON header, then the bytes of every
Array in header order. The header holds ``meta`` (what to do, or how it went) and ``records``: each
Flower record of the message as [key, kind, items] — ConfigRecord and MetricRecord values as JSON, an
ArrayRecord as [name, dtype, shape, stype, byte count] per Array. Nothing is unpickled: a peer's
frame is JSON and raw bytes, and a header that does not add up is refused naming the socket.

The socket sits in a folder only its user can enter (mode 0700), with mode 0600, at a path derived
from the SuperLink address and the silo id, so two SuperNodes on one machine never share one, and a
second SuperNode for the same silo of the same federation finds the first one's worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import tempfile
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedefm.errors import ConfigError, FedefmError

MAGIC = b"FEW1"
MAX_HEADER_BYTES = 64 * 2**20  # a header is settings and array descriptions, never weights
MAX_BODY_BYTES = 16 * 2**30
MAX_SOCKET_PATH = 103  # sun_path holds 108 bytes on Linux, 104 on macOS, with a closing zero
RECORD_KINDS = {"config": ConfigRecord, "metric": MetricRecord}


class WireError(FedefmError, RuntimeError):
    """A worker socket cannot be reached, or sent a frame that is truncated or does not add up."""


def default_worker_folder() -> Path:
    """$XDG_RUNTIME_DIR/fedefm (a per-user folder on systemd machines), else TMPDIR/fedefm-UID."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "fedefm" if runtime else Path(tempfile.gettempdir()) / f"fedefm-{os.getuid()}"


def worker_socket_path(folder: Path, superlink: str, silo: int) -> Path:
    """FOLDER/silo{K}-{digest of the SuperLink address}.sock: one socket per silo of one federation on this machine."""
    digest = hashlib.sha256(superlink.encode()).hexdigest()[:12]
    path = Path(folder) / f"silo{silo}-{digest}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"worker socket {path}: longer than the {MAX_SOCKET_PATH} bytes a Unix socket path may "
                          "have; give a shorter --worker-folder")
    return path


def refuse_shared(what: str, info: os.stat_result, others_may: str, fix: str) -> None:
    """Raise ConfigError naming ``what`` when it is another user's, or its mode lets other users in."""
    if info.st_uid != os.getuid():
        raise ConfigError(f"{what} belongs to user id {info.st_uid}, not you ({os.getuid()}); {fix}")
    if info.st_mode & 0o077:
        raise ConfigError(f"{what} has mode {stat.S_IMODE(info.st_mode):04o}: other users {others_may}; {fix}")


def private_folder(folder: Path) -> Path:
    """Create ``folder`` with mode 0700 if absent; refuse one that is a link, another user's, or open to others.

    Raises:
        ConfigError: naming the folder, its owner or mode, and the fix.
    """
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"worker folder {folder} is not a folder (a link?); give --worker-folder a folder of yours")
    refuse_shared(f"worker folder {folder}", info, "can enter it",
                  "chmod 700 a folder of your own, or give another --worker-folder")
    return folder


def check_socket(path: Path) -> None:
    """Refuse a worker socket that is not a socket, belongs to another user, or others may connect to.

    Raises:
        ConfigError: naming the socket, its owner or mode.
    """
    info = os.lstat(path)
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"worker socket {path} is not a socket; remove it or give another --worker-folder")
    refuse_shared(f"worker socket {path}", info, "could connect",
                  "only the worker's own user may use it (mode 0600); remove it or give another --worker-folder")


def encode(meta: dict, content: RecordDict | None = None) -> list[bytes]:
    """A frame's pieces (header, then each Array's bytes) for ``meta`` and the records of ``content``."""
    records, arrays = [], []
    for key, record in (content or RecordDict()).items():
        if isinstance(record, ArrayRecord):
            items = []
            for name, array in record.items():
                items.append([name, array.dtype, list(array.shape), array.stype, len(array.data)])
                arrays.append(bytes(array.data))
            records.append([key, "array", items])
        elif isinstance(record, ConfigRecord | MetricRecord):
            records.append([key, "config" if isinstance(record, ConfigRecord) else "metric", dict(record)])
        else:
            raise WireError(f"record {key}: a {type(record).__name__} cannot travel to the worker")
    header = json.dumps({"meta": meta, "records": records}).encode()
    return [MAGIC + struct.pack(">I", len(header)) + header, *arrays]


def send(sock: socket.socket, meta: dict, content: RecordDict | None = None) -> None:
    """Write one frame to ``sock``."""
    for piece in encode(meta, content):
        sock.sendall(piece)


def receive_exactly(sock: socket.socket, n: int, peer: str) -> bytes:
    """The next ``n`` bytes from ``sock``.

    Raises:
        WireError: the peer closed the connection first.
    """
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        count = sock.recv_into(view[got:])
        if count == 0:
            raise WireError(f"{peer}: connection closed after {got} of {n} bytes")
        got += count
    return bytes(buffer)


def receive(sock: socket.socket, peer: str) -> tuple[dict, RecordDict]:
    """Read one frame from ``sock``; returns its meta and its records as a Flower RecordDict.

    Raises:
        WireError: naming ``peer``, when the frame is truncated, oversized or its header does not add up.
    """
    start = receive_exactly(sock, 8, peer)
    if start[:4] != MAGIC:
        raise WireError(f"{peer}: not a fedefm worker frame (starts {start[:4]!r})")
    (length,) = struct.unpack(">I", start[4:])
    if length > MAX_HEADER_BYTES:
        raise WireError(f"{peer}: header of {length} bytes is over the {MAX_HEADER_BYTES} allowed")
    try:
        header = json.loads(receive_exactly(sock, length, peer))
        meta, records = header["meta"], header["records"]
        sizes = [item[4] for _, kind, items in records if kind == "array" for item in items]
        if not isinstance(meta, dict) or any(not isinstance(n, int) or n < 0 for n in sizes):
            raise ValueError("meta is not an object or an array size is not a count")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise WireError(f"{peer}: unreadable frame header ({exc})") from exc
    if sum(sizes) > MAX_BODY_BYTES:
        raise WireError(f"{peer}: {sum(sizes)} bytes of arrays are over the {MAX_BODY_BYTES} allowed")
    content = RecordDict()
    for key, kind, items in records:
        try:
            if kind == "array":
                content[key] = ArrayRecord({name: Array(dtype=dtype, shape=tuple(shape), stype=stype,
                                                        data=receive_exactly(sock, size, peer))
                                            for name, dtype, shape, stype, size in items})
            else:
                content[key] = RECORD_KINDS[kind](items)
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"{peer}: record {key!r} of kind {kind!r} is not valid ({exc})") from exc
    return meta, content


def call(path: Path, meta: dict, content: RecordDict | None = None, timeout: float = 600.0) -> tuple[dict, RecordDict]:
    """Send one request frame to the worker at ``path`` and return its reply frame (meta, records).

    Raises:
        ConfigError: the socket is another user's or open to others (``check_socket``).
        WireError: nothing listens there, the worker took longer than ``timeout`` seconds, or its reply is unreadable.
    """
    peer = f"worker socket {path}"
    try:
        check_socket(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            send(sock, meta, content)
            return receive(sock, peer)
    except FileNotFoundError as exc:
        raise WireError(f"{peer} does not exist; is `fedefm flower supernode` (which starts the worker) running?") \
            from exc
    except OSError as exc:  # refused (a stale socket), reset, or past the timeout
        raise WireError(f"{peer}: {exc}") from exc
