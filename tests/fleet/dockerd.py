"""A private Docker engine for the tests: its own dockerd, data root, exec root, socket and
bridges, started from scratch and removed afterwards without a trace.

No registry is reachable, so the replica image is made locally: `docker import` of an almost
empty root filesystem (mount points and the usual /bin, /lib symlinks into /usr); the containers
bind-mount the host's /usr, its Python installation and the project (with its .venv) read-only,
and so run the real `replica serve` of this working tree.

The bridges get names of their own (not docker0 / docker_gwbridge), so that this engine cannot
collide with another Docker engine on the machine.
"""
from __future__ import annotations

import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE = "pagefleet-replica:dev"
# Bind-mounted into the replica containers: the host's Python and the project with its venv.
PYTHON_PREFIX = Path(os.path.realpath(sys.base_prefix))


def dev_mounts() -> list[str]:
    """/usr, the project, and the Python installation and venv where neither holds them. Each
    once: Debian's own Python is /usr itself, and Docker refuses a mount point given twice."""
    paths: list[str] = []
    for path in ("/usr", str(REPO_ROOT), str(PYTHON_PREFIX), str(Path(sys.prefix).resolve())):
        if not any(path == p or path.startswith(p + "/") for p in paths):
            paths.append(path)
    return paths


def replica_command() -> str:
    return f"{sys.executable} -m replica.cli"


class Dockerd:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pfd-", dir="/tmp"))  # short: socket paths are limited
        tag = secrets.token_hex(2)
        self.bridge = f"pfb{tag}"
        self.gw_bridge = f"pfg{tag}"
        octet = 64 + secrets.randbelow(60)
        self.bridge_cidr = f"10.{octet}.1.1/24"
        self.gw_subnet = f"10.{octet}.2.0/24"
        self.pool = f"10.{octet}.128.0/17"
        self.socket = self.root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "dockerd.log"

    # lifecycle ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> "Dockerd":
        bridge_args = []
        if shutil.which("ip"):  # without iproute2: Docker's default bridge names (docker0)
            _ip("link", "add", "name", self.bridge, "type", "bridge")
            # A fixed MAC, as Docker gives the bridges it makes itself. Without one, Linux gives
            # a bridge the lowest MAC among its ports, so it changes when a container's veth
            # leaves; the other containers keep the gateway's old MAC in their ARP cache, and
            # everything they send to the host (answers to NGINX through docker-proxy) is lost
            # until that entry is probed again, 20 s and more. A Swarm update under load saw
            # requests hang for that long (client timeouts, then 502s).
            _ip("link", "set", self.bridge, "address", _local_mac())
            _ip("addr", "add", self.bridge_cidr, "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            bridge_args = ["--bridge", self.bridge]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "--pidfile", str(self.root / "dockerd.pid"), "-H", self.host, *bridge_args,
             "--iptables=false", "--ip-masq=false", "--default-address-pool", f"base={self.pool},size=24"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited:\n{self.log_tail()}")
            if self.docker("version", check=False).returncode == 0:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer in {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            ids = self.docker("ps", "-aq", check=False).stdout.split()
            if self.docker("info", "--format", "{{.Swarm.LocalNodeState}}", check=False).stdout.strip() == "active":
                self.docker("swarm", "leave", "--force", check=False, timeout=60)
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=60)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()
        for mount in reversed(Path("/proc/mounts").read_text().splitlines()):
            target = mount.split()[1]
            if target.startswith(str(self.root)):
                subprocess.run(["umount", "-l", target], capture_output=True)
        if shutil.which("ip"):
            for name in (self.bridge, self.gw_bridge):
                _ip("link", "del", name, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def init_swarm(self) -> None:
        """A single-node swarm. docker_gwbridge is made first, with our own bridge name."""
        if shutil.which("ip"):
            self.docker("network", "create", "--subnet", self.gw_subnet,
                        "--opt", f"com.docker.network.bridge.name={self.gw_bridge}",
                        "--opt", "com.docker.network.bridge.enable_icc=false",
                        "--opt", "com.docker.network.bridge.enable_ip_masquerade=false", "docker_gwbridge")
        # The manager listens on a free port of its own, not Swarm's 2377: another swarm on the
        # machine (a developer's, another test's daemon) holds that one ("address already in use"
        # failed CI's runs here twice). One retry, then the daemon's words.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{sock.getsockname()[1]}"
        for attempt in range(2):
            result = self.docker("swarm", "init", "--listen-addr", address, "--advertise-addr", address,
                                 check=False, timeout=120)
            if result.returncode == 0:
                return
            if self.docker("info", "--format", "{{.Swarm.LocalNodeState}}", check=False).stdout.strip() == "active":
                return
            time.sleep(5)
        raise RuntimeError(f"docker swarm init failed: {result.stderr.strip()}\n{self.log_tail()}")

    def build_dev_image(self) -> str:
        """The replica image: an empty root filesystem; everything else is bind-mounted."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, mode in (("tmp", 0o1777), ("proc", 0o755), ("sys", 0o755), ("dev", 0o755),
                               ("etc", 0o755), ("usr", 0o755), ("root", 0o700), ("models", 0o755)):
                info = tarfile.TarInfo(name)
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)
            for link in ("bin", "lib", "lib64", "sbin"):
                info = tarfile.TarInfo(link)
                info.type, info.linkname = tarfile.SYMTYPE, f"usr/{link}"
                tar.addfile(info)
        subprocess.run(["docker", "-H", self.host, "import", "-", IMAGE], input=buf.getvalue(), check=True,
                       capture_output=True, timeout=60)
        return IMAGE

    # helpers -----------------------------------------------------------------------------
    def docker(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "-H", self.host, *args], capture_output=True, text=True, check=check,
                              timeout=timeout)

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], capture_output=True, check=check)


def _local_mac() -> str:
    """A random unicast, locally administered MAC (first octet x2, x6, xA or xE)."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def available() -> str:
    """Why a private dockerd cannot run here ("" when it can)."""
    for tool in ("dockerd", "docker"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "dockerd needs root"
    return ""


def docker_up_args(ctl, model, num_replicas: int, backend: str) -> list[str]:
    """`fleetctl up` arguments (ctl: conftest.FleetCtl) for replicas of this engine's image, with
    the host's Python and the project bind-mounted."""
    args = ctl.up_args(model, num_replicas, backend, "--image", IMAGE, "--replica-command", replica_command())
    for path in dev_mounts():
        args += ["--mount", path]
    for env in ("PYTHONPATH=" + str(REPO_ROOT), "OMP_NUM_THREADS=1", "HF_HUB_OFFLINE=1"):
        args += ["--env", env]
    return args


def fleet_containers(client, fleet_id: str, all_states: bool = True) -> list:
    return client.containers.list(all=all_states, filters={"label": f"pagefleet.fleet={fleet_id}"})
