"""How large the fields of a job request may be, the same on the orchestrator and the worker.

The orchestrator forwards what it accepted to a worker, so the worker's bounds must not be
tighter; both check them first, before anything is looked up, stored or echoed in a reason.
"""

from __future__ import annotations

MAX_ID_LENGTH = 256
MAX_NAME_LENGTH = 128
MAX_PARAMS = 64
MAX_PARAM_KEY_LENGTH = 128
MAX_PARAM_BYTES = 64 * 1024


def params_problem(params: dict[str, str]) -> tuple[str, str] | None:
    """(field, problem) for the first parameter past the bounds, or None when all fit."""
    if len(params) > MAX_PARAMS:
        return "params", f"at most {MAX_PARAMS} entries"
    for key, value in params.items():
        if not key:
            return "params", "keys must not be empty"
        if len(key) > MAX_PARAM_KEY_LENGTH or not key.isprintable():
            return "params", f"keys must be printable and at most {MAX_PARAM_KEY_LENGTH} characters"
        if len(value) > MAX_PARAM_BYTES or len(value.encode()) > MAX_PARAM_BYTES:
            return f"params.{key}", f"at most {MAX_PARAM_BYTES} bytes"
    return None
