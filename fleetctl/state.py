"""Fleet state on disk, so that every command works across invocations and fleetctl restarts.

Layout of the state directory ($PAGEFLEET_HOME, default ~/.pagefleet), created 0700:

    fleet.json        FleetState: the desired config, one record per replica, the rolling update's progress
    lock              flock(2) target; every read-modify-write of fleet.json holds it
    logs/             replica logs (local backend), events.log (every action, with its reason)
    nginx/            NGINX prefix: nginx.conf, nginx.pid, logs/, tmp/ (the *_temp_path dirs)
    tls/              ca.pem, ca.key, server.pem, server.key, dhparam.pem (keys 0600)
    prometheus/       replicas.json: Prometheus file_sd targets, rewritten whenever the replica set changes

Several fleetctl processes may run at once (`watch` in one terminal, `scale` in another): each
mutation is a short `transaction()` under the lock; long waits (loading, draining) happen outside
it, and a replica's `phase` says who owns it meanwhile (see `Phase`). A rolling update is owned
by its `fleetctl update` process (`UpdateProgress.is_owner_alive`): while that lives, the watcher
pauses and `scale`/`up` refuse (`FleetState.refuse_during_update`).
"""
from __future__ import annotations

import dataclasses
import enum
import fcntl
import json
import os
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fleetctl import procs
from fleetctl.config import FleetConfig
from fleetctl.errors import FleetError, NoFleetError
from fleetctl.groups import DEFAULT_GROUP
from fleetctl.models import weights_name

HOME_ENV = "PAGEFLEET_HOME"


class Phase(str, enum.Enum):
    """Where a replica stands. Only SERVING replicas are in NGINX's upstream.

    STARTING → SERVING once /ready answers 200 (by `up`, `scale` or the watcher).
    SERVING  → FAILED when the watcher sees it dead or unhealthy; FAILED → STARTING on restart.
    any      → DRAINING when `scale`/`down` removes it; the watcher leaves DRAINING replicas alone.
    """

    STARTING = "starting"
    SERVING = "serving"
    FAILED = "failed"
    DRAINING = "draining"


@dataclass
class ReplicaRecord:
    id: str  # "r1", "r2", ...: stable across restarts (a Swarm task slot for swarm)
    host: str
    port: int
    handle: str = ""  # pid (local), container id (docker), task id (swarm)
    gpu: str = ""
    model: str = ""
    served_model_name: str = ""
    phase: Phase = Phase.STARTING
    reason: str = ""  # why it entered its phase
    started_at_s: float = field(default_factory=time.time)
    num_restarts: int = 0
    group: str = DEFAULT_GROUP  # the model group it serves (fleetctl/groups.py)
    # the process `refresh` last saw, "handle@start" (Docker's container id and StartedAt): the
    # same handle with a later start means the backend restarted it in place
    process_seen: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["phase"] = self.phase.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ReplicaRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.phase = Phase(record.phase)
        return record


class UpdatePhase(str, enum.Enum):
    """Where a rolling update (`fleetctl update`, fleetctl/rollout.py) stands.

    RUNNING → DONE, or RUNNING → ROLLING_BACK (a new replica failed its gate) → ROLLED_BACK, or
    FAILED when the rollback could not finish either. RUNNING or ROLLING_BACK with its fleetctl
    process gone means the update was interrupted; running it again resumes it.
    """

    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    DONE = "done"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


@dataclass
class UpdateProgress:
    target_model: str  # the weights the fleet moves to (absolute path or bundled alias)
    from_model: str  # the fleet's model before; what a rollback restores
    num_total: int  # replicas to replace
    num_done: int = 0
    phase: UpdatePhase = UpdatePhase.RUNNING
    step: str = ""  # the action under way, e.g. "r3 (new) gating, then r1 leaves NGINX"
    reason: str = ""  # why it halted
    pid: int = 0  # the `fleetctl update` process and its start time: the update's owner
    pid_start_ticks: int = 0
    started_at_s: float = field(default_factory=time.time)
    finished_at_s: float = 0.0

    @property
    def is_unfinished(self) -> bool:
        return self.phase in (UpdatePhase.RUNNING, UpdatePhase.ROLLING_BACK)

    def is_owner_alive(self) -> bool:
        """True while the `fleetctl update` process that owns this update runs (not a recycled pid)."""
        return procs.is_same_process(self.pid, self.pid_start_ticks)

    def claim(self) -> "UpdateProgress":
        """Makes this process the owner."""
        self.pid, self.pid_start_ticks = os.getpid(), procs.start_ticks(os.getpid()) or 0
        return self

    def describe(self) -> dict:
        """The progress for `status`, with whether its owner still runs."""
        is_owner_alive = self.is_owner_alive()
        return {**self.to_dict(), "is_running": self.is_unfinished and is_owner_alive,
                "is_interrupted": self.is_unfinished and not is_owner_alive}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["phase"] = self.phase.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "UpdateProgress":
        known = {f.name for f in dataclasses.fields(cls)}
        progress = cls(**{k: v for k, v in data.items() if k in known})
        progress.phase = UpdatePhase(progress.phase)
        return progress


@dataclass
class FleetState:
    config: FleetConfig
    fleet_id: str = field(default_factory=lambda: secrets.token_hex(3))
    replicas: dict[str, ReplicaRecord] = field(default_factory=dict)
    next_index: int = 1
    created_at_s: float = field(default_factory=time.time)
    update: UpdateProgress | None = None  # the last (or current) rolling update

    def new_replica_id(self) -> str:
        replica_id = f"r{self.next_index}"
        self.next_index += 1
        return replica_id

    def serving(self) -> list[ReplicaRecord]:
        return [r for r in self.sorted_replicas() if r.phase is Phase.SERVING]

    def active(self, group: str | None = None) -> list[ReplicaRecord]:
        """Replicas that count towards the desired number (all but the draining ones), of one
        model group or of all."""
        return [r for r in self.sorted_replicas() if r.phase is not Phase.DRAINING and group in (None, r.group)]

    def sorted_replicas(self) -> list[ReplicaRecord]:
        return sorted(self.replicas.values(), key=lambda r: (len(r.id), r.id))

    def is_update_running(self) -> bool:
        """A rolling update is under way and its owner process lives."""
        return bool(self.update and self.update.is_unfinished and self.update.is_owner_alive())

    def refuse_during_update(self, what: str) -> None:
        """`scale`, `up` and a second `update` wait for a running update instead of fighting it."""
        if self.is_update_running():
            progress = self.update
            raise FleetError(f"an update to {weights_name(progress.target_model)} is running "
                             f"({progress.num_done}/{progress.num_total} replicas, pid {progress.pid}); "
                             f"{what} after it ends (`fleetctl status` shows where it stands)")

    def describe_update(self) -> dict | None:
        return self.update.describe() if self.update else None

    def to_dict(self) -> dict:
        return {
            "fleet_id": self.fleet_id,
            "config": self.config.to_dict(),
            "replicas": {rid: r.to_dict() for rid, r in self.replicas.items()},
            "next_index": self.next_index,
            "created_at_s": self.created_at_s,
            "update": self.update.to_dict() if self.update else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "FleetState":
        return cls(
            config=FleetConfig.from_dict(data["config"]),
            fleet_id=data["fleet_id"],
            replicas={rid: ReplicaRecord.from_dict(r) for rid, r in data.get("replicas", {}).items()},
            next_index=data.get("next_index", 1),
            created_at_s=data.get("created_at_s", time.time()),
            update=UpdateProgress.from_dict(data["update"]) if data.get("update") else None,
        )


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".pagefleet").expanduser().resolve()


class StateDir:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_home()
        self.fleet_file = self.root / "fleet.json"
        self.logs_dir = self.root / "logs"
        self.nginx_dir = self.root / "nginx"
        self.tls_dir = self.root / "tls"
        self.events_file = self.logs_dir / "events.log"
        self.scrape_targets_file = self.root / "prometheus" / "replicas.json"
        self._lock_file = self.root / "lock"
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._lock_fd: int | None = None

    def ensure(self) -> "StateDir":
        for path in (self.root, self.logs_dir, self.nginx_dir, self.tls_dir):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o700)
        return self

    def has_fleet(self) -> bool:
        return self.fleet_file.exists()

    def load(self) -> FleetState:
        if not self.fleet_file.exists():
            raise NoFleetError(f"no fleet in {self.root}; start one with `fleetctl up` (or set ${HOME_ENV})")
        return FleetState.from_dict(json.loads(self.fleet_file.read_text()))

    def save(self, state: FleetState) -> None:
        """Atomic: readers see the old file or the new one, never half of one."""
        tmp = self.fleet_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state.to_dict(), indent=2, sort_keys=True))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.fleet_file)

    def remove_fleet(self) -> None:
        self.fleet_file.unlink(missing_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes (flock) and threads (RLock); re-entrant within a thread."""
        with self._lock:
            if self._lock_depth == 0:
                self.ensure()
                self._lock_fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                    os.close(self._lock_fd)
                    self._lock_fd = None

    @contextmanager
    def transaction(self) -> Iterator[FleetState]:
        """Load, let the caller change, save; all under the lock. Nothing is saved on an exception."""
        with self.locked():
            state = self.load()
            yield state
            self.save(state)

    def log_event(self, replica_id: str, action: str, reason: str) -> str:
        """Appends one line to events.log and returns it (the watcher also prints it)."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        line = f"{stamp} {replica_id or 'fleet'}: {action}" + (f" ({reason})" if reason else "")
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.events_file, "a") as events:
            events.write(line + "\n")
        return line

    def replica_log(self, replica_id: str) -> Path:
        return self.logs_dir / f"{replica_id}.log"
