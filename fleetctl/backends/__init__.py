"""Backends: where replicas run. `make_backend` picks the one a fleet's config names."""
from __future__ import annotations

from fleetctl.backends.base import Backend, Replica, ReplicaSpec


def make_backend(config, fleet_id: str, state_dir) -> Backend:
    if config.backend == "local":
        from fleetctl.backends.local import LocalBackend

        return LocalBackend(state_dir)
    if config.backend == "docker":
        from fleetctl.backends.docker import DockerBackend

        return DockerBackend(fleet_id, config)
    from fleetctl.backends.swarm import SwarmBackend

    return SwarmBackend(fleet_id, config)


def default_backend(docker_host: str = "") -> str:
    """docker when a Docker engine answers, else local (the README's embedded default)."""
    from fleetctl.backends.docker import engine_answers

    return "docker" if engine_answers(docker_host) else "local"


__all__ = ["Backend", "Replica", "ReplicaSpec", "make_backend", "default_backend"]
