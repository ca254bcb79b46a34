"""Jobs are plain functions registered by name.

A user module registers its own with the `job` decorator and is named on the command line
(`jobworker worker --jobs mypkg.jobs`) or in config (`worker.job_modules`)::

    from app.worker.job_registry import job

    @job
    async def resize(image: str, width: int = 640) -> dict[str, int]: ...

    @job(name="crunch")          # a plain `def` runs in a worker thread
    def crunch_numbers(n: int) -> int: ...

Parameters arrive as strings (`map<string,string>` on the wire) and are converted to each
parameter's annotation when the job is submitted, so a bad value is refused before anything runs.
The worker advertises each job's signature in PodInfo, and an orchestrator refuses bad params
at submit already, in the same words (`app.fleet.job_signature`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, overload

import msgspec

from app.errors import ConfigError, UnknownJob
from app.fleet.job_signature import JobSignature, advertised, shape_of, signature_of

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A registered job: its function and how to call it."""

    name: str
    fn: Callable[..., Any]
    # run in a worker thread (plain `def` functions, unless registered with blocking=False)
    blocking: bool
    description: str = ""

    def bind(self, params: Mapping[str, str]) -> dict[str, Any]:
        """Convert `params` to the function's keyword arguments; raise InvalidJobRequest.

        The orchestrator runs the same conversion at submit against the signature this worker
        advertises (`app.fleet.job_signature`), so both refuse alike and in the same words.
        """
        return shape_of(self.fn).convert(self.name, params)

    def signature(self) -> JobSignature:
        """What this worker advertises of the job's parameters in PodInfo."""
        return signature_of(self.fn)


class JobRegistry:
    """Name → JobSpec."""

    def __init__(self) -> None:
        self._specs: dict[str, JobSpec] = {}
        self._advertised: dict[str, msgspec.Raw] | None = None

    def __repr__(self) -> str:
        return f"<JobRegistry {sorted(self._specs)}>"

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def register(
        self, fn: Callable[..., Any], *, name: str | None = None, blocking: bool | None = None
    ) -> JobSpec:
        """Register `fn`; an async function runs on the loop, a plain one in a thread."""
        is_async = inspect.iscoroutinefunction(fn)
        if blocking and is_async:
            raise ValueError(f"{fn.__qualname__}: an async function cannot be blocking")
        spec = JobSpec(
            name=name or fn.__name__,
            fn=fn,
            blocking=(not is_async) if blocking is None else blocking,
            description=(inspect.getdoc(fn) or "").split("\n", 1)[0],
        )
        self._specs[spec.name] = spec
        self._advertised = None
        return spec

    def update(self, specs: Iterable[JobSpec]) -> None:
        """Add `specs`, replacing any registered under the same name."""
        for spec in specs:
            self._specs[spec.name] = spec
        self._advertised = None

    def get(self, name: str) -> JobSpec:
        """The spec registered as `name`; UnknownJob when there is none."""
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownJob(f"no job named {name!r}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._specs)

    def specs(self) -> list[JobSpec]:
        """Every spec, sorted by name."""
        return [self._specs[n] for n in self.names()]

    def advertised_signatures(self) -> dict[str, msgspec.Raw]:
        """The jobs' signatures as PodInfo carries them (JSON by name, within the caps).

        Worked out once (PodInfo is written every few seconds); a job left out is said once:
        the orchestrator does not check its parameters, and this worker still does.
        """
        if self._advertised is None:
            signatures, left_out = advertised((s.name, s.signature()) for s in self.specs())
            for name, why in left_out:
                log.warning("job %r: advertised without its signature (%s); the orchestrator"
                            " will not check its params at submit", name, why)  # fmt: skip
            self._advertised = signatures
        return self._advertised


#: What the `job` decorator registers into; the worker copies it into its own registry.
default_registry = JobRegistry()


@overload
def job(fn: F, /) -> F: ...
@overload
def job(*, name: str | None = None, blocking: bool | None = None) -> Callable[[F], F]: ...
def job(
    fn: F | None = None, /, *, name: str | None = None, blocking: bool | None = None
) -> F | Callable[[F], F]:
    """Register a job function in `default_registry` (bare, or with options)."""

    def decorate(f: F) -> F:
        default_registry.register(f, name=name, blocking=blocking)
        return f

    return decorate(fn) if fn is not None else decorate


def load_job_modules(modules: Iterable[str], *, key: str = "worker.job_modules") -> None:
    """Import each module so that its `@job` functions register; ConfigError when one fails.

    The current directory is on the import path first, as `python -m` puts it: the `jobworker`
    script's own path is its bin folder, so `--jobs myjobs` beside `myjobs.py` found nothing.
    """
    modules = list(modules)
    if modules:
        here = os.getcwd()
        if here not in sys.path:
            sys.path.insert(0, here)
            importlib.invalidate_caches()
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(
                key, f"cannot import {module!r}: {type(exc).__name__}: {exc}"
            ) from None
