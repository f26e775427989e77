#!/usr/bin/env bash
# Brings up the embedded default fleet on this machine: 2 local replicas of the bundled
# SmolLM2-135M-Instruct on the CPU, behind NGINX with TLS on https://localhost:8443.
# Extra arguments go to `fleetctl up` (e.g. --replicas 3, --api-key KEY).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fleetctl up --backend local --replicas 2 "$@"
