"""A reference `worker.WorkerService/SendWork` on the official grpcio asyncio server (grpc.aio).

For comparison only (tools/bench_worker.py measures our grpclib worker against it): it answers
SendWork like the worker does for a job that starts at once, without running anything, and
leaves every other RPC UNIMPLEMENTED.

    python tools/reference_server.py [--port 0] [--stubs DIR]

It listens on 127.0.0.1 only, logs "reference server listening on port N" to stderr once it
serves, and stops on SIGTERM or SIGINT. Without --stubs it generates the grpcio code from
proto/worker.proto into a temporary folder (generated grpcio code is never committed).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "worker.proto"
KNOWN_JOBS = frozenset({"block", "demo", "echo", "fail", "sleep"})
MAX_ID_LENGTH = 256


def generate_stubs(dest: Path) -> Path:
    """Write worker_pb2.py and worker_pb2_grpc.py for proto/worker.proto into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}",
            f"--python_out={dest}", f"--grpc_python_out={dest}", PROTO.name,
        ],
        check=True, cwd=PROTO.parent,
    )  # fmt: skip
    return dest


def load_stubs(stubs: Path) -> tuple[ModuleType, ModuleType]:
    """Import the generated (worker_pb2, worker_pb2_grpc) from the folder `stubs`."""
    if str(stubs) not in sys.path:
        sys.path.insert(0, str(stubs))
    return importlib.import_module("worker_pb2"), importlib.import_module("worker_pb2_grpc")


def make_servicer(pb2: ModuleType, pb2_grpc: ModuleType) -> Any:
    """A WorkerServiceServicer whose SendWork accepts the job like the worker does."""
    running = pb2.JobState.Value("RUNNING")
    base: Any = pb2_grpc.WorkerServiceServicer

    class Servicer(base):  # type: ignore[misc]
        async def SendWork(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
            job_id, name = request.id, request.name
            if not job_id:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "id: must not be empty")
            if len(job_id) > MAX_ID_LENGTH or not job_id.isprintable():
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"id: must be printable and at most {MAX_ID_LENGTH} characters",
                )
            if name not in KNOWN_JOBS:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no job named {name!r}")
            return pb2.SendWorkRes(message=f"job {job_id} accepted: RUNNING", state=running)

    return Servicer()


async def serve(port: int, stubs: Path) -> None:
    """Serve on 127.0.0.1:`port` (0: any free port) until SIGTERM or SIGINT."""
    pb2, pb2_grpc = load_stubs(stubs)
    server = grpc.aio.server()
    pb2_grpc.add_WorkerServiceServicer_to_server(make_servicer(pb2, pb2_grpc), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"reference server listening on port {bound}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--stubs", type=Path, help="folder with worker_pb2*.py (default: generate)")
    args = parser.parse_args()
    if args.stubs is not None:
        asyncio.run(serve(args.port, args.stubs))
        return 0
    with tempfile.TemporaryDirectory(prefix="ref-stubs-") as tmp:
        asyncio.run(serve(args.port, generate_stubs(Path(tmp))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
