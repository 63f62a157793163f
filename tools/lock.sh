#!/usr/bin/env bash
# Regenerates requirements.lock: every runtime dependency of the service and of its generated
# usage.v1 package (protos/python), and the build backend, pinned with hashes, from PyPI.
# The usage.v1 package itself is this checkout's own: it is built here so the resolver can read
# its dependencies, and left out of the lock (the image installs it from protos/python).
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet pip-tools
"$work/venv/bin/pip" wheel --quiet --no-deps --wheel-dir "$work/wheels" ./protos/python
CUSTOM_COMPILE_COMMAND="bash tools/lock.sh" "$work/venv/bin/pip-compile" --quiet \
    --all-build-deps --generate-hashes --strip-extras --no-emit-find-links --no-emit-index-url \
    --find-links "$work/wheels" --unsafe-package usage-service-protos --no-allow-unsafe \
    --output-file requirements.lock pyproject.toml
python3 - <<'PY'
import pathlib
lock = pathlib.Path("requirements.lock")
text = lock.read_text()
head, _, _ = text.partition("\n# WARNING: The following packages were not pinned")
lock.write_text(
    head.rstrip("\n")
    + "\n\n# usage-service-protos is this checkout's own (protos/python): the image installs it\n"
    + "# from there, without dependencies, after this file.\n"
)
PY
