"""Every process of the benchmark dies with its parent, even when that is SIGKILLed.

tools/bench_e2e.py puts this folder on PYTHONPATH, so Python imports this module at the start of
each worker and client it runs; the parent-death signal is also set in every process they fork
(dramatiq and taskiq fork their worker processes), so that a killed benchmark leaves nothing.
Only when $BENCH_E2E_STAMPS says the benchmark started this process.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the parent died before the signal was asked for
        os._exit(1)


if os.environ.get("BENCH_E2E_STAMPS"):
    _die_with_parent()
    os.register_at_fork(after_in_child=_die_with_parent)
