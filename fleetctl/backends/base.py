"""The one interface every backend implements: start, stop, list, logs; and what it can do, as data.

A backend knows how to run one replica (`replica serve ...`) somewhere and how to find the ones
it runs; it knows nothing of NGINX, readiness or the desired count: `fleetctl/fleet.py` does.

Callers never branch on a backend's name: they read its `BackendInfo` (as kind's providers
declare `ProviderInfo`). A backend that runs rolling updates itself (Swarm) also implements the
`RollingUpdates` protocol below and says so with `info.has_rolling_update`; `fleetctl update`
then drives that instead of replacing replicas one by one (fleetctl/backend_update.py).
A new backend needs the four abstract methods and an honest `info`, nothing else.
"""
from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

REPLICA_PORT_IN_CONTAINER = 8000


@dataclass(frozen=True)
class ReplicaSpec:
    """What to run for one replica; built by the fleet from its config."""

    id: str
    model: str  # a path or the bundled alias, as the operator gave it
    served_model_name: str
    device: str  # cpu | cuda
    gpu: str = ""  # GPU index or UUID this replica is pinned to; "" for CPU
    api_keys: tuple[str, ...] = ()
    max_model_len: int = 0
    num_kv_blocks: int = 0
    drain_timeout_s: float = 30.0
    engine_args: tuple[str, ...] = ()  # the model group's other `replica serve` options
    group: str = "default"  # the model group (fleetctl/groups.py) it belongs to


@dataclass
class Replica:
    """A replica as its backend sees it."""

    id: str
    host: str  # where NGINX and fleetctl reach it
    port: int
    handle: str  # pid:starttime, container id, task id
    is_alive: bool  # its process exists (it may still be loading); False once it exited or crashed
    started_at_s: float
    detail: str = ""  # backend's own words: "exited (137)", "restarting", ...
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendInfo:
    """What a backend does on its own; the fleet adapts to it, never to the backend's name."""

    # The engine restarts a crashed replica itself (Docker restart policy, Swarm); the watcher
    # then waits for it instead of restarting it.
    restarts_on_crash: bool = False
    # Replica ids come from the backend (Swarm task slots), not from the fleet's spec ids; the
    # backend may also add or drop replicas on its own, which `Fleet.refresh` takes over.
    names_replicas_itself: bool = False
    # The backend replaces replicas onto new weights itself: it implements `RollingUpdates`.
    has_rolling_update: bool = False


@runtime_checkable
class RollingUpdates(Protocol):
    """A backend's own rolling update (Swarm's service update), the optional part of the
    interface. `fleetctl update` gates each new replica and moves NGINX; the backend replaces
    them, one at a time, and can go back to the previous spec. Each call concerns one model
    group's replicas."""

    def update_model(self, spec: "ReplicaSpec") -> None:
        """Starts replacing every replica of spec.group with one of spec.model (returns at once)."""

    def update_status(self, group: str = "default") -> dict:
        """{"State": updating | paused | completed | rollback_started | rollback_paused |
        rollback_completed, "StartedAt": ..., "Message": ...}; {} before any update."""

    def update_message(self, group: str = "default") -> str:
        """Why the last update stopped, in one line."""

    def stopping_handles(self, group: str = "default") -> set[str]:
        """Handles of the group's replicas that the backend stops, or has stopped, on its own
        (Swarm stops a slot's old task once its successor is healthy, before fleetctl's gate
        may have passed): fleetctl takes them out of NGINX and never puts them back."""

    def roll_back_model(self, group: str = "default") -> None:
        """Goes back to the spec before the last update (a no-op while already rolling back)."""


class Backend(ABC):
    name: str = ""  # for messages and `status`; never branched on
    info: BackendInfo = BackendInfo()

    @classmethod
    def create(cls, config, fleet_id: str, state_dir) -> "Backend":
        """The backend of a fleet, from its saved config (FleetConfig) and state directory."""
        return cls(fleet_id, config)

    @classmethod
    def check_available(cls, config) -> None:
        """Raises UnavailableError when what the backend needs does not answer (a Docker engine,
        a Swarm manager); checked by `fleetctl up` before anything is saved or started."""

    @abstractmethod
    def start(self, spec: ReplicaSpec, port: int | None = None) -> Replica:
        """Starts one replica and returns at once (loading continues); `port` reuses an address.
        The returned replica's id is spec.id, except on backends that name replicas themselves
        (Swarm: the task slot)."""

    def start_many(self, specs: list[ReplicaSpec]) -> list[Replica]:
        """Starts several; a backend that can do it in one step (Swarm) overrides this."""
        return [self.start(spec) for spec in specs]

    @abstractmethod
    def stop(self, replica_id: str, timeout_s: float) -> None:
        """SIGTERM (the replica drains its requests), SIGKILL after timeout_s, then forget it."""

    @abstractmethod
    def list(self) -> dict[str, Replica]:
        """Every replica of this fleet the backend runs or still knows about, by id."""

    @abstractmethod
    def logs(self, replica_id: str, follow: bool = False, tail: int = 200) -> Iterator[str]:
        """The replica's output, line by line; with follow, until interrupted."""

    def has_logs(self, replica_id: str) -> bool:
        """Whether `logs(replica_id)` has something to show (a replica it runs or still knows)."""
        return replica_id in self.list()

    def needs_restart(self, replica: Replica | None) -> bool:
        """True when the replica is gone or dead and this backend will not bring it back itself."""
        return replica is None or not replica.is_alive

    def restart(self, spec: ReplicaSpec, port: int | None, timeout_s: float) -> Replica:
        self.stop(spec.id, timeout_s)
        return self.start(spec, port)

    def teardown(self) -> None:
        """Removes what the fleet holds beyond its replicas (a Swarm service); after `down`."""

    def close(self) -> None:
        pass


def serve_args(spec: ReplicaSpec, model: str, host: str, port: int) -> list[str]:
    """`replica serve` arguments per the replica contract (ARCHITECTURE.md); keys: `replica_env`."""
    args = ["serve", "--model", model, "--host", host, "--port", str(port),
            "--served-model-name", spec.served_model_name, "--device", spec.device,
            "--drain-timeout", f"{spec.drain_timeout_s:g}"]
    if spec.max_model_len:
        args += ["--max-model-len", str(spec.max_model_len)]
    if spec.num_kv_blocks:
        args += ["--num-kv-blocks", str(spec.num_kv_blocks)]
    return args + list(spec.engine_args)


def replica_env(spec: ReplicaSpec) -> dict[str, str]:
    """Environment of a replica. The API keys go here (PAGEFLEET_API_KEYS, which `replica serve`
    reads like its --api-key options), not on the command line that `ps` shows to every user."""
    env = {"PYTHONUNBUFFERED": "1"}
    # glibc's per-thread malloc arenas kept a replica's RSS climbing for ~8 minutes of load (the
    # 10-min soak at 64: +5.8% after warm-up, 1.23 GB and rising); one arena that returns freed
    # memory early keeps it flat (+1.3%, 0.95 GB); a throughput change, if any, was within this
    # machine's noise (bench/NOTES.md).
    # An operator's own settings win.
    env.update(malloc_env())
    if spec.api_keys:
        env["PAGEFLEET_API_KEYS"] = ",".join(spec.api_keys)
    return env


def malloc_env() -> dict[str, str]:
    """glibc malloc settings for a replica (see replica_env); the operator's own values win."""
    return {name: os.environ.get(name, value) for name, value in
            (("MALLOC_ARENA_MAX", "1"), ("MALLOC_TRIM_THRESHOLD_", "131072"))}


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it; a race with another process is possible
    but harmless: the replica then fails to bind, and the fleet restarts it on another port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
