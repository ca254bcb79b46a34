"""What every subcommand shares: logging set-up, running on asyncio, and the exit codes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

#: A configuration or argument error (the one-line message names the key).
EXIT_CONFIG = 2


def setup_logging(level: str) -> None:
    """Log lines to stderr at `level`, one format for every role."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """grpclib and redis-py need asyncio; uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        options: dict[str, Any] = {}
    else:
        options = {"use_uvloop": True}
    return anyio.run(fn, backend="asyncio", backend_options=options)
