"""The container image and the deployment examples agree with the code and the README."""

from __future__ import annotations

import pathlib
import re

from usage_service.settings import environment

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()
COMPOSE = (ROOT / "deploy" / "docker-compose.yml").read_text()
KUBERNETES = (ROOT / "deploy" / "kubernetes" / "usage-service.yaml").read_text()
SOURCES = "".join(
    p.read_text() for p in (ROOT / "service" / "usage_service").rglob("*.py") if p.is_file()
)


def test_every_usage_variable_the_code_reads_is_documented() -> None:
    read = set(re.findall(r'"(USAGE_[A-Z_]+)"', SOURCES))
    rows = "".join(line for line in README.splitlines() if line.startswith("| `"))
    documented = set(re.findall(r"`(USAGE_[A-Z_]+)`", rows))
    internal = {"USAGE_WORKER", "USAGE_REUSE_PORT"}  # set by `serve --workers` for its workers
    assert read - documented - internal == set()


def test_image_runs_unprivileged_with_a_grpc_health_check() -> None:
    assert re.search(r"^USER 10001:10001$", DOCKERFILE, re.MULTILINE)
    assert 'CMD ["usage-service", "health"' in DOCKERFILE
    assert DOCKERFILE.count("\nFROM ") == 2  # build and runtime stages
    exposed = set(re.findall(r"^EXPOSE (.+)$", DOCKERFILE, re.MULTILINE)[0].split())
    assert exposed == {"50051", "9464"}
    assert "USAGE_GRPC_ADDRESS=0.0.0.0:50051" in DOCKERFILE
    assert "USAGE_METRICS_ADDRESS=0.0.0.0:9464" in DOCKERFILE


def test_deployments_use_the_documented_ports_probes_and_auth() -> None:
    for text in (COMPOSE, KUBERNETES):
        assert "USAGE_AUTH_TOKENS" in text  # never exposed without tokens
        assert "50051" in text and "9464" in text
    assert KUBERNETES.count('["usage-service", "health"') == 2  # readiness and liveness
    assert "runAsNonRoot: true" in KUBERNETES
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", KUBERNETES)[1])  # type: ignore[index]
    shutdown = int(re.search(r'USAGE_SHUTDOWN_GRACE_SECONDS, value: "(\d+)"', KUBERNETES)[1])  # type: ignore[index]
    assert grace > shutdown >= 1
    assert environment.DEFAULT_GRPC_ADDRESS.startswith("127.0.0.1:")  # the bare default stays local
