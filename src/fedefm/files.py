"""Atomic file writes: a reader never sees a half-written file, a crash never corrupts an old one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def naming_os_errors(path: str | Path) -> Iterator[None]:
    """Give an OSError raised without a file name (a full disk on write or fsync) the name ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with naming_os_errors(path), os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def append_jsonl(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON object as a line (flushed and fsynced, so a crash loses at most this row)."""
    with naming_os_errors(path), open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_rows_after(path: str | Path, key: str, last: int) -> None:
    """Rewrite a JSON-lines file atomically keeping the rows whose ``key`` is at most ``last``.

    A resumed run calls this so the rows written after its checkpoint are not there twice; a last
    line cut off by a crash is dropped too.
    """
    path = Path(path)
    kept = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row[key] <= last:
            kept.append(line)
    with atomic_write(path, "w") as f:
        f.writelines(line + "\n" for line in kept)
