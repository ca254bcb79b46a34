"""Ask gRPC health services over and over, from a process of its own, until stdin closes.

    python -m tests.chaos.health_watch INTERVAL NAME=HOST:PORT ...

Prints `{"ready": true}` once each has answered (on a connection it keeps), then one JSON line
per answer that was not SERVING (`{"name", "at", "answer"}`), then, once stdin is closed, one
line with the checks made and the slowest answer (`{"checks", "slowest"}`).
Its own process: in the process that makes the load, the load's threads hold the GIL long
enough to make a health call miss its deadline (DEADLINE_EXCEEDED at 2 s in the client while the
server answered within 0.2 s).
"""

from __future__ import annotations

import json
import sys
import threading
import time

import grpc
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

#: The health call's deadline: the Kubernetes probes of tools/k8s allow 3 s.
CHECK_TIMEOUT_SECONDS = 3.0


def main() -> None:
    interval = float(sys.argv[1])
    targets = dict(arg.split("=", 1) for arg in sys.argv[2:])
    checks = {}
    for name, target in targets.items():
        channel = grpc.insecure_channel(target)
        checks[name] = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
    for check in checks.values():  # connected and answered once before the load starts
        check(HealthCheckRequest(), timeout=10)
    print(json.dumps({"ready": True}), flush=True)
    done = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    started = time.monotonic()
    count, slowest = 0, 0.0
    while not done.wait(interval):
        for name, check in checks.items():
            asked = time.monotonic()
            try:
                reply = check(HealthCheckRequest(), timeout=CHECK_TIMEOUT_SECONDS)
                answer = str(HealthCheckResponse.ServingStatus.Name(reply.status))
            except grpc.RpcError as exc:
                answer = f"error {exc.code().name}"
            count += 1
            slowest = max(slowest, time.monotonic() - asked)
            if answer != "SERVING":
                line = {"name": name, "at": round(asked - started, 3), "answer": answer}
                print(json.dumps(line), flush=True)
    print(json.dumps({"checks": count, "slowest": round(slowest, 3)}), flush=True)


if __name__ == "__main__":
    main()
