"""NGINX rendered from the fleet's template without fleetctl: `Front`, one real replica of the
tiny model behind it, which the reload-race and abuse tests drive (conftest's fixtures `replica`,
module-wide, and `front`), and `make_config` / `rendered` for the template tests. 127.0.0.1 only."""
from fleetctl.config import FleetConfig
from fleetctl.nginx import Nginx, Upstream, render, site_context
from fleetctl.tls import ensure_tls
from tests.fleet.conftest import SERVED_NAME, free_ports
from tests.server.conftest import ServerProcess

API_KEY = "front-test-key"


class Front:
    """One replica of the tiny model behind NGINX from the fleet's template; `reload()` applies
    a changed config (the rate limit moves by one), as every fleetctl change does."""

    def __init__(self, tmp_path, replica: ServerProcess) -> None:
        https_port, http_port, internal_port = free_ports(3)
        self.tls = ensure_tls(tmp_path / "tls", ["localhost", "127.0.0.1"])
        self.nginx = Nginx(tmp_path / "nginx")
        self.prefix = tmp_path / "nginx"
        self.upstreams = [Upstream("r1", f"127.0.0.1:{replica.port}")]
        self.config = dict(https_port=https_port, http_port=http_port, internal_port=internal_port,
                           api_keys=[API_KEY], served_model_name=SERVED_NAME, rate_limit_burst=100000)
        self.num_reloads = 0
        assert self.nginx.apply(self._text()) == "started"
        self.url = f"https://127.0.0.1:{https_port}"
        self.internal_url = f"http://127.0.0.1:{internal_port}"
        self.https_port, self.http_port = https_port, http_port

    def _text(self) -> str:
        config = FleetConfig(**self.config, rate_limit_per_s=10000 + self.num_reloads % 2)
        return render(site_context(config, "race", self.upstreams, self.tls, self.prefix))

    def reload(self) -> None:
        self.num_reloads += 1
        assert self.nginx.apply(self._text()) == "reloaded"


UPSTREAMS = [Upstream("r1", "127.0.0.1:9"), Upstream("r2", "127.0.0.1:10")]  # nothing listens there


def make_config(**overrides) -> FleetConfig:
    https_port, http_port, internal_port = free_ports(3)
    return FleetConfig(https_port=https_port, http_port=http_port, internal_port=internal_port,
                       api_keys=["test-key-abc"], **overrides)


def rendered(tmp_path, config: FleetConfig, upstreams=UPSTREAMS, template=None) -> str:
    tls = ensure_tls(tmp_path / "tls", ["localhost", "127.0.0.1"])
    return render(site_context(config, "test", upstreams, tls, tmp_path / "nginx"), template)
