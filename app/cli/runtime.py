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


def setup_logging(level: str, log_format: str = "text") -> None:
    """Log lines to stderr at `level`, in `log_format` (text or json), the same for every role."""
    from app.cli.logs import log_handler

    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format, sys.stderr)])


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """grpclib and redis-py need asyncio; uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        options: dict[str, Any] = {}
    else:
        options = {"use_uvloop": True}
    return anyio.run(fn, backend="asyncio", backend_options=options)
