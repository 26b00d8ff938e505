"""Run folders are owned: a manifest names the run's kind and config, a lock keeps out a second writer.

``RUN/run.json`` is written before anything else a run writes: {"kind", "config", "fedefm_version",
"created"}. ``RUN/run.lock`` holds the writer's pid, host and start time while it runs; the lock itself is
an exclusive ``flock`` on that file, which the kernel drops when the process ends in any way, so a crashed
run's lock is taken over by the next run without a race (the file's stale pid is only shown). A non-empty
folder is refused unless the run resumes itself (same kind and config but for the settings that may change
and those added since it started that are at their default; else every difference is listed) or the caller
asks to overwrite it: then the old run is removed first, and only when it is a fedefm run folder. A folder
holding only a manifest (a run that failed before writing anything) is taken without asking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedefm import __version__
from fedefm.errors import ConfigError
from fedefm.files import naming_os_errors, write_json

log = logging.getLogger(__name__)

MANIFEST = "run.json"
LOCK = "run.lock"
OWN_FILES = (MANIFEST, LOCK)


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The folder's manifest {"kind", "config", ...}; a folder from before manifests yields its config.json's record.

    Returns None when the folder holds neither (it is not a fedefm run folder).

    Raises:
        ConfigError: the manifest exists but is not valid JSON.
    """
    for name, kind_key in ((MANIFEST, "kind"), ("config.json", "command")):
        path = Path(out) / name
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}), so fedefm cannot tell which run the folder holds; "
                              "choose a new --out, or delete the folder yourself") from exc
        if isinstance(record, dict) and kind_key in record and isinstance(record.get("config"), dict):
            return {"kind": record[kind_key], "config": record["config"], "created": record.get("created")}
    return None


def field_defaults(cfg: Any) -> dict[str, Any]:
    """The default of every field of a config dataclass (or an instance) that has a plain default: {name: default},
    a path as text (as the config's to_dict gives it)."""
    return {f.name: str(f.default) if isinstance(f.default, Path) else f.default for f in dataclasses.fields(cfg)
            if f.default is not dataclasses.MISSING}


def config_differences(saved: dict[str, Any], current: dict[str, Any], may_change: tuple[str, ...],
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """'name=saved (now current)' for every setting that differs, except those in ``may_change`` and those the
    saved run predates (absent from ``saved``) that are at their value in ``defaults``."""
    current = json.loads(json.dumps(current))  # as run.json holds it: tuples become lists
    defaults = json.loads(json.dumps(defaults or {}))
    # A setting added since the saved run started: that run ran with the behaviour its default keeps.
    predated = {name for name in set(current) - set(saved) if name in defaults and defaults[name] == current[name]}
    names = sorted((set(saved) | set(current)) - set(may_change) - predated)
    return [f"{name}={saved.get(name)!r} (now {current.get(name)!r})" for name in names
            if saved.get(name) != current.get(name)]


@contextlib.contextmanager
def hold_lock(out: Path) -> Iterator[None]:
    """Hold RUN/run.lock exclusively (flock) with this process's pid and host in it; removed on release.

    Raises:
        ConfigError: another live process holds the lock; the message names its pid, host and start time.
    """
    path = Path(out) / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with naming_os_errors(path):  # a file system without locks: ENOLCK, named
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError(f"--out {out}: in use by another run ({holder(path)}); wait for it to finish, "
                              "stop it, or choose a new --out") from None
        # The holder before us may have removed the file between our open and our flock: then lock the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if stale:
        log.warning("%s: taking over the lock of a run that ended without releasing it (%s)", out, stale)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def holder(lock: Path) -> str:
    """'pid N on host H since T' from a lock file, or what is known when it cannot be read."""
    try:
        record = json.loads(lock.read_text())
        return f"pid {record['pid']} on host {record['host']} since {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its lock file {lock} is being written"


def remove_run(out: Path) -> None:
    """Delete every entry of a run folder but the lock; the manifest goes last, so an interrupted removal stays a run."""
    for entry in sorted(out.iterdir(), key=lambda p: p.name == MANIFEST):
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def check_ownership(out: Path, kind: str, config: dict[str, Any], resume: bool, overwrite: bool,
                    may_change: tuple[str, ...], defaults: dict[str, Any] | None = None) -> None:
    """Refuse a folder this run may not write (another run, other settings, foreign files); remove it on overwrite."""
    manifest = read_manifest(out)
    results = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES)
    if resume:
        if manifest is None:
            raise ConfigError(f"--resume {out}: no fedefm run there ({MANIFEST} missing); start without --resume")
        if manifest["kind"] != kind:
            raise ConfigError(f"--resume {out}: the folder holds a {manifest['kind']} run, not a {kind} run; "
                              "choose its own --out")
        differences = config_differences(manifest["config"], config, may_change, defaults)
        if differences:
            raise ConfigError(f"--resume {out}: the run there was started with other settings: "
                              f"{'; '.join(differences)}; resume with the same settings, pass --overwrite to "
                              "replace the run, or choose a new --out")
        return
    if not results:
        return
    if manifest is None:
        raise ConfigError(f"--out {out}: holds {len(results)} entries that are not a fedefm run "
                          f"({', '.join(results[:3])}{', ...' if len(results) > 3 else ''}); choose a new or empty folder")
    if not overwrite:
        raise ConfigError(f"--out {out}: already holds a {manifest['kind']} run ({len(results)} entries); "
                          "pass --resume to continue it, --overwrite to replace it, or choose a new --out")
    log.warning("--overwrite: removing the %s run in %s", manifest["kind"], out)
    remove_run(out)


@contextlib.contextmanager
def owned_run_folder(out: Path, kind: str, config: dict[str, Any], resume: bool = False, overwrite: bool = False,
                     may_change: tuple[str, ...] = ("out",), defaults: dict[str, Any] | None = None) -> Iterator[Path]:
    """Create or claim ``out`` for one run of ``kind``: lock it, check who owns it, write the manifest.

    Args:
        out: the run folder.
        kind: what writes it ("pretrain", "finetune", "predict", "flower").
        config: the run's resolved config as JSON-serialisable values.
        resume: the run continues the one in ``out``; its kind and config must match but for ``may_change``.
        overwrite: remove the fedefm run in ``out`` first.
        defaults: the config's settings at their defaults (:func:`field_defaults`); with ``resume``, a setting the
            run in ``out`` predates is taken as unchanged when it is at its default.

    Raises:
        ConfigError: ``out`` is a file, is locked by a live run, holds another run (without ``resume`` or
            ``overwrite``), holds a run with other settings (with ``resume``), or holds files of no fedefm run.
    """
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the run or replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; choose a folder path")
    out.mkdir(parents=True, exist_ok=True)
    with hold_lock(out):
        check_ownership(out, kind, config, resume, overwrite, may_change, defaults)
        created = (read_manifest(out) or {}).get("created") if resume else None  # a resumed run keeps its start
        write_json(out / MANIFEST, {"kind": kind, "config": json.loads(json.dumps(config)), "fedefm_version": __version__,
                                    "created": created or datetime.datetime.now(datetime.timezone.utc).isoformat(
                                        timespec="seconds")})
        yield out
