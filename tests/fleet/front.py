"""One real replica of the tiny model behind NGINX rendered from the fleet's template, without
fleetctl: what the reload-race and abuse tests drive (fixtures `replica`, module-wide, and
`front`). 127.0.0.1 only."""
import pytest

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


@pytest.fixture(scope="module")
def replica(tiny_model, tmp_path_factory):
    server = ServerProcess(["--model", str(tiny_model), "--served-model-name", SERVED_NAME, "--api-key", API_KEY,
                            "--max-model-len", "256", "--num-kv-blocks", "64"],
                           tmp_path_factory.mktemp("front") / "replica.log", env={"OMP_NUM_THREADS": "1"})
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def front(tmp_path, replica):
    front = Front(tmp_path, replica)
    yield front
    front.nginx.stop(timeout_s=5)
