"""NGINX in the state directory: render lb/nginx.conf.j2, `nginx -t`, start or reload, stop.

`Nginx.apply(text)` is the only way a config reaches the running NGINX: the candidate is written
next to the live one and checked with `nginx -t`; only a config that passes replaces nginx.conf
and is loaded (start, or SIGHUP and wait for the new workers). A config that fails is never
applied, and the running NGINX keeps serving with the previous one.

NGINX runs unprivileged-style: `nginx -p PREFIX -c PREFIX/nginx.conf -e stderr`, with its pid
file, logs and the five *_temp_path directories under PREFIX. Run as root, its workers drop to
`nobody` (the temp dirs are given to that user); run as anyone else, it simply runs as them.
"""
from __future__ import annotations

import functools
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2

from fleetctl import nginx_orphans, procs
from fleetctl.errors import FleetError, NginxConfigError, UnavailableError

TEMPLATE_ENV = "PAGEFLEET_NGINX_TEMPLATE"
DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "lb" / "nginx.conf.j2"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
RELOAD_TIMEOUT_S = 10.0
NJS_MODULE_ENV = "PAGEFLEET_NJS_MODULE"  # where another install keeps ngx_http_js_module.so
NJS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"  # Debian's libnginx-mod-http-js


@dataclass(frozen=True)
class Upstream:
    id: str  # replica id, e.g. "r1"
    address: str  # host:port NGINX connects to


@dataclass(frozen=True)
class ModelGroup:
    """One served model and the replicas in rotation for it: upstream pf_g<number>."""

    number: int  # 1, 2, ...: names the upstream and location; 1 is the default group
    served_model_name: str  # what clients put in `model`
    upstreams: tuple[Upstream, ...]


def site_context(config, fleet_id: str, upstreams: list[Upstream], tls, prefix: Path,
                 groups: list[ModelGroup] | None = None, njs_module: str | None = None,
                 njs_script: str | None = None) -> dict:
    """Everything lb/nginx.conf.j2 reads: the fleet's config, the replicas in rotation, TLS paths.
    `groups`: the model groups (default: one, the fleet's served model on `upstreams`). Several
    groups, or prefix routing, route in njs (lb/pagefleet.js): `njs_module` is where this host's
    NGINX finds ngx_http_js_module (default: $PAGEFLEET_NJS_MODULE, else Debian's path),
    `njs_script` the router (default: beside the template)."""
    njs_module = njs_module or os.environ.get(NJS_MODULE_ENV) or NJS_MODULE
    groups = groups or [ModelGroup(1, config.served_model_name, tuple(upstreams))]
    use_njs = len(groups) > 1 or config.routing == "prefix"
    if use_njs and Path(njs_module).is_absolute() and not Path(njs_module).exists():
        raise UnavailableError(f"{njs_module} is missing: routing by model or prefix needs NGINX's njs module; "
                               "install it (apt-get install -y libnginx-mod-http-js)")
    routes = {"models": {g.served_model_name: g.number for g in groups}, "default": groups[0].number,
              "num_groups": len(groups), "prefix_chars": config.prefix_key_chars}
    return {
        "fleet_id": fleet_id,
        "prefix": str(prefix),
        "worker_user": Nginx.worker_user(),
        "worker_processes": "auto",
        "upstreams": [u for g in groups for u in g.upstreams],
        "groups": groups,
        # /health, /ready, /metrics on the internal listener: the first group with replicas in rotation
        "internal_upstream": next((f"pf_g{g.number}" for g in groups if g.upstreams), "") if use_njs
        else "pf_replicas",
        "use_njs": use_njs,
        "njs_module": njs_module,
        "njs_script": njs_script or str(template_path().parent / "pagefleet.js"),
        # served names are [A-Za-z0-9._:/-]: the JSON holds no quote that would end the string
        "routes_json": json.dumps(routes, separators=(",", ":")),
        "prefix_max_conns": config.prefix_max_conns,
        "routing": config.routing,
        "max_fails": 1,
        "fail_timeout_s": 5,
        "keepalive": 64,
        "listen": config.listen,
        "https_port": config.https_port,
        "https_port_suffix": "" if config.https_port == 443 else f":{config.https_port}",
        "http_port": config.http_port,
        "internal_port": config.internal_port,
        "ollama_port": getattr(config, "ollama_port", 0),
        "tls": tls,
        "api_keys": config.api_keys,
        "rate_limit_per_min": max(1, round(config.rate_limit_per_s * 60)),
        "rate_limit_burst": config.rate_limit_burst,
        "client_max_body_size": config.client_max_body_size,
        "read_timeout_s": config.read_timeout_s,
    }


def template_path() -> Path:
    return Path(os.environ.get(TEMPLATE_ENV) or DEFAULT_TEMPLATE)


def render(context: dict, template: Path | None = None) -> str:
    """Fills the template; a template that does not render raises NginxConfigError."""
    path = template or template_path()
    if not path.is_file():
        raise NginxConfigError(f"NGINX template {path} not found; restore lb/nginx.conf.j2 or unset ${TEMPLATE_ENV}")
    try:
        stat = path.stat()
        return _compiled(str(path), stat.st_mtime_ns, stat.st_size).render(**context)
    except jinja2.TemplateError as exc:
        line = getattr(exc, "lineno", None)
        where = f"{path}:{line}" if line else str(path)
        raise NginxConfigError(f"template {where} does not render ({exc}); fix the template") from exc


@functools.lru_cache(maxsize=8)
def _compiled(path: str, mtime_ns: int, size: int) -> jinja2.Template:
    """The template compiled once per version of its file (a render happens on every commit;
    compiling is what costs), and again as soon as the file changes."""
    folder, name = os.path.split(path)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(folder), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    return env.get_template(name)


class Nginx:
    def __init__(self, prefix: Path, binary: str | None = None):
        self.prefix = Path(prefix)
        self.conf = self.prefix / "nginx.conf"
        self.candidate = self.prefix / "nginx.conf.candidate"
        self.pid_file = self.prefix / "nginx.pid"
        self.error_log = self.prefix / "logs" / "error.log"
        self.access_log = self.prefix / "logs" / "access.log"
        self.binary = binary or shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")

    @staticmethod
    def worker_user() -> str | None:
        """`user` directive: only a root master switches users; workers then run as nobody."""
        if os.geteuid() != 0:
            return None
        nobody = pwd.getpwnam("nobody")
        return f"nobody {grp.getgrgid(nobody.pw_gid).gr_name}"

    def prepare(self) -> None:
        (self.prefix / "logs").mkdir(parents=True, exist_ok=True)
        for name in TEMP_DIRS:
            path = self.prefix / "tmp" / name
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o700)
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.chown(path, nobody.pw_uid, nobody.pw_gid)

    def check(self, text: str) -> None:
        """`nginx -t` on `text` as a candidate file; raises NginxConfigError with NGINX's reason."""
        self.require_binary()
        self.prepare()
        self.candidate.write_text(text)
        os.chmod(self.candidate, 0o600)
        result = self._run("-t", "-c", str(self.candidate))
        if result.returncode != 0:
            reason = _first_error(result.stderr)
            raise NginxConfigError(f"nginx -t rejected the new config: {reason}; "
                                   "the running NGINX keeps the previous one; fix the template or the options")

    def apply(self, text: str) -> str:
        """Check, then start or reload. Returns "started", "reloaded" or "unchanged"."""
        running = self.pid()
        if running and self.conf.exists() and self.conf.read_text() == text:
            return "unchanged"
        self.check(text)
        os.replace(self.candidate, self.conf)
        if running:
            self._reload(running)
            return "reloaded"
        self.start()
        return "started"

    def start(self) -> None:
        self.end_orphans()  # workers of a killed master would hold the ports
        result = self._run("-c", str(self.conf))
        if result.returncode != 0:
            reason = _first_error(result.stderr)
            hint = "stop what uses the port or pick others with --port/--http-port/--internal-port" \
                if "in use" in reason else "see " + str(self.error_log)
            raise FleetError(f"NGINX did not start: {reason}; {hint}")
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while not self.pid() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.pid():
            raise FleetError(f"NGINX did not start; see {self.error_log}")

    def _reload(self, master_pid: int) -> None:
        """SIGHUP, then wait until new workers run and every old one stopped accepting
        connections (its title turns to "worker process is shutting down"; it finishes its
        requests in the background). Afterwards every new connection gets the new config."""
        old_workers = set(procs.children(master_pid))
        log_size = self.error_log.stat().st_size if self.error_log.exists() else 0
        os.kill(master_pid, signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            workers = set(procs.children(master_pid))
            if workers - old_workers and all(_is_shutting_down(pid) for pid in workers & old_workers):
                return
            failure = _new_emerg(self.error_log, log_size)
            if failure:
                raise FleetError(f"NGINX refused the reload: {failure}; it keeps serving the previous config")
            time.sleep(0.02)
        raise FleetError(f"NGINX did not reload within {RELOAD_TIMEOUT_S:.0f} s; see {self.error_log}")

    def pid(self) -> int | None:
        """The master's pid while it runs, else None (a stale pid file does not count)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if b"nginx" in procs.cmdline(pid) and procs.is_alive(pid) else None

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Graceful stop (SIGQUIT: finish requests), SIGTERM after timeout_s. True if it was running."""
        pid = self.pid()
        if not pid:
            return bool(self.end_orphans())
        for sig, wait_s in ((signal.SIGQUIT, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while procs.is_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not procs.is_alive(pid):
                break
        self.pid_file.unlink(missing_ok=True)
        self.end_orphans()
        return True

    def end_orphans(self) -> list[int]:
        """Ends workers left on this config's ports by a master that died (fleetctl/nginx_orphans.py)."""
        try:
            ports = nginx_orphans.config_ports(self.conf.read_text())
        except OSError:
            return []
        return nginx_orphans.end_orphan_workers(ports)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, "-p", str(self.prefix), "-e", "stderr", *args],
                              capture_output=True, text=True, timeout=60)

    def require_binary(self) -> None:
        if not self.binary:
            raise UnavailableError("nginx is not installed; install it (apt-get install -y nginx) or put it on PATH")


def _first_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "[emerg]" in line or "[alert]" in line or "[crit]" in line]
    line = (lines or [line for line in stderr.splitlines() if line.strip()] or ["unknown error"])[0]
    return line.split("] ", 1)[-1].strip() if "] " in line else line.strip()


def _new_emerg(error_log: Path, offset: int) -> str | None:
    try:
        with open(error_log) as log:
            log.seek(offset)
            for line in log:
                if "[emerg]" in line:
                    return _first_error(line)
    except OSError:
        pass
    return None


def _is_shutting_down(pid: int) -> bool:
    """An old worker after a reload: it accepts no new connection (its title says so) or is gone."""
    title = procs.cmdline(pid)
    return not title or b"shutting down" in title

