"""The lifecycle every long-lived component reports: one vocabulary for status and metrics."""

from __future__ import annotations

import enum


class Lifecycle(enum.Enum):
    """Where a long-lived component is: made, starting, serving, on its way out, or done."""

    CREATED = "CREATED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    STOPPED = "STOPPED"
