#!/usr/bin/env bash
# Fails when the committed generated code differs from what buf generates from the protos now:
# the TypeScript in src/gen (both templates). Generates into a temporary folder and compares; the
# work tree is not touched. Needs the root node_modules (buf, protoc-gen-es).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

npx --no-install buf generate --output "$out"
npx --no-install buf generate --template clients/typescript/buf.gen.yaml --output "$out"

status=0
diff -r "$out/clients/typescript/src/gen" clients/typescript/src/gen || status=1
if [ "$status" -ne 0 ]; then
  echo "generated code is stale: run 'npx buf generate && npx buf generate --template clients/typescript/buf.gen.yaml' at the repo root and commit" >&2
  exit 1
fi
echo "generated code is up to date"
