"""Where a running `jobworker dev` fleet is: a small JSON file the client commands read.

`jobworker dev` writes it once its fleet is ready (`$XDG_STATE_HOME/jobworker/dev.json`, beside
the worker's remembered port) and removes it when it stops. A record whose process is gone (a
`jobworker dev` that was SIGKILLed) is ignored, so a client never follows a dead fleet.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import msgspec

from app.grpc.ports import state_dir

DEV_RECORD_FILE = "dev.json"


class DevRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A `jobworker dev` fleet: its process, its Redis and the gRPC address of each role."""

    pid: int
    redis_url: str
    orchestrator: str
    workers: list[str]
    # empty while this build has no trigger role
    trigger: str = ""
    started_at: str = ""


_decoder = msgspec.json.Decoder(DevRecord)


def dev_record_path(env: Mapping[str, str] = os.environ) -> Path:
    """The record's file under the state folder of `env`."""
    return state_dir(env) / DEV_RECORD_FILE


def write_dev_record(record: DevRecord, env: Mapping[str, str] = os.environ) -> Path:
    """Write `record` atomically (a reader sees the old file or the new one); its path."""
    path = dev_record_path(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(msgspec.json.encode(record))
    tmp.replace(path)
    return path


def remove_dev_record(pid: int, env: Mapping[str, str] = os.environ) -> None:
    """Remove the record if it is still the one process `pid` wrote."""
    path = dev_record_path(env)
    record = _read(path)
    if record is not None and record.pid == pid:
        path.unlink(missing_ok=True)


def read_dev_record(env: Mapping[str, str] = os.environ) -> DevRecord | None:
    """The record of a running `jobworker dev`; None when there is none, or it is unreadable,
    or its process is gone."""
    record = _read(dev_record_path(env))
    return record if record is not None and _is_dev_process(record.pid) else None


def _read(path: Path) -> DevRecord | None:
    try:
        return _decoder.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return None


def _is_dev_process(pid: int) -> bool:
    """Whether `pid` is alive and, where /proc tells, still a `dev` command (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's: the cmdline below decides
    if not sys.platform.startswith("linux"):
        return True
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"dev" in argv
