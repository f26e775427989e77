"""Backends: where replicas run. The only place that maps a backend's name to its class;
everything else asks the backend itself (`Backend.info`, its methods)."""
from __future__ import annotations

import importlib

from fleetctl.backends.base import Backend, BackendInfo, Replica, ReplicaSpec, RollingUpdates

# name → (module, class), imported on first use (the docker SDK only when a fleet needs it).
BACKEND_CLASSES = {
    "local": ("fleetctl.backends.local", "LocalBackend"),
    "docker": ("fleetctl.backends.docker", "DockerBackend"),
    "swarm": ("fleetctl.backends.swarm", "SwarmBackend"),
}


def backend_class(name: str) -> type[Backend]:
    module, cls = BACKEND_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def make_backend(config, fleet_id: str, state_dir) -> Backend:
    return backend_class(config.backend).create(config, fleet_id, state_dir)


def preflight(config) -> None:
    """What the fleet's backend needs before anything starts (UnavailableError otherwise)."""
    backend_class(config.backend).check_available(config)


def default_backend(docker_host: str = "") -> str:
    """docker when a Docker engine answers, else local (the README's embedded default)."""
    from fleetctl.backends.docker import engine_answers

    return "docker" if engine_answers(docker_host) else "local"


__all__ = ["Backend", "BackendInfo", "Replica", "ReplicaSpec", "RollingUpdates", "backend_class", "make_backend",
           "preflight", "default_backend"]
