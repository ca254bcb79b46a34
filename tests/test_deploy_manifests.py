"""The deployment files, checked without a container engine or a cluster.

Kubernetes manifests under `tools/k8s/` go through kubernetes-validate (strict: unknown fields
fail) for the oldest and the newest Kubernetes version we target; `compose.yaml` through the
compose-spec schema that check-jsonschema vendors. On top of the schemas, the properties that
make a drain safe and a start ordered are checked by hand: gRPC probes on the served port,
grace periods longer than the drain, the Redis URL from a Secret, health-gated `depends_on`.
The Dockerfile is read as text here; tests/test_container.py builds and runs it.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.helpers import ROOT

K8S_DIR = ROOT / "tools" / "k8s"
# gRPC probes are GA from 1.27; the newest is whatever the installed kubernetes-validate ships
K8S_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]
# the tiers that are deployed (the trigger tier is not yet)
LIVE_TIERS = {"worker", "orchestrator"}
PREPARED_TIERS: set[str] = set()
# shutdown work after the drain grace: the DRAINING report and the key's deletion (3 s each at
# most) and the gRPC close (2 s); a grace period must leave at least this much room
SHUTDOWN_MARGIN_SECONDS = 8
# each tier's variables for its gRPC port and its drain grace
PORT_VAR = {"worker": "JOBWORKER_GRPC__PORT", "orchestrator": "JOBWORKER_ORCHESTRATOR__PORT"}
GRACE_VAR = {
    "worker": "JOBWORKER_WORKER__DRAIN_GRACE_SECONDS",
    "orchestrator": "JOBWORKER_ORCHESTRATOR__DRAIN_GRACE_SECONDS",
}


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _manifests() -> dict[str, list[dict[str, Any]]]:
    return {
        p.name: _documents(p)
        for p in sorted(K8S_DIR.glob("*.yaml"))
        if p.name != "kustomization.yaml"
    }


def _deployments() -> list[dict[str, Any]]:
    return [d for docs in _manifests().values() for d in docs if d["kind"] == "Deployment"]


def _tier(deployment: dict[str, Any]) -> str:
    return str(deployment["metadata"]["labels"]["app.kubernetes.io/component"])


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _seconds(duration: str) -> float:
    """A compose duration (`40s`, `1m30s`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- Kubernetes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    manifests = _manifests()
    assert manifests, f"no manifests in {K8S_DIR}"
    for name, docs in manifests.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                pytest.fail(f"{name}: {doc['kind']} at {path}: {exc.message} (k8s {version})")


def test_the_validator_rejects_an_unknown_field() -> None:
    """Strict mode is on: a typo in a probe does not pass silently."""
    deployment = copy.deepcopy(_deployments()[0])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["grpc"]["prot"] = 9091
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_the_live_tiers_only() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    for name in listed:
        assert (K8S_DIR / name).is_file(), f"kustomization.yaml lists a missing {name}"
    tiers = {
        _tier(d): name
        for name, docs in _manifests().items()
        for d in docs
        if d["kind"] == "Deployment"
    }
    assert set(tiers) == LIVE_TIERS | PREPARED_TIERS
    assert {tiers[t] for t in LIVE_TIERS} <= listed
    assert not {tiers[t] for t in PREPARED_TIERS} & listed, "a prepared tier is switched on"
    # the Secret is created by hand, never from a committed file
    assert "redis-secret.example.yaml" not in listed


@pytest.mark.parametrize("deployment", _deployments(), ids=_tier)
def test_deployment_probes_grace_and_secret(deployment: dict[str, Any]) -> None:
    tier = _tier(deployment)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == [tier], "the container runs its tier's subcommand"
    env = _env(container)
    port = int(env[PORT_VAR[tier]]["value"])
    assert {p["containerPort"] for p in container["ports"]} == {port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # the kubelet's native gRPC probe: grpc.health.v1.Health/Check on the served port
        assert container[probe]["grpc"]["port"] == port, f"{tier} {probe}"
        assert container[probe]["grpc"].get("service", "") == ""
    grace = float(env[GRACE_VAR[tier]]["value"])
    assert pod["terminationGracePeriodSeconds"] >= grace + SHUTDOWN_MARGIN_SECONDS
    secret_ref = env["REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert secret_ref == {"name": "jobworker-redis", "key": "url"}
    assert "value" not in env["REDIS_URL"]
    # the image's user, checked by the kubelet before the container starts
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_secret_example_matches_the_reference() -> None:
    (secret,) = _documents(K8S_DIR / "redis-secret.example.yaml")
    assert secret["kind"] == "Secret"
    assert secret["metadata"]["name"] == "jobworker-redis"
    assert secret["stringData"]["url"].startswith("rediss://")


# --- compose.yaml ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def _compose_spec_errors(document: dict[str, Any]) -> list[str]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_compose_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    assert _compose_spec_errors(compose) == []


def test_the_compose_spec_rejects_a_bad_condition(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["depends_on"]["valkey"]["condition"] = "service_ready"
    assert _compose_spec_errors(broken)


def test_compose_fleet_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"valkey"} | LIVE_TIERS | PREPARED_TIERS
    assert services["worker"]["deploy"]["replicas"] == 2
    # a prepared tier stays off in a plain `docker compose up`
    for tier in PREPARED_TIERS:
        assert services[tier].get("profiles"), f"{tier} must stay behind a profile until it lands"
    for tier in LIVE_TIERS:
        assert "profiles" not in services[tier]
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert how == {"condition": "service_healthy"}, f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    assert services["worker"]["depends_on"].keys() == {"valkey"}
    assert services["orchestrator"]["depends_on"].keys() == {"valkey", "worker"}


@pytest.mark.parametrize("tier", sorted(LIVE_TIERS | PREPARED_TIERS))
def test_compose_tier_health_port_and_grace(compose: dict[str, Any], tier: str) -> None:
    service = compose["services"][tier]
    assert service["build"] == "."
    assert service["command"] == [tier]
    env = service["environment"]
    assert env["REDIS_URL"] == "redis://valkey:6379/0"
    assert env["PROFILE"]
    port = env[PORT_VAR[tier]]
    health = service["healthcheck"]["test"]
    assert health[:3] == ["CMD", "jobworker", "health"]
    assert health[health.index("--target") + 1] == f"127.0.0.1:{port}"
    assert all(p.endswith(f":{port}") for p in service["ports"])
    assert all(p.startswith("127.0.0.1:") for p in service["ports"]), "loopback only"
    grace = float(env[GRACE_VAR[tier]])
    assert _seconds(service["stop_grace_period"]) >= grace + SHUTDOWN_MARGIN_SECONDS


# --- Dockerfile, read as text --------------------------------------------------------------------


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    # instructions, with continuation lines joined and comments dropped
    lines = re.sub(r"\\\n\s*", " ", re.sub(r"(?m)^\s*#.*\n", "", text)).splitlines()
    instructions = [line.strip() for line in lines if line.strip()]
    froms = [i for i in instructions if i.startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in instructions
    assert all(f.startswith("FROM ${PYTHON_IMAGE}") for f in froms)
    runtime = instructions[instructions.index(froms[-1]) :]
    assert not [i for i in runtime if i.startswith(("COPY ", "ADD "))], "no source tree in runtime"
    user = [i for i in runtime if i.startswith("USER ")]
    assert user, "the runtime stage sets a USER"
    assert user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["jobworker"]' in runtime
    assert 'CMD ["worker"]' in runtime
    assert "EXPOSE 9091" in runtime
    (health,) = [i for i in runtime if i.startswith("HEALTHCHECK ")]
    assert 'jobworker health --target "127.0.0.1:${JOBWORKER_GRPC__PORT}"' in health
    assert any("JOBWORKER_GRPC__PORT=9091" in i for i in runtime if i.startswith("ENV "))
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, ".dockerignore lets in only what the build copies"
