#!/usr/bin/env bash
# The TypeScript client's checks: generated code up to date, type check, and the tests against a
# live `usage-service serve` (USAGE_SERVICE_BIN, default the repo's .venv/bin/usage-service; the
# database comes from DATABASE_URL, else the PostgreSQL on 127.0.0.1:5432, else an embedded one).
# Expects the repo's .venv to be installed (scripts/test does that).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

# The root package holds the buf CLI and protoc-gen-es. npm install there, as scripts/test does:
# npm 11 leaves other platforms' optional buf binaries out of that lock file and npm ci refuses it.
(cd "$here/../.." && npm install --no-audit --no-fund --loglevel=error)
echo "== generated code"
bash "$here/check-generated.sh"

cd "$here"
npm ci --no-audit --no-fund --loglevel=error
echo "== typescript client tests"
npm test
