"""The package tree is the architecture, and this test holds it to that (trio's `_core` rule).

- `app.core` and `app.scheduling` (the kernel) import the standard library (but asyncio and
  threads), anyio and msgspec, and from `app` only the kernel and `app.errors`;
- the shared packages (kernel, fleet, stores, grpc, http, config, errors) import no role and
  not the CLI; the I/O libraries stay in their edge package;
- a role (worker, orchestrator, trigger, web) imports no other role.

Every import counts, function-local and TYPE_CHECKING ones included.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT

APP = ROOT / "app"
ROLES = ("worker", "orchestrator", "trigger", "web")
KERNEL_THIRD_PARTY = {"anyio", "msgspec"}
KERNEL_FORBIDDEN_STDLIB = {"asyncio", "threading", "concurrent", "multiprocessing", "socket"}
# the I/O libraries, and the one package of `app` each may be imported from (roles aside)
EDGE_LIBRARIES = {
    "redis": "app.stores.redis",
    "grpclib": "app.grpc",
    "h2": "app.grpc.fastpath",
    "hpack": "app.grpc.fastpath",
    "hyperframe": "app.grpc.fastpath",
    "starlette": "app.http",
    "hypercorn": "app.http",
}
# what each shared package may import from `app` (itself always)
SHARED: dict[str, set[str]] = {
    "app.errors": set(),
    "app.config": {"app.errors"},
    "app.core": {"app.errors"},
    "app.scheduling": {"app.core", "app.errors"},
    # fleet's schedule records are validated with the kernel's cron and triggers
    "app.fleet": {"app.core", "app.errors", "app.pb", "app.scheduling"},
    "app.stores": {"app.core", "app.errors", "app.fleet", "app.config"},
    "app.grpc": {"app.core", "app.errors", "app.fleet", "app.pb"},
    "app.http": {"app.core", "app.errors"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import statement in `source`."""
    package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base == "app":  # `from app import x` may name a module of the package
                for alias in node.names:
                    yield node.lineno, f"app.{alias.name}" if alias.name != "__version__" else "app"
            else:
                yield node.lineno, base


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def owner(module: str) -> str | None:
    """The shared package or role `module` belongs to (None: the root, cli, pb)."""
    for package in SHARED:
        if within(module, package):
            return package
    for role in ROLES:
        if within(module, f"app.{role}"):
            return f"app.{role}"
    return None


def violations(module: str, source: str) -> list[str]:
    """What `module` (with `source`) imports against the rules; empty when it keeps them."""
    found: list[str] = []
    home = owner(module)
    for line, name in imports(source, module):
        top = name.split(".")[0]
        where = f"{module}:{line} imports {name}"
        if home in ("app.core", "app.scheduling"):
            if top == "app":
                pass  # checked with the shared packages below
            elif top in KERNEL_FORBIDDEN_STDLIB:
                found.append(f"{where}: the kernel awaits through anyio only")
            elif top not in sys.stdlib_module_names and top not in KERNEL_THIRD_PARTY:
                found.append(f"{where}: the kernel imports anyio and msgspec only")
        edge = EDGE_LIBRARIES.get(top)
        # roles and the CLI compose the edges; a shared package keeps to its own
        if edge is not None and home in SHARED and not within(module, edge):
            found.append(f"{where}: {top} belongs in {edge}")
        if top != "app" or name == "app" or home is None:
            continue
        if home in SHARED:
            allowed = SHARED[home] | {home}
            if not any(within(name, a) for a in allowed):
                found.append(f"{where}: {home} may import only {sorted(allowed)} from app")
        elif owner(name) != home and owner(name) in {f"app.{r}" for r in ROLES}:
            found.append(f"{where}: a role imports no other role")
        elif within(name, "app.cli"):
            found.append(f"{where}: a role does not import the CLI")
    return found


def app_modules() -> list[Path]:
    return sorted(p for p in APP.rglob("*.py") if "pb" not in p.relative_to(APP).parts[:1])


def test_the_package_tree_keeps_its_layers() -> None:
    problems = [
        v for path in app_modules() for v in violations(module_name(path), path.read_text())
    ]
    assert not problems, "\n".join(problems)


def test_every_package_is_placed() -> None:
    """A new package has to say where it stands: shared (with its imports) or a role."""
    packages = {module_name(p) for p in APP.glob("*/__init__.py")} | {
        module_name(p) for p in APP.glob("*.py")
    }
    unplaced = {
        p for p in packages if owner(p) is None and p not in ("app", "app.__main__", "app.cli")
    }
    assert unplaced <= {"app.pb", "app.job_registry"}, unplaced


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("app.core.retry", "import asyncio", "the kernel awaits through anyio only"),
        ("app.core.retry", "from redis import Redis", "the kernel imports anyio and msgspec"),
        ("app.scheduling.cron", "import grpclib.server", "the kernel imports anyio and msgspec"),
        ("app.scheduling.cron", "from app.worker import main", "may import only"),
        ("app.core.clock", "def f():\n    from app.stores import abc", "may import only"),
        ("app.core.clock", "from app import job", "may import only"),
        ("app.fleet.pod_info", "import redis.asyncio", "redis belongs in app.stores.redis"),
        ("app.stores.memory", "from app.orchestrator import dispatcher", "may import only"),
        ("app.grpc.server", "import starlette", "starlette belongs in app.http"),
        ("app.worker.main", "from app.orchestrator.dispatcher import Dispatcher", "no other role"),
        ("app.orchestrator.service", "from ..worker import service", "no other role"),
        ("app.worker.service", "from app.cli import clients", "does not import the CLI"),
        ("app.trigger.runner", "from app.orchestrator import service", "no other role"),
        ("app.orchestrator.main", "from app.trigger import replica", "no other role"),
        ("app.trigger.service", "from app.cli import schedules", "does not import the CLI"),
        ("app.fleet.schedules", "from app.trigger import ticks", "may import only"),
        ("app.stores.redis.schedule_store", "from app.trigger import ticks", "may import only"),
    ],
)
def test_the_rules_catch_what_they_forbid(module: str, source: str, expected: str) -> None:
    assert any(expected in v for v in violations(module, source)), violations(module, source)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("app.core.retry", "import anyio\nimport msgspec\nfrom collections import deque"),
        ("app.scheduling.triggers", "from app.core.clock import utc_iso\nfrom app import errors"),
        ("app.stores.redis.job_store", "import redis.asyncio\nfrom app.fleet import batch_job"),
        ("app.worker.main", "from app.stores.redis.client import create_redis\nimport grpclib"),
        ("app.cli.launcher", "from app.worker.main import serve_worker"),
        ("app.fleet.schedules", "from app.scheduling.cron import parse_cron"),
        ("app.trigger.main", "from app.stores.redis.schedule_store import RedisScheduleStore"),
        ("app.trigger.orchestrator_client", "from grpclib.client import Channel"),
        ("app.cli.trigger", "from app.trigger.main import serve_trigger"),
    ],
)
def test_the_rules_allow_what_the_design_wants(module: str, source: str) -> None:
    assert violations(module, source) == []
