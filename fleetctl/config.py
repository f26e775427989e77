"""`FleetConfig`: what the operator asked for, validated once when `up` reads the options.

The config is saved in the state directory (`fleet.json`), so `scale`, `watch`, `status` and a
later `up` all work from the same desired state. Only `up` and `scale` change it.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from fleetctl.backends import BACKEND_CLASSES
from fleetctl.errors import ConfigError
from fleetctl.groups import DEFAULT_GROUP, ModelGroup, check_groups
from fleetctl.models import BUNDLED, default_served_name, is_store_name

BACKENDS = tuple(BACKEND_CLASSES)  # local, docker, swarm
ROUTINGS = ("least_conn", "session", "prefix")
DEFAULT_MODEL = "smollm2"
DEFAULT_IMAGE = "pagefleet-replica:latest"
# Unprivileged defaults, so that `fleetctl up` needs no root and clashes with no system web server.
DEFAULT_HTTPS_PORT = 8443
DEFAULT_HTTP_PORT = 8080
DEFAULT_INTERNAL_PORT = 8081
# API keys end up in the NGINX config (to rate-limit per key) and on replica command lines.
_API_KEY_RE = re.compile(r"^[A-Za-z0-9._~+/=-]{8,200}$")
_SIZE_RE = re.compile(r"^[0-9]+[kKmMgG]?$")
_SERVED_NAME_RE = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")


@dataclass
class FleetConfig:
    backend: str = "local"
    model: str = DEFAULT_MODEL
    served_model_name: str = ""
    num_replicas: int = 2
    gpus: list[str] = field(default_factory=list)  # e.g. ["0", "1"]; empty means CPU
    routing: str = "least_conn"  # least_conn | session (X-Session-ID) | prefix (the prompt's first characters)
    prefix_key_chars: int = 1024  # prefix routing: characters of the prompt that pick a replica (~4 per token)
    prefix_max_conns: int = 32  # prefix routing: in-flight requests a replica takes before its ring neighbour
    listen: str = "127.0.0.1"  # address of the public listeners; 0.0.0.0 to serve other hosts
    https_port: int = DEFAULT_HTTPS_PORT
    http_port: int = DEFAULT_HTTP_PORT
    internal_port: int = DEFAULT_INTERNAL_PORT
    ollama_port: int = 0  # 0: none; else plain HTTP on loopback for apps that hard-code Ollama's 11434
    tls_names: list[str] = field(default_factory=lambda: ["localhost", "127.0.0.1"])
    tls_cert: str = ""  # operator-provided certificate chain (PEM); empty: fleetctl's own CA
    tls_key: str = ""
    api_keys: list[str] = field(default_factory=list)
    rate_limit_per_s: float = 50.0  # per API key, or per client IP without one
    rate_limit_burst: int = 100
    client_max_body_size: str = "8m"
    read_timeout_s: int = 600  # a slow first token must not cut a stream
    device: str = ""  # cpu|cuda; empty: cuda when GPUs are given, else cpu
    max_model_len: int = 0  # 0: the replica's default
    num_kv_blocks: int = 0
    drain_timeout_s: float = 30.0
    ready_timeout_s: float = 600.0
    # Docker and Swarm only.
    image: str = DEFAULT_IMAGE
    replica_command: list[str] = field(default_factory=lambda: ["replica"])
    mounts: list[str] = field(default_factory=list)  # extra host paths bind-mounted read-only
    env: dict[str, str] = field(default_factory=dict)
    constraints: list[str] = field(default_factory=list)  # Swarm placement constraints
    # Swarm only, set on its service: how often Swarm's health check asks a task's /ready (a new
    # task counts as started at its first 200), and how long Swarm watches each updated task for
    # a failure before it calls the update completed.
    health_interval_s: float = 3.0
    update_monitor_s: float = 10.0
    docker_host: str = ""  # the engine the fleet lives on; empty: DOCKER_HOST or the default socket
    # Several models side by side (fleetctl/groups.py); empty: one group made of the fields above.
    groups: list[ModelGroup] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Paths are stored absolute: the watcher restarts replicas from wherever it runs.
        if self.model not in BUNDLED and not is_store_name(self.model):
            self.model = _absolute(self.model)
        self.tls_cert, self.tls_key = (_absolute(p) if p else "" for p in (self.tls_cert, self.tls_key))
        self.mounts = [_absolute(src) + (":" + dst if dst else "")
                       for src, _, dst in (m.partition(":") for m in self.mounts)]
        if not self.served_model_name:
            self.served_model_name = default_served_name(self.model)
        self.groups = [g if isinstance(g, ModelGroup) else ModelGroup.from_dict(g) for g in self.groups]
        self.validate()

    def validate(self) -> None:
        _check(self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        _check(self.routing in ROUTINGS, f"--routing must be one of {', '.join(ROUTINGS)}, not {self.routing!r}")
        _check(self.prefix_key_chars >= 1, f"--prefix-chars must be >= 1, not {self.prefix_key_chars}")
        _check(self.prefix_max_conns >= 1, f"--prefix-max-conns must be >= 1, not {self.prefix_max_conns}")
        _check(0 <= self.num_replicas <= 256, "--replicas must be between 0 and 256")
        for name in ("https_port", "http_port", "internal_port"):
            port = getattr(self, name)
            _check(1 <= port <= 65535, f"--{name.replace('_', '-')} must be a TCP port (1-65535), not {port}")
        ports = [self.https_port, self.http_port, self.internal_port]
        _check(len(set(ports)) == 3, f"HTTPS, HTTP and internal ports must differ, got {ports}")
        _check(self.ollama_port == 0 or (1 <= self.ollama_port <= 65535 and self.ollama_port not in ports),
               f"--ollama-port must be a TCP port other than the fleet's others, not {self.ollama_port}")
        _check(_is_ip(self.listen), f"--listen must be an IP address such as 127.0.0.1 or 0.0.0.0, not {self.listen!r}")
        _check(bool(self.tls_names), "--tls-name needs at least one host name or IP")
        for name in self.tls_names:
            _check(re.fullmatch(r"[A-Za-z0-9.*:-]+", name) is not None, f"--tls-name {name!r} is not a host name or IP")
        _check(bool(self.tls_cert) == bool(self.tls_key), "give both --tls-cert and --tls-key, or neither")
        for key in self.api_keys:
            _check(_API_KEY_RE.match(key) is not None,
                   "--api-key must be 8-200 characters of A-Z a-z 0-9 . _ ~ + / = -")
        _check(_SERVED_NAME_RE.match(self.served_model_name) is not None,
               f"--served-model-name {self.served_model_name!r} may use only A-Z a-z 0-9 . _ : / -")
        _check(self.rate_limit_per_s > 0 and self.rate_limit_burst >= 0, "--rate-limit must be > 0 and --burst >= 0")
        _check(_SIZE_RE.match(self.client_max_body_size) is not None,
               f"--max-body-size must look like 8m or 512k, not {self.client_max_body_size!r}")
        _check(self.device in ("", "cpu", "cuda"), f"--device must be cpu or cuda, not {self.device!r}")
        _check(self.read_timeout_s >= 1 and self.drain_timeout_s >= 0 and self.ready_timeout_s > 0,
               "timeouts must be positive")
        _check(self.health_interval_s >= 0.1 and self.update_monitor_s >= 0.1,
               "--health-interval and --update-monitor must be at least 0.1 seconds")
        _check(bool(self.replica_command), "--replica-command must not be empty")
        for gpu in self.gpus + [g for group in self.groups for g in group.gpus]:
            _check(re.fullmatch(r"[A-Za-z0-9-]+", gpu) is not None, f"--gpus entry {gpu!r} is not a GPU index or UUID")
        check_groups(self.groups)

    @property
    def replica_device(self) -> str:
        return self.device or ("cuda" if self.gpus else "cpu")

    def model_groups(self) -> list[ModelGroup]:
        """The fleet's model groups; a fleet without `groups` is one group, "default", of the
        fields above (so a single-model fleet behaves exactly as it always did)."""
        if self.groups:
            return self.groups
        engine = {k: v for k, v in (("max_model_len", self.max_model_len), ("num_kv_blocks", self.num_kv_blocks)) if v}
        return [ModelGroup(DEFAULT_GROUP, self.model, self.served_model_name, self.num_replicas, [], engine)]

    def group(self, name: str) -> ModelGroup:
        for group in self.model_groups():
            if group.name == name:
                return group
        names = ", ".join(g.name for g in self.model_groups())
        raise ConfigError(f"no model group {name!r} in this fleet; its groups: {names}")

    @property
    def client_api_key(self) -> str:
        """The key fleetctl itself sends to replicas (probes, the update's test generation, bench):
        the first --api-key, or "" when the fleet has none."""
        return self.api_keys[0] if self.api_keys else ""

    @property
    def public_url(self) -> str:
        """The fleet's HTTPS endpoint as clients write it."""
        host = self.tls_names[0] if self.listen in ("0.0.0.0", "::", "127.0.0.1") else self.listen
        port = "" if self.https_port == 443 else f":{self.https_port}"
        return f"https://{host}{port}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FleetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes) -> "FleetConfig":
        return dataclasses.replace(self, **changes)


def load_fleet_file(path: str | Path) -> dict:
    """A fleet file (YAML): FleetConfig's fields, `groups` among them, as `fleetctl render fleet`
    prints them. Returns the fields it sets; ConfigError for anything else."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"-f {path}: cannot read it as YAML ({exc})") from None
    known = {f.name for f in dataclasses.fields(FleetConfig)}
    _check(isinstance(data, dict), f"-f {path}: expected a mapping of fleet settings")
    unknown = sorted(set(data) - known)
    _check(not unknown, f"-f {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return data


def dump_fleet_file(config: FleetConfig) -> str:
    """The fleet's settings as a fleet file that `fleetctl up -f` applies."""
    import yaml

    data = config.to_dict()
    if data["groups"]:  # the groups name their own models; the single-model fields do not apply
        for name in ("model", "served_model_name", "num_replicas", "max_model_len", "num_kv_blocks"):
            data.pop(name)
    return "# fleetctl fleet file: `fleetctl up -f FILE` applies it\n" + \
        yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=120)


def parse_gpus(text: str | None) -> list[str]:
    """`--gpus 0,1` → ["0", "1"]; `--gpus all` → every GPU nvidia-smi lists; empty → []."""
    if not text:
        return []
    if text.strip() == "all":
        from fleetctl.gpus import list_gpus

        gpus = list_gpus()
        _check(bool(gpus), "--gpus all: nvidia-smi lists no GPU; leave --gpus out to run on CPU")
        return gpus
    return [g.strip() for g in text.split(",") if g.strip()]


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
