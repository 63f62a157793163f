# syntax=docker/dockerfile:1
# usage-service: a small runtime image, built in two stages.
#   docker build -t usage-service .
#   docker run -p 50051:50051 -p 9464:9464 -e DATABASE_URL=... -e USAGE_AUTH_TOKENS=... usage-service
# Ports: 50051 gRPC (USAGE_GRPC_ADDRESS), 9464 Prometheus metrics (USAGE_METRICS_ADDRESS).
# Configuration is by environment; see the README's Configuration table.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: install the service and its dependencies into a virtualenv ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/usage-service
WORKDIR /src
# Every runtime dependency (and the build backend), pinned with hashes: two builds of one commit
# install the same files. requirements.lock says how to regenerate it.
COPY requirements.lock ./
RUN /opt/usage-service/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
# The local distributions of this checkout, without dependencies (all of them are locked above).
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
COPY protos/python ./protos/python
# This checkout's two distributions (the service and its generated usage.v1 package), in one call
# so the package's name resolves to protos/python.
RUN /opt/usage-service/bin/pip install --no-cache-dir --no-deps --no-build-isolation \
        ./protos/python ./ \
    && find /opt/usage-service -name '__pycache__' -prune -exec rm -rf {} +

# --- runtime: the virtualenv only, run by an unprivileged user ---
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="usage-service" \
      org.opencontainers.image.description="Usage metering and entitlements over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 usage \
    && useradd --system --uid 10001 --gid usage --home-dir /var/lib/usage-service \
       --create-home --shell /usr/sbin/nologin usage
COPY --from=build /opt/usage-service /opt/usage-service
ENV PATH=/opt/usage-service/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    USAGE_GRPC_ADDRESS=0.0.0.0:50051 \
    USAGE_METRICS_ADDRESS=0.0.0.0:9464 \
    USAGE_DATA_DIR=/var/lib/usage-service/data \
    USAGE_LOG_FORMAT=json
WORKDIR /var/lib/usage-service
USER 10001:10001
EXPOSE 50051 9464
# Docker has no gRPC health check of its own: `usage-service health` asks the gRPC health service
# on USAGE_GRPC_ADDRESS (over TLS when USAGE_TLS_CERT_FILE is set) and exits 0 only when it
# answers SERVING. It is a Python process per check; deploy/docker-compose.yml replaces it with a
# TCP check, and Kubernetes probes the health service itself (deploy/kubernetes).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["usage-service", "health", "--timeout", "3"]
# SIGTERM: health turns NOT_SERVING, in-flight calls finish (USAGE_SHUTDOWN_GRACE_SECONDS).
STOPSIGNAL SIGTERM
ENTRYPOINT ["usage-service"]
CMD ["serve"]
