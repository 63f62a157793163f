#!/usr/bin/env bash
# The Python client's checks: lint, types, and the tests against a live
# `usage-service serve` (USAGE_SERVICE_BIN, default the repo's .venv/bin/usage-service; the
# database comes from USAGE_TEST_PG or DATABASE_URL, else the PostgreSQL on 127.0.0.1:5432, else
# an embedded one). Expects the repo's .venv to be installed (scripts/test does that).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="$here/../../.venv/bin"

# With the generated usage.v1 package from this checkout (usage-service-protos, a dependency).
"$bin/pip" install --quiet -e "$here/../../protos/python" -e "$here[test]"
cd "$here"
echo "== python client: ruff"
"$bin/ruff" check .
"$bin/ruff" format --check .
echo "== python client: mypy"
"$bin/mypy"
echo "== python client: pytest"
"$bin/pytest" "$@"
