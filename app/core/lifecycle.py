"""The lifecycle every long-lived component reports: one vocabulary for status and metrics."""

from __future__ import annotations

import enum


class Lifecycle(enum.Enum):
    """Where a long-lived component is: made, serving, on its way out, or done."""

    CREATED = "CREATED"
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    STOPPED = "STOPPED"
