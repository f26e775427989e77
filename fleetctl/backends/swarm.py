"""Replicas as the tasks of one Docker Swarm service (pagefleet-<fleet>), through the `docker` SDK.

Swarm schedules the tasks over its nodes, restarts failed ones (restart condition on-failure) and
runs rolling updates (parallelism 1, start-first, rollback on failure); fleetctl does not
schedule anything itself. Each task publishes the replica port in host mode at a port Swarm
picks, so NGINX reaches a task at <its node's address>:<published port>; a replica's id is its
task slot ("r3" is slot 3), which stays the same when Swarm replaces the task. A fleet of model
groups has one service per group: pagefleet-<fleet>-<group>, whose replicas are <group>-r<slot>
(the default group keeps the names above).

With --gpus, each task reserves one `NVIDIA-GPU` generic resource (nodes advertise theirs in
daemon.json `node-generic-resources`) and, unless --constraint says otherwise, is placed on nodes
labelled `pagefleet.gpu=true`. The model path must exist on every node (it is bind-mounted
read-only), as must the paths given with --mount.
"""
from __future__ import annotations

import copy
import threading
import time
from typing import Iterator

from fleetctl.backends.base import (REPLICA_PORT_IN_CONTAINER, Backend, BackendInfo, Replica, ReplicaSpec, replica_env,
                                    serve_args)
from fleetctl.backends.docker import LABEL_FLEET, LABEL_MODEL, connect, extra_mounts, model_mount
from fleetctl.backends.docker_api import EngineApi, health_report, lines, parse_time
from fleetctl.config import FleetConfig
from fleetctl.errors import FleetError, UnavailableError
from fleetctl.groups import DEFAULT_GROUP

LABEL_GROUP = "pagefleet.group"
GPU_RESOURCE = "NVIDIA-GPU"
DEFAULT_GPU_CONSTRAINT = "node.labels.pagefleet.gpu==true"
TASK_START_TIMEOUT_S = 120.0
NS_PER_S = 1_000_000_000  # the Engine API's durations are in nanoseconds
# Swarm's health check of a task: its /ready, over a bare socket in an isolated Python without
# site-packages. urllib's import tree made each check cost ~0.1 s of CPU and 1-1.4 s of wall time
# on a 2-core machine at load 15, against 0.03 s and 0.3-0.45 s; three checks over the 3 s
# timeout in a row and Swarm kills a task that serves fine ("unhealthy container"), as it did to
# both old tasks of an update in one such run.
READY_PROBE = ("import socket; s = socket.create_connection(('127.0.0.1', %d), 2); s.settimeout(2); "
               "s.sendall(b'GET /ready HTTP/1.0\\r\\n\\r\\n'); "
               "raise SystemExit(0 if s.recv(64).split(b' ')[1:2] == [b'200'] else 1)") % REPLICA_PORT_IN_CONTAINER
# Task states in which the replica's process exists or is about to (it may still be loading).
ALIVE_STATES = ("new", "pending", "assigned", "accepted", "preparing", "ready", "starting", "running")
# Desired states of a task Swarm means to run ("ready": a restarted task waiting out its delay);
# any later one (shutdown, remove, ...) means Swarm is stopping it.
DESIRED_RUNNING = ("ready", "running")


def replica_id(group: str, slot: int) -> str:
    """r<slot> in the default group's service, <group>-r<slot> in another group's."""
    return f"r{slot}" if group == DEFAULT_GROUP else f"{group}-r{slot}"


def group_of(replica_id: str) -> str:
    group, sep, slot = replica_id.rpartition("-r")
    return group if sep and slot.isdigit() else DEFAULT_GROUP


def ipv4_host_port(bindings: list[dict]) -> int:
    """The host port of a container's IPv4 binding (docker's `container.ports` entries, e.g.
    {"HostIp": "0.0.0.0", "HostPort": "32768"}). Docker publishes on 0.0.0.0 and [::] and,
    when the IPv4 port is taken, retries IPv4 alone, so the two can differ; fleetctl and NGINX
    reach replicas at the node's IPv4 address. 0 when there is none."""
    ipv4 = [b for b in bindings if ":" not in (b.get("HostIp") or "")]
    chosen = ipv4 or bindings
    return int(chosen[0]["HostPort"]) if chosen else 0


def rolling_update(update_monitor_s: float) -> dict:
    """Swarm's UpdateConfig: replace one task at a time, start the new one first, and roll back a
    failed update; each new task is watched for update_monitor_s (--update-monitor)."""
    return {"Parallelism": 1, "Order": "start-first", "FailureAction": "rollback",
            "Monitor": int(update_monitor_s * NS_PER_S)}


def _slot_order(task: dict) -> tuple[bool, str]:
    """Which of a slot's tasks stands for it: one Swarm wants running, then the newest."""
    return task.get("DesiredState") in DESIRED_RUNNING, task["CreatedAt"]


def check_swarm_manager(client) -> None:
    swarm = client.info().get("Swarm", {})
    if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
        raise UnavailableError("this Docker engine is not a Swarm manager; run "
                               "`docker swarm init --advertise-addr <ip>` or use --backend docker")


class SwarmBackend(Backend):
    name = "swarm"
    # Swarm replaces failed tasks, names replicas by task slot and runs rolling updates itself
    # (this class implements base.RollingUpdates).
    info = BackendInfo(restarts_on_crash=True, names_replicas_itself=True, has_rolling_update=True)

    def __init__(self, fleet_id: str, config: FleetConfig, client=None):
        self.fleet_id = fleet_id
        self.config = config
        self.client = client or connect(config.docker_host)
        self.engine_api = EngineApi(self.client)
        self._scale_lock = threading.Lock()
        check_swarm_manager(self.client)

    @classmethod
    def check_available(cls, config: FleetConfig) -> None:
        client = connect(config.docker_host)
        try:
            check_swarm_manager(client)
        finally:
            client.close()

    def start(self, spec: ReplicaSpec, port: int | None = None) -> Replica:
        return self.start_many([spec])[0]

    def start_many(self, specs: list[ReplicaSpec]) -> list[Replica]:
        """Adds len(specs) tasks to the service of the specs' group in one service update
        (creating the service first) and returns them once each has a published port; their ids
        are their slots, whatever the specs said. All tasks share the first spec (one service,
        one task template)."""
        group = specs[0].group
        service = self._service(group)
        before = set(self.list())
        if service is None:
            self._create_service(specs[0], num_replicas=len(specs))
        else:
            self._scale_by(len(specs), group)
        deadline = time.monotonic() + TASK_START_TIMEOUT_S
        while time.monotonic() < deadline:
            new = [r for rid, r in self.list().items() if rid not in before and r.port]
            if len(new) >= len(specs):
                return new[: len(specs)]
            time.sleep(0.3)
        raise FleetError(f"Swarm did not start {len(specs)} task(s) within {TASK_START_TIMEOUT_S:.0f} s; "
                         f"see `docker service ps {self.service_name(group)} --no-trunc`")

    def stop(self, replica_id: str, timeout_s: float) -> None:
        """Stops this slot's task (SIGTERM: it drains) and then scales the service down by one.
        A task that exits 0 is not restarted (on-failure) and Swarm removes non-running slots
        first, so the slot that goes is this one. A task on another node cannot be stopped from
        here; Swarm then picks which task goes."""
        group = group_of(replica_id)
        service = self._service(group)
        replica = self.list().get(replica_id)
        if service is None:
            return
        if replica is not None:
            for container in self.client.containers.list(
                    filters={"label": f"com.docker.swarm.task.id={replica.labels['task_id']}"}):
                container.stop(timeout=max(1, int(timeout_s)))
        self._scale_by(-1, group)
        deadline = time.monotonic() + timeout_s + 10
        while replica_id in self.list() and time.monotonic() < deadline:
            time.sleep(0.2)

    def list(self) -> dict[str, Replica]:
        """One replica per slot of each group's service, from the slot's newest task. A slot
        whose newest task failed is still listed (not alive) while Swarm waits out the restart
        delay; only a slot that was scaled away (desired state "remove") is gone."""
        services = self.client.services.list(filters={"label": f"{LABEL_FLEET}={self.fleet_id}"})
        if not services:
            return {}
        node_addrs = {n.id: n.attrs.get("Status", {}).get("Addr", "127.0.0.1") for n in self.client.nodes.list()}
        replicas = {}
        for service in services:
            group = (service.attrs["Spec"].get("Labels") or {}).get(LABEL_GROUP, DEFAULT_GROUP)
            replicas.update(self._tasks_of(service, group, node_addrs))
        return dict(sorted(replicas.items(), key=lambda item: (len(item[0]), item[0])))

    def _tasks_of(self, service, group: str, node_addrs: dict[str, str]) -> dict[str, Replica]:
        # A slot's replica is its newest task that Swarm wants running; only a slot without one
        # shows its newest task. (A rollback may keep an older task and shut down a newer one:
        # the slot's replica is then the older, running one.)
        latest: dict[int, dict] = {}
        for task in service.tasks():
            slot = task.get("Slot")
            if slot is not None and (slot not in latest or _slot_order(task) > _slot_order(latest[slot])):
                latest[slot] = task
        replicas = {}
        for slot, task in sorted(latest.items()):
            if task.get("DesiredState") == "remove":
                continue
            status = task.get("Status", {})
            state = status.get("State", "")
            is_alive = state in ALIVE_STATES and task.get("DesiredState") in DESIRED_RUNNING
            ports = status.get("PortStatus", {}).get("Ports") or []
            port = next((p["PublishedPort"] for p in ports if p.get("TargetPort") == REPLICA_PORT_IN_CONTAINER), 0)
            if not port and is_alive:
                port = self._local_port(task["ID"])
            rid = replica_id(group, slot)
            # started_at_s: the task's creation, which stays put (its status timestamp moves at
            # each state change, e.g. when its health check first passes, and Fleet.refresh would
            # take that for a restart in place, which Swarm never does: it makes a new task)
            replicas[rid] = Replica(
                rid, node_addrs.get(task.get("NodeID"), "127.0.0.1"), port, task["ID"][:12],
                is_alive, parse_time(task.get("CreatedAt")), state,
                {"task_id": task["ID"], "node_id": task.get("NodeID", ""), "group": group})
        return replicas

    def _local_port(self, task_id: str) -> int:
        """The published port of a task's container on this node. Swarm reports a task's ports
        only once its health check passed; the container has them from its start, and fleetctl
        does its own /ready gating."""
        for container in self.client.containers.list(filters={"label": f"com.docker.swarm.task.id={task_id}"}):
            port = ipv4_host_port(container.ports.get(f"{REPLICA_PORT_IN_CONTAINER}/tcp") or [])
            if port:
                return port
        return 0

    def logs(self, replica_id: str, follow: bool = False, tail: int = 200) -> Iterator[str]:
        replica = self.list().get(replica_id)
        if replica is None:
            return
        yield from lines(self.engine_api.task_logs(replica.labels["task_id"], follow=follow, tail=tail))

    def needs_restart(self, replica: Replica | None) -> bool:
        return False  # Swarm replaces failed tasks of a slot itself

    # base.RollingUpdates (driven by fleetctl/backend_update.py) -----------------------------
    def update_model(self, spec: ReplicaSpec) -> None:
        """Swarm's own rolling update onto spec.model: the same service with the new --model and
        its mount; one task at a time, each new task started before its slot's old one stops,
        and the service rolled back by Swarm when a new task fails its health check."""
        import docker

        service = self._service(spec.group)
        if service is None:
            raise FleetError(f"the Swarm service {self.service_name(spec.group)} is gone; run `fleetctl up` first")
        current = service.attrs["Spec"]
        model_arg, mount = model_mount(spec.model)
        template = copy.deepcopy(current["TaskTemplate"])
        template["ContainerSpec"]["Args"] = serve_args(spec, model_arg, "0.0.0.0", REPLICA_PORT_IN_CONTAINER)
        template["ContainerSpec"]["Mounts"] = [dict(m) for m in (mount, *extra_mounts(self.config.mounts))]
        try:
            self.client.api.update_service(
                service.id, service.version, task_template=template, name=current["Name"],
                labels=current.get("Labels"), mode=current["Mode"],
                update_config=rolling_update(self.config.update_monitor_s),
                rollback_config=current.get("RollbackConfig"), endpoint_spec=current.get("EndpointSpec"))
        except docker.errors.APIError as exc:
            raise FleetError(f"Swarm refused the update of {self.service_name(spec.group)}: "
                             f"{exc.explanation or exc}") from None

    def update_status(self, group: str = DEFAULT_GROUP) -> dict:
        """Swarm's UpdateStatus of the service: State (updating, paused, completed,
        rollback_started, rollback_paused, rollback_completed), StartedAt, Message; {} before
        any update."""
        service = self._service(group)
        return (service.attrs.get("UpdateStatus") or {}) if service else {}

    def update_message(self, group: str = DEFAULT_GROUP) -> str:
        """Why the last update stopped or does not move on, in one line: Swarm's message, the
        newest failed task's error with the last line it printed, and the newest running task's
        Docker health check while it is not healthy (Swarm waits for "healthy")."""
        service = self._service(group)
        if service is None:
            return ""
        message = (service.attrs.get("UpdateStatus") or {}).get("Message", "")
        tasks = service.tasks()
        running = [t for t in tasks if t.get("DesiredState") == "running"
                   and t.get("Status", {}).get("ContainerStatus", {}).get("ContainerID")]
        if running:
            task = max(running, key=lambda t: t["CreatedAt"])
            health = health_report(self.client.api, task["Status"]["ContainerStatus"]["ContainerID"])
            message = "; ".join(part for part in (message, health and f"task {task['ID'][:12]}: {health}") if part)
        failed = [t for t in tasks if t.get("Status", {}).get("State") in ("failed", "rejected")]
        if not failed:
            return message
        task = max(failed, key=lambda t: t["CreatedAt"])
        try:
            printed = list(lines(self.engine_api.task_logs(task["ID"], tail=5)))
        except Exception:  # the logs are a courtesy here; the message must still come out
            printed = []
        last = next((line.strip() for line in reversed(printed) if line.strip()), "")
        return "; ".join(part for part in (message, f"task {task['ID'][:12]}: {task['Status'].get('Err', '')}",
                                           last[:200]) if part)

    def stopping_handles(self, group: str = DEFAULT_GROUP) -> set[str]:
        """Handles of the group's tasks that Swarm stops or has stopped (desired state past
        running): the old task of a slot in a start-first update once its successor is healthy,
        and the new one that a rollback replaces."""
        service = self._service(group)
        return {task["ID"][:12] for task in (service.tasks() if service else [])
                if task.get("DesiredState") not in DESIRED_RUNNING}

    def roll_back_model(self, group: str = DEFAULT_GROUP) -> None:
        """Asks Swarm to go back to the previous service spec (`docker service rollback`)."""
        service = self._service(group)
        if service is None or self.update_status(group).get("State", "").startswith("rollback"):
            return
        self.engine_api.roll_back_service(service.id, service.version, service.attrs["Spec"])

    def teardown(self) -> None:
        import docker

        services = self.client.services.list(filters={"label": f"{LABEL_FLEET}={self.fleet_id}"})
        for service in services:
            service.remove()
        deadline = time.monotonic() + self.config.drain_timeout_s + 30
        for service in services:
            label = f"com.docker.swarm.service.name={service.name}"
            while self.client.containers.list(filters={"label": label}) and time.monotonic() < deadline:
                time.sleep(0.3)
            for container in self.client.containers.list(all=True, filters={"label": label}):
                try:  # exited task containers; Swarm would prune them too, a little later
                    container.remove(force=True)
                except docker.errors.APIError:
                    pass

    def close(self) -> None:
        self.client.close()

    def service_name(self, group: str = DEFAULT_GROUP) -> str:
        return f"pagefleet-{self.fleet_id}" + ("" if group == DEFAULT_GROUP else f"-{group}")

    def _service(self, group: str = DEFAULT_GROUP):
        import docker

        try:
            return self.client.services.get(self.service_name(group))
        except docker.errors.NotFound:
            return None

    def _scale(self, service, num_replicas: int) -> None:
        """Changes only the number of replicas. (The SDK's Service.scale re-sends the spec with
        the engine's defaults filled in, which Swarm takes for a changed task template and
        answers with a rolling replacement of every task.)"""
        spec = service.attrs["Spec"]
        self.client.api.update_service(
            service.id, service.version, task_template=spec["TaskTemplate"], name=spec["Name"],
            labels=spec.get("Labels"), mode={"Replicated": {"Replicas": num_replicas}},
            update_config=spec.get("UpdateConfig"), rollback_config=spec.get("RollbackConfig"),
            endpoint_spec=spec.get("EndpointSpec"))

    def _scale_by(self, delta: int, group: str = DEFAULT_GROUP) -> None:
        """Read-modify-write of the replica count, serialised here and retried when another
        client updated the service in between (Swarm rejects an update of a stale version)."""
        import docker

        with self._scale_lock:
            for attempt in range(5):
                service = self._service(group)
                if service is None:
                    return
                try:
                    self._scale(service, max(0, self._num_replicas(service) + delta))
                    return
                except docker.errors.APIError as exc:
                    if "out of sequence" not in str(exc) or attempt == 4:
                        raise
                    time.sleep(0.1)

    @staticmethod
    def _num_replicas(service) -> int:
        return service.attrs["Spec"]["Mode"].get("Replicated", {}).get("Replicas", 0)

    def _create_service(self, spec: ReplicaSpec, num_replicas: int) -> None:
        import docker
        from docker.types import EndpointSpec, Healthcheck, Resources, RestartPolicy, ServiceMode, UpdateConfig

        model_arg, mount = model_mount(spec.model)
        command = self.config.replica_command
        python = command[0] if "python" in command[0].rsplit("/", 1)[-1] else "python3"
        constraints = list(self.config.constraints) or ([DEFAULT_GPU_CONSTRAINT] if self.config.gpus else [])
        ns = NS_PER_S
        try:
            self.client.services.create(
                self.config.image,
                command=command,
                args=serve_args(spec, model_arg, "0.0.0.0", REPLICA_PORT_IN_CONTAINER),
                name=self.service_name(spec.group),
                labels={LABEL_FLEET: self.fleet_id, LABEL_MODEL: spec.served_model_name, LABEL_GROUP: spec.group},
                container_labels={LABEL_FLEET: self.fleet_id},
                mode=ServiceMode("replicated", replicas=num_replicas),
                endpoint_spec=EndpointSpec(ports=[{"Protocol": "tcp", "TargetPort": REPLICA_PORT_IN_CONTAINER,
                                                   "PublishMode": "host"}]),
                mounts=[mount, *extra_mounts(self.config.mounts)],
                env=[f"{k}={v}" for k, v in {**replica_env(spec), "PAGEFLEET_PORT": str(REPLICA_PORT_IN_CONTAINER),
                                              **self.config.env}.items()],
                restart_policy=RestartPolicy(condition="on-failure", delay=1 * ns),
                update_config=rolling_update(self.config.update_monitor_s),
                rollback_config=UpdateConfig(parallelism=1, order="start-first"),
                healthcheck=Healthcheck(test=["CMD", python, "-I", "-S", "-c", READY_PROBE],
                                        interval=int(self.config.health_interval_s * ns), timeout=3 * ns,
                                        retries=3, start_period=int(self.config.ready_timeout_s * ns)),
                stop_grace_period=int(spec.drain_timeout_s * ns) + 5 * ns,
                stop_signal="SIGTERM",
                resources=Resources(generic_resources={GPU_RESOURCE: 1}) if self.config.gpus else None,
                constraints=constraints or None,
            )
        except docker.errors.APIError as exc:
            raise FleetError(f"Swarm refused the service {self.service_name(spec.group)}: "
                             f"{exc.explanation or exc}") from None
