#!/usr/bin/env bash
# CI drift check: regenerates protos/gen into a temp dir and fails if it differs from what is checked in.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
node_modules/.bin/buf lint
node_modules/.bin/buf generate -o "$tmp"
if ! diff -ru protos/gen "$tmp/protos/gen"; then
  echo "protos/gen is out of date with protos/: run 'npm run protos' and commit the result" >&2
  exit 1
fi
echo "protos/gen matches protos/"
