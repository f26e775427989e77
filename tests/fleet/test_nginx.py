"""lb/nginx.conf.j2 under the real NGINX: every rendering passes `nginx -t`; TLS 1.2/1.3 only,
HTTP → HTTPS 308, HSTS, only the API routes in public, the internal listener on loopback, and a
config that fails `nginx -t` is never applied while the running NGINX keeps serving."""
import socket
import ssl
import warnings

import httpx
import pytest

from fleetctl.errors import NginxConfigError
from fleetctl.nginx import DEFAULT_TEMPLATE, Nginx
from tests.fleet.front import UPSTREAMS, make_config, rendered


@pytest.mark.parametrize("routing", ["least_conn", "session"])
@pytest.mark.parametrize("num_upstreams", [0, 1, 2])
def test_rendered_config_passes_nginx_t(tmp_path, routing, num_upstreams):
    text = rendered(tmp_path, make_config(routing=routing), UPSTREAMS[:num_upstreams])
    Nginx(tmp_path / "nginx").check(text)  # raises NginxConfigError with NGINX's reason
    assert ("hash $pf_session consistent;" in text) == (routing == "session" and num_upstreams > 0)


def test_template_carries_the_balancing_and_streaming_settings(tmp_path):
    text = rendered(tmp_path, make_config())
    for directive in ("least_conn;", "keepalive 64;", "max_fails=1 fail_timeout=5s", "proxy_buffering off;",
                      "proxy_read_timeout 600s;", "proxy_next_upstream error timeout http_503 non_idempotent;",
                      "ssl_protocols TLSv1.2 TLSv1.3;",
                      "limit_req_status 429;", "client_max_body_size 8m;", "stub_status;"):
        assert directive in text, directive
    for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert f"{temp}_temp_path {tmp_path}/nginx/tmp/" in text


def test_http_redirects_to_https_with_308(running):
    _, config = running
    response = httpx.get(f"http://127.0.0.1:{config.http_port}/v1/models?x=1")
    assert response.status_code == 308
    assert response.headers["location"] == f"https://127.0.0.1:{config.https_port}/v1/models?x=1"


def test_tls_1_1_is_refused_and_1_2_and_1_3_are_accepted(running, tmp_path):
    _, config = running

    def handshake(version: ssl.TLSVersion) -> str:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(tmp_path / "tls" / "ca.pem")
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # the client would offer TLS 1.1: the server must say no
        ctx.minimum_version = ctx.maximum_version = version
        with socket.create_connection(("127.0.0.1", config.https_port), timeout=5) as sock:
            with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                return tls.version()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):  # the server's alert
            handshake(ssl.TLSVersion.TLSv1_1)
    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


def test_public_listener_serves_only_the_api_and_sends_hsts(running, tmp_path):
    _, config = running
    with httpx.Client(base_url=f"https://127.0.0.1:{config.https_port}",
                      verify=ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem"))) as client:
        for path in ("/metrics", "/health", "/ready", "/stub_status", "/", "/replicas/r1/metrics"):
            response = client.get(path)
            assert response.status_code == 404, path
            assert response.headers["strict-transport-security"] == "max-age=63072000"
        # An API route reaches the upstream (which is down here: a JSON 503, not a 404).
        response = client.get("/v1/models")
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "server_error"


def test_internal_listener_is_on_loopback_with_stub_status(running, tmp_path):
    nginx, config = running
    assert f"listen 127.0.0.1:{config.internal_port};" in nginx.conf.read_text()
    response = httpx.get(f"http://127.0.0.1:{config.internal_port}/stub_status")
    assert response.status_code == 200 and "Active connections" in response.text


def test_broken_template_is_refused_and_the_running_nginx_keeps_serving(running, tmp_path):
    nginx, config = running
    pid, live_config = nginx.pid(), nginx.conf.read_text()
    broken = tmp_path / "broken.conf.j2"
    broken.write_text(DEFAULT_TEMPLATE.read_text().replace("proxy_buffering off;", "proxy_buffering sometimes;"))

    with pytest.raises(NginxConfigError, match="nginx -t rejected.*proxy_buffering"):
        nginx.apply(rendered(tmp_path, config, template=broken))
    not_jinja = tmp_path / "not-jinja.conf.j2"
    not_jinja.write_text("{% if %}")
    with pytest.raises(NginxConfigError, match="does not render"):
        rendered(tmp_path, config, template=not_jinja)

    assert nginx.pid() == pid
    assert nginx.conf.read_text() == live_config
    assert httpx.get(f"http://127.0.0.1:{config.http_port}/v1/models").status_code == 308


def test_reload_with_new_upstreams_keeps_the_master(running, tmp_path):
    nginx, config = running
    pid = nginx.pid()
    assert nginx.apply(rendered(tmp_path, config, UPSTREAMS[:1])) == "reloaded"
    assert nginx.pid() == pid
    assert "127.0.0.1:10" not in nginx.conf.read_text()
    assert nginx.apply(rendered(tmp_path, config, UPSTREAMS[:1])) == "unchanged"
