#!/bin/sh
# Writes the secrets deploy/compose.yaml reads, as a .env file for Docker Compose:
#   cd deploy && sh compose-env.sh > .env
# Each token is new; the collector gets only the hashes of its tokens. Keep .env to yourself.
set -eu
token() { openssl rand -hex 32; }
sha256() { printf %s "$1" | openssl dgst -sha256 -r | cut -d' ' -f1; }
sidecar=$(token)
reader=$(token)
echo "POSTGRES_PASSWORD=$(openssl rand -hex 16)"
echo "LATCHKEY_BROKER_ADMIN_TOKEN=$(token)"
echo "LATCHKEY_CONTROL_TOKEN=$(token)"
echo "LATCHKEY_SIDECAR_TOKEN=$sidecar"
echo "LATCHKEY_SIDECAR_TOKEN_SHA256=$(sha256 "$sidecar")"
echo "LATCHKEY_COLLECTOR_READER_TOKEN=$reader"
echo "LATCHKEY_COLLECTOR_READER_TOKEN_SHA256=$(sha256 "$reader")"
