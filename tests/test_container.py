"""The Dockerfile, built and run with buildah (chroot isolation) on a machine with no engine.

`../shared/tools/container-base` makes a stand-in for `python:3.11-slim-bookworm` from Debian's
packages once per machine (and installs buildah and debootstrap when missing); buildah keeps it
in its store, so later runs only build the project's image (about 30 s). The worker then runs
inside the image, on the host's network and PID space (chroot isolation), against the session's
redis-server on 127.0.0.1; grpcurl calls it from the host, its PodInfo key is read, SIGTERM
drains it and the key must be gone.

Needs root. `-m "not container"` leaves it out; CI runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from app.fleet.pod_info import PodStatus, decode_pod_info
from tests.grpc_clients import grpcurl, grpcurl_json
from tests.helpers import ROOT, RedisServer, free_port, wait_for

# the bounds below (base image 600 s, build 600 s) fit inside this backstop
pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]

CONTAINER_BASE = ROOT.parent / "shared" / "tools" / "container-base"
BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
IMAGE = "localhost/job-worker-app:test"
STORE = ("--storage-driver", "vfs")
# the build reaches PyPI through a proxy that only the host's CA bundle trusts
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# uid 10001 in the Dockerfile; the venv is the image's only layer of ours
IMAGE_UID = 10001
MAX_VENV_KIB = 60 * 1024


def _run(
    args: Sequence[str], *, timeout: float, what: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion within `timeout`; fail the test with its output otherwise."""
    try:
        result = subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output
        pytest.fail(f"{what}: no answer within {timeout:g}s:\n{(out or '')[-3000:]}")
    if check and result.returncode != 0:
        pytest.fail(
            f"{what}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def _buildah(*args: str, timeout: float = 60, what: str = "", check: bool = True) -> str:
    return _run(
        ["buildah", *STORE, *args], timeout=timeout, what=what or f"buildah {args[0]}", check=check
    ).stdout


def _have_image(name: str) -> bool:
    return (
        shutil.which("buildah") is not None
        and _run(
            ["buildah", *STORE, "inspect", "--type", "image", name],
            timeout=60, what="buildah inspect", check=False,
        ).returncode == 0
    )  # fmt: skip


@pytest.fixture(scope="module")
def base_image() -> str:
    """buildah and the stand-in base image: made by container-base when this machine lacks them."""
    if _have_image(BASE_IMAGE):
        return BASE_IMAGE
    if os.geteuid() != 0:
        pytest.fail("the container test needs root (buildah, debootstrap); -m 'not container'")
    if not CONTAINER_BASE.is_file():
        pytest.fail(f"{CONTAINER_BASE} is missing: it makes the base image on machines with none")
    # apt-get install + debootstrap: about two minutes on a new machine
    _run(["bash", str(CONTAINER_BASE)], timeout=600, what=str(CONTAINER_BASE))
    assert _have_image(BASE_IMAGE), f"{CONTAINER_BASE} did not leave {BASE_IMAGE}"
    return BASE_IMAGE


def _image_id(name: str) -> str | None:
    if not _have_image(name):
        return None
    return _buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", name).strip()


@pytest.fixture(scope="module")
def image(base_image: str) -> dict[str, Any]:
    """Build the Dockerfile (docker format, which keeps HEALTHCHECK) and return its config."""
    before = _image_id(IMAGE)
    volume = ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"] if CA_BUNDLE.is_file() else []
    _buildah(
        "bud", "--isolation", "chroot", "--format", "docker", *volume, "-t", IMAGE, str(ROOT),
        timeout=600, what="buildah bud (the Dockerfile)",
    )  # fmt: skip
    after = _image_id(IMAGE)
    if before and before != after:
        # the previous build is now nameless; vfs keeps a full copy of each, so drop it
        _buildah("rmi", before, check=False)
    inspected = json.loads(_buildah("inspect", "--type", "image", IMAGE))
    return dict(inspected["Docker"]["config"])


@pytest.fixture
def container(image: dict[str, Any]) -> Iterator[str]:
    name = f"jw-test-{uuid.uuid4().hex[:8]}"
    _buildah("from", "--name", name, IMAGE, what="buildah from")
    try:
        yield name
    finally:
        _buildah("rm", name, check=False)


def _env(config: dict[str, Any]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config["Env"])


def test_image_config(image: dict[str, Any]) -> None:
    assert image["Entrypoint"] == ["jobworker"]
    assert image["Cmd"] == ["worker"]
    assert "9091/tcp" in image["ExposedPorts"]
    assert image["User"].split(":")[0] == str(IMAGE_UID)
    env = _env(image)
    assert env["JOBWORKER_GRPC__PORT"] == "9091"
    assert env["PROFILE"] == "local"
    test = image["Healthcheck"]["Test"]
    assert test[0] == "CMD-SHELL"
    assert "jobworker health" in test[1]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    """The container's processes first (buildah does not forward a kill), then buildah run."""
    for child in reversed(_descendants(process.pid)):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    if process.poll() is None:
        process.kill()
    process.wait(30)


def test_worker_in_the_image(
    image: dict[str, Any],
    container: str,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    port = free_port()
    # `docker run -e`: the settings a deployment gives the image, all through the environment
    settings = {
        "REDIS_URL": redis_server.url,
        "JOBWORKER_GRPC__HOST": "127.0.0.1",
        "JOBWORKER_GRPC__PORT": str(port),
        "JOBWORKER_SCHEDULE__REPORT_INTERVAL_SECONDS": "0.5",
    }
    _buildah("config", *(f"--env={k}={v}" for k, v in settings.items()), container)

    # what the image itself holds: the installed wheel, no source tree, no pip
    probe = (
        "import app, importlib.util, pathlib;"
        "print(app.__file__);"
        "print(importlib.util.find_spec('pip') is None);"
        "print(pathlib.Path('/src').exists())"
    )
    where, no_pip, has_src = _buildah(
        "run", "--isolation", "chroot", container, "--", "python3", "-c", probe
    ).split()
    assert where.startswith("/opt/jobworker/lib/python3.11/site-packages/app/")
    assert (no_pip, has_src) == ("True", "False")
    venv_kib = int(
        _buildah("run", "--isolation", "chroot", container, "--", "du", "-sk", "/opt/jobworker")
        .split()[0]
    )  # fmt: skip
    assert venv_kib < MAX_VENV_KIB, f"the image's own layer grew to {venv_kib} KiB"

    log_path = tmp_path / "container.log"
    with log_path.open("wb") as log:
        # the image's ENTRYPOINT + CMD, as `docker run IMAGE` would run them
        process = subprocess.Popen(
            ["buildah", *STORE, "run", "--isolation", "chroot", container, "--",
             *image["Entrypoint"], *image["Cmd"]],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _exercise_worker(image, container, process, log_path, port, redis_client)
    finally:
        _kill_tree(process)


def _exercise_worker(
    image: dict[str, Any],
    container: str,
    process: subprocess.Popen[bytes],
    log_path: Path,
    port: int,
    redis_client: redis.Redis,
) -> None:
    def log() -> str:
        return log_path.read_text(errors="replace")

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the container exited ({process.returncode}):\n{log()}")
        return "worker ready" in log()

    wait_for(ready, timeout=60, what="the worker in the container to be ready")
    assert f"->SVC::gRPC server started on port {port}" in log()

    # one key, for the worker process inside the container
    keys = wait_for(lambda: redis_client.keys("wpm-apps:*"), timeout=10, what="a PodInfo key")
    assert len(keys) == 1, keys
    key = keys[0].decode() if isinstance(keys[0], bytes) else str(keys[0])
    raw = redis_client.get(key)
    assert isinstance(raw, bytes), f"{key} vanished"
    info = decode_pod_info(raw)
    assert (info.grpc_port, info.ip, info.status) == (port, "127.0.0.1", PodStatus.IDLE)
    assert key == f"wpm-apps:127.0.0.1:{info.pid}"
    # chroot isolation shares the PID space: the key's pid is a host process under buildah run,
    # running as the image's user, not root
    worker = psutil.Process(info.pid)
    assert worker in _descendants(process.pid)
    assert worker.uids().real == IMAGE_UID
    assert any("jobworker" in part for part in worker.cmdline())

    # grpcurl from the host, with no proto file (reflection)
    listing = grpcurl("-plaintext", f"127.0.0.1:{port}", "list")
    assert listing.returncode == 0, listing.stderr
    assert {"worker.WorkerService", "grpc.health.v1.Health"} <= set(listing.stdout.split())
    done = grpcurl_json(
        "-plaintext", "-d", '{"id":"c1","name":"echo","params":{"a":"1"}}',
        f"127.0.0.1:{port}", "worker.WorkerService/RunWork",
    )  # fmt: skip
    assert done["state"] == "SUCCEEDED"
    sent = grpcurl_json(
        "-plaintext", "-d", '{"id":"c2","name":"demo"}',
        f"127.0.0.1:{port}", "worker.WorkerService/SendWork",
    )  # fmt: skip
    assert sent["message"]

    # the image's HEALTHCHECK, run inside the container as an engine would run it
    kind, command = image["Healthcheck"]["Test"]
    assert kind == "CMD-SHELL"
    health = _buildah("run", "--isolation", "chroot", container, "--", "/bin/sh", "-c", command)
    assert health.strip() == "SERVING"

    # `docker stop`: SIGTERM to the container's process, a drain, exit 0, the key deleted
    worker.send_signal(signal.SIGTERM)
    try:
        code = process.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker did not stop within 60 s:\n{log()}") from None
    assert code == 0, log()
    assert "SIGTERM: draining" in log()
    assert "worker stopped" in log()
    assert redis_client.get(key) is None
