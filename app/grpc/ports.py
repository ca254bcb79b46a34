"""The seed's port choice: the last port used, then up to N neighbours above it, then any port;
and the address a server tells others to call it at."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

LAST_PORT_FILE = "last-port"


def advertised_ip(bound_host: str, override: str = "") -> str:
    """The address others reach this server at: the override, the bound address, or the host's."""
    if override:
        return override
    if bound_host not in ("", "0.0.0.0", "::"):
        return bound_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def state_dir(env: Mapping[str, str] = os.environ) -> Path:
    """`$XDG_STATE_HOME/jobworker`, or `~/.local/state/jobworker` when that is unset."""
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "jobworker"


def read_last_port(path: Path) -> int | None:
    """The port remembered in `path`; None when it is missing, unreadable or not 1..65535."""
    try:
        port = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return port if 1 <= port <= 65535 else None


def write_last_port(path: Path, port: int) -> None:
    """Remember `port` for the next start; a read-only home only costs a log line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot remember port %d in %s: %s", port, path, exc.strerror)


def candidate_ports(first: int, search: int) -> Iterator[int]:
    """`first`, then `search` neighbours above it (within 65535), then 0 (ephemeral)."""
    if first:
        yield from range(first, min(first + search, 65535) + 1)
    yield 0
