"""Replicas as Docker containers, through the `docker` SDK.

One container per replica, named pagefleet-<fleet>-<id> and labelled `pagefleet.fleet`,
`pagefleet.replica` and `pagefleet.port`, so the engine itself is the list of replicas. Each
container gets one GPU (a device request, round-robin over --gpus), the restart policy
unless-stopped (a crash is restarted by Docker; `docker stop` is not), the model bind-mounted
read-only under /models, and its port published on 127.0.0.1 only, at a host port fleetctl
picks so that it survives restarts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from fleetctl.backends.base import (REPLICA_PORT_IN_CONTAINER, Backend, BackendInfo, Replica, ReplicaSpec, free_port,
                                    replica_env, serve_args)
from fleetctl.backends.docker_api import lines, parse_time
from fleetctl.config import FleetConfig
from fleetctl.errors import FleetError, UnavailableError
from fleetctl.models import is_store_name, resolve_model_path

LABEL_FLEET = "pagefleet.fleet"
LABEL_REPLICA = "pagefleet.replica"
LABEL_PORT = "pagefleet.port"
LABEL_MODEL = "pagefleet.model"


def connect(docker_host: str = "", timeout_s: float = 5.0):
    """A client for the engine at docker_host (else DOCKER_HOST, else the default socket) that
    answered a ping; UnavailableError otherwise."""
    try:
        import docker
    except ImportError:
        raise UnavailableError("the docker Python package is missing; pip install docker, "
                               "or use --backend local") from None
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=60) if docker_host \
            else docker.from_env(timeout=60)
        client.api.timeout = timeout_s
        client.ping()
        client.api.timeout = 60
        return client
    except Exception as exc:  # the SDK raises DockerException, requests' and socket errors alike
        where = docker_host or "DOCKER_HOST / the default socket"
        raise UnavailableError(f"no Docker engine answers at {where} ({type(exc).__name__}); "
                               "start dockerd, set DOCKER_HOST, or use --backend local") from exc


def engine_answers(docker_host: str = "") -> bool:
    try:
        connect(docker_host, timeout_s=2.0).close()
    except UnavailableError:
        return False
    return True


def model_mount(model: str):
    """(the --model argument inside the container, a read-only bind mount of the weights)."""
    from docker.types import Mount

    host_path = resolve_model_path(model)
    if is_store_name(model):     # Ollama's store, read-only: the blob and the manifest's layers
        store = "/ollama/models"
        return (f"{store}/blobs/{host_path.name}",
                Mount(target=store, source=str(host_path.parent.parent), type="bind", read_only=True))
    target = f"/models/{host_path.name}"
    return target, Mount(target=target, source=str(host_path), type="bind", read_only=True)


def extra_mounts(paths: list[str]):
    """--mount SRC[:DST]: more host paths, read-only (e.g. a development tree)."""
    from docker.types import Mount

    mounts = []
    for item in paths:
        src, _, dst = item.partition(":")
        mounts.append(Mount(target=dst or src, source=str(Path(src).resolve()), type="bind", read_only=True))
    return mounts


class DockerBackend(Backend):
    name = "docker"
    info = BackendInfo(restarts_on_crash=True)  # restart policy unless-stopped

    def __init__(self, fleet_id: str, config: FleetConfig, client=None):
        self.fleet_id = fleet_id
        self.config = config
        self.client = client or connect(config.docker_host)

    @classmethod
    def check_available(cls, config: FleetConfig) -> None:
        connect(config.docker_host).close()

    def container_name(self, replica_id: str) -> str:
        return f"pagefleet-{self.fleet_id}-{replica_id}"

    def start(self, spec: ReplicaSpec, port: int | None = None) -> Replica:
        import docker

        port = port or free_port()
        model_arg, mount = model_mount(spec.model)
        self._remove_stale(spec.id)
        device_requests = [docker.types.DeviceRequest(device_ids=[spec.gpu], capabilities=[["gpu"]])] \
            if spec.gpu else []
        try:
            container = self.client.containers.run(
                self.config.image,
                command=[*self.config.replica_command,
                         *serve_args(spec, model_arg, "0.0.0.0", REPLICA_PORT_IN_CONTAINER)],
                name=self.container_name(spec.id),
                labels={LABEL_FLEET: self.fleet_id, LABEL_REPLICA: spec.id, LABEL_PORT: str(port),
                        LABEL_MODEL: spec.served_model_name},
                detach=True,
                ports={f"{REPLICA_PORT_IN_CONTAINER}/tcp": ("127.0.0.1", port)},
                restart_policy={"Name": "unless-stopped"},
                mounts=[mount, *extra_mounts(self.config.mounts)],
                environment={**replica_env(spec), "PAGEFLEET_PORT": str(REPLICA_PORT_IN_CONTAINER),
                             **self.config.env},  # PAGEFLEET_PORT: the image's HEALTHCHECK asks that port
                device_requests=device_requests,
                stop_signal="SIGTERM",
            )
        except docker.errors.ImageNotFound:
            raise UnavailableError(f"image {self.config.image} is not on the Docker engine; build it with "
                                   f"`docker build -f compose/Dockerfile -t {self.config.image} .` "
                                   "or pass --image") from None
        except docker.errors.APIError as exc:
            raise FleetError(f"Docker refused to start {spec.id}: {exc.explanation or exc}") from None
        return self._replica(container)

    def stop(self, replica_id: str, timeout_s: float) -> None:
        import docker

        try:
            container = self.client.containers.get(self.container_name(replica_id))
        except docker.errors.NotFound:
            return
        try:
            container.stop(timeout=max(1, int(timeout_s)))
        except docker.errors.APIError:
            pass  # already stopped or gone
        self._remove_stale(replica_id)

    def list(self) -> dict[str, Replica]:
        import docker

        replicas = {}
        for summary in self.client.api.containers(all=True, filters={"label": f"{LABEL_FLEET}={self.fleet_id}"}):
            try:  # a container removed between the listing and its inspection is simply gone
                replica = self._replica(self.client.containers.get(summary["Id"]))
            except docker.errors.NotFound:
                continue
            replicas[replica.id] = replica
        return replicas

    def logs(self, replica_id: str, follow: bool = False, tail: int = 200) -> Iterator[str]:
        import docker

        try:
            container = self.client.containers.get(self.container_name(replica_id))
        except docker.errors.NotFound:
            return
        yield from lines(container.logs(stream=True, follow=follow, tail=tail))

    def needs_restart(self, replica: Replica | None) -> bool:
        # A crash is restarted by the restart policy ("restarting"); a container that stays
        # exited was stopped by hand, and one that is gone was removed.
        return replica is None or replica.detail.startswith(("exited", "dead", "created"))

    def close(self) -> None:
        self.client.close()

    def _remove_stale(self, replica_id: str) -> None:
        import docker

        try:
            self.client.containers.get(self.container_name(replica_id)).remove(force=True)
        except docker.errors.NotFound:
            pass

    def _replica(self, container) -> Replica:
        state = container.attrs.get("State", {})
        labels = container.labels
        status = state.get("Status", container.status)
        detail = status if status != "exited" else f"exited ({state.get('ExitCode')})"
        return Replica(labels.get(LABEL_REPLICA, container.name), "127.0.0.1", int(labels.get(LABEL_PORT, 0)),
                       container.id[:12], status == "running", parse_time(state.get("StartedAt")), detail, labels)

