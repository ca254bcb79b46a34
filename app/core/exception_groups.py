"""What an exception group from a task group stands for: its first leaf.

A task group raises a group even when one task failed; an edge that answers with one error (a
gRPC status, a reconnect reason, a config key) wants that one.
"""

from __future__ import annotations


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a (nested) group that is not a group itself."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found
