"""NGINX routes by the body (lb/pagefleet.js, njs): to the model group a request names, and within
a group by prompt prefix with a load bound. Real NGINX with the rendered config, over HTTPS, in
front of small stand-in replicas that answer who they are and what body they received (the
routing is NGINX's; what a replica does with the request is tested elsewhere)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from fleetctl.config import FleetConfig
from fleetctl.nginx import NJS_MODULE, ModelGroup, Nginx, Upstream, render, site_context
from fleetctl.tls import ensure_tls
from tests.fleet.conftest import free_ports

pytestmark = pytest.mark.skipif(not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists()
                                or not Path(NJS_MODULE).exists(),
                                reason="needs nginx and its njs module (apt-get install libnginx-mod-http-js)")


@dataclass
class StandIn:
    """A replica stand-in: answers every POST with its id and a digest of the body it got;
    GET /v1/models and /api/tags list its served name. A body with "hold": true waits until
    `release` is set (a long generation)."""

    id: str
    served_model_name: str
    release: threading.Event = field(default_factory=threading.Event)
    num_held: int = 0
    is_dying: bool = False    # reads each POST, then resets the connection unanswered (killed)
    is_draining: bool = False  # answers each POST 503 "draining", as a replica after SIGTERM
    num_posts: int = 0

    def start(self) -> "StandIn":
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status: int, data: dict) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                name = stand_in.served_model_name
                if self.path == "/v1/models":
                    self._answer(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
                elif self.path == "/api/tags":
                    self._answer(200, {"models": [{"name": name, "model": name}]})
                else:
                    self._answer(200, {"replica": stand_in.id, "path": self.path})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stand_in.num_posts += 1
                if stand_in.is_dying:  # RST, no byte of an answer: what a kill -9 leaves
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if stand_in.is_draining:
                    self.close_connection = True
                    self._answer(503, {"error": {"message": "this replica is draining: send the request to another "
                                                            "replica", "type": "server_error", "code": "draining"}})
                    return
                if b'"hold": true' in body:
                    stand_in.num_held += 1
                    stand_in.release.wait(30)
                self._answer(200, {"replica": stand_in.id, "path": self.path,
                                   "body_sha256": hashlib.sha256(body).hexdigest()})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def upstream(self) -> Upstream:
        return Upstream(self.id, f"127.0.0.1:{self.server.server_address[1]}")

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def front(tmp_path):
    """front(groups: {served name: [replica ids]}, routing=..., **config) → (https client, stand-ins)."""
    started: list[StandIn] = []
    # NGINX's workers run as nobody when the tests run as root: the prefix (with the temporary
    # files of large bodies) must be reachable for them, which pytest's tmp_path is not.
    prefix = Path(tempfile.mkdtemp(prefix="pagefleet-njs-"))
    os.chmod(prefix, 0o755)
    nginx = Nginx(prefix)
    clients = []

    def make(groups: dict[str, list[str]], routing: str = "least_conn", **config):
        https_port, http_port, internal_port = free_ports(3)
        fleet_config = FleetConfig(routing=routing, https_port=https_port, http_port=http_port,
                                   internal_port=internal_port, rate_limit_per_s=10000, rate_limit_burst=10000,
                                   **config)
        model_groups = []
        for number, (name, ids) in enumerate(groups.items(), start=1):
            stand_ins = [StandIn(rid, name).start() for rid in ids]
            started.extend(stand_ins)
            model_groups.append(ModelGroup(number, name, tuple(s.upstream for s in stand_ins)))
        tls = ensure_tls(tmp_path / "tls", ["127.0.0.1"])
        nginx.apply(render(site_context(fleet_config, "test", [], tls, nginx.prefix, groups=model_groups)))
        client = httpx.Client(base_url=f"https://127.0.0.1:{https_port}", timeout=30,
                              verify=ssl.create_default_context(cafile=str(tls.ca)))
        client.ca_file = tls.ca
        clients.append(client)
        return client, {s.id: s for s in started}

    yield make
    for client in clients:
        client.close()
    nginx.stop(timeout_s=5)
    if nginx.error_log.exists():  # kept for a failing test's reader
        shutil.copyfile(nginx.error_log, tmp_path / "nginx-error.log")
    shutil.rmtree(prefix, ignore_errors=True)
    for stand_in in started:
        stand_in.stop()


def post(client: httpx.Client, path: str, body: dict | str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


def test_each_request_goes_to_the_group_its_model_names_on_openai_and_ollama_routes(front):
    client, _ = front({"chat": ["r1", "r2"], "small": ["r3"]})
    for path in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"):
        for _ in range(4):
            assert post(client, path, {"model": "chat", "prompt": "hi"}).json()["replica"] in ("r1", "r2")
            assert post(client, path, {"model": "small", "prompt": "hi"}).json()["replica"] == "r3"
    assert post(client, "/api/chat", {"model": "small:latest", "messages": []}).json()["replica"] == "r3"
    assert client.get("/v1/models/small").json()["replica"] == "r3"


@pytest.mark.parametrize("body", [
    '{"messages": [{"role": "user", "content": "use \\"model\\": \\"chat\\" please"}], "model": "small"}',
    '{"messages":[{"role":"user","content":"{\\"model\\":\\"chat\\"}"}],\n  "model" :\t"small"}',
    '{"prompt": "model: chat", "stream": true, "model": "small", "user": "\\u00e9\\u4e2d"}',
    json.dumps({"messages": [{"role": "user", "content": "x" * 300_000 + '"model": "chat"'}], "model": "small"}),
], ids=["model-in-text-and-last", "escaped-json-in-content", "unicode-escapes", "300kB-body"])
def test_tricky_bodies_route_by_their_top_level_model_and_reach_the_replica_intact(front, body):
    client, _ = front({"chat": ["r1"], "small": ["r2"]})
    answer = post(client, "/v1/chat/completions", body).json()
    assert answer["replica"] == "r2"
    assert answer["body_sha256"] == hashlib.sha256(body.encode()).hexdigest()


@pytest.mark.parametrize("http_version", ["--http1.1", "--http2"])
def test_a_body_near_the_size_limit_stays_in_memory_and_routes_over_http1_and_http2(front, tmp_path, http_version):
    """NGINX writes a body larger than client_body_buffer_size to a temporary file that njs cannot
    read; the template keeps that buffer as large as client_max_body_size, so every accepted
    body is in memory. A 7 MB body (the limit is 8m) routes by its model; a 9 MB one gets 413."""
    client, _ = front({"chat": ["r1"], "small": ["r2"]})
    near = tmp_path / "near.json"
    near.write_text(json.dumps({"prompt": "y" * 7_000_000, "model": "small"}))
    over = tmp_path / "over.json"
    over.write_text(json.dumps({"prompt": "y" * 9_000_000, "model": "small"}))

    def curl(path: Path) -> tuple[int, str]:
        result = subprocess.run(["curl", "-sS", http_version, "--cacert", str(client.ca_file), "-o", "-",
                                 "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
                                 "--data-binary", f"@{path}", str(client.base_url.join("/v1/completions"))],
                                capture_output=True, text=True, timeout=60)
        text, _, code = result.stdout.rpartition("\n")
        assert code.isdigit() and code != "000", result.stderr
        return int(code), text

    status, text = curl(near)
    assert status == 200, text
    assert json.loads(text)["replica"] == "r2"
    assert json.loads(text)["body_sha256"] == hashlib.sha256(near.read_bytes()).hexdigest()
    assert curl(over)[0] == 413


def test_an_unknown_model_gets_404_in_the_routes_own_shape_listing_the_models(front):
    client, stand_ins = front({"chat": ["r1"], "small": ["r2"]})
    openai = post(client, "/v1/chat/completions", {"model": "gpt-9", "messages": []})
    assert openai.status_code == 404
    assert openai.json() == {"error": {"message": "The model `gpt-9` does not exist; this fleet serves: chat, small",
                                       "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    ollama = post(client, "/api/generate", {"model": "llama9", "prompt": "hi"})
    assert ollama.status_code == 404
    assert ollama.json() == {"error": 'model "llama9" not found; this fleet serves: chat, small'}


def test_a_body_without_a_model_goes_to_the_default_group_whose_replica_answers_it(front):
    client, _ = front({"chat": ["r1"], "small": ["r2"]})
    assert post(client, "/v1/completions", {"prompt": "hi"}).json()["replica"] == "r1"
    assert post(client, "/v1/completions", "not json {").json()["replica"] == "r1"


def test_model_lists_through_the_fleet_merge_every_group(front):
    client, _ = front({"chat": ["r1", "r2"], "small": ["r3"]})
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["chat", "small"]
    assert [m["name"] for m in client.get("/api/tags").json()["models"]] == ["chat", "small"]


def chat_body(system: str, question: str, **extra) -> dict:
    return {"model": "chat", "messages": [{"role": "system", "content": system},
                                          {"role": "user", "content": question}], **extra}


def test_prefix_routing_sends_requests_sharing_a_prefix_to_one_replica(front):
    client, _ = front({"chat": ["r1", "r2", "r3", "r4"]}, routing="prefix", prefix_key_chars=256)
    placements = {}
    for topic in range(16):
        system = f"You are assistant number {topic}. " + "Follow the house rules carefully. " * 10
        replicas = {post(client, "/v1/chat/completions", chat_body(system, f"question {i}")).json()["replica"]
                    for i in range(4)}
        assert len(replicas) == 1, (topic, replicas)  # unique suffixes, one replica per prefix
        placements[topic] = replicas.pop()
    assert len(set(placements.values())) >= 3  # 16 prefixes spread over the ring
    prompt = {"model": "chat", "prompt": "def fib(n):\n" * 40}
    assert len({post(client, "/v1/completions", {**prompt, "max_tokens": i}).json()["replica"]
                for i in range(4)}) == 1


def test_a_replica_at_its_load_bound_passes_a_hot_prefix_on_and_a_full_ring_spills(front):
    client, stand_ins = front({"chat": ["r1", "r2", "r3"]}, routing="prefix", prefix_max_conns=1)
    body = chat_body("One hot system prompt shared by everyone. " * 8, "go", hold=True)
    owner = post(client, "/v1/chat/completions", {**body, "hold": False}).json()["replica"]  # its ring home
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(post, client, "/v1/chat/completions", body) for _ in range(4)]
        deadline = time.monotonic() + 10
        while sum(s.num_held for s in stand_ins.values()) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        held = {rid: s.num_held for rid, s in stand_ins.items()}
        for stand_in in stand_ins.values():
            stand_in.release.set()
        answers = [f.result() for f in futures]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    # one request in flight per replica, then the fourth spilled instead of a 502: to the prefix's
    # own replica (its cache), since every replica was at its bound
    assert sorted(held.values()) == [1, 1, 2], held
    assert held[owner] == 2, (owner, held)


@pytest.mark.parametrize("body, same_as", [
    ({"model": "chat", "prompt": "x", "metadata": {"user": "bob"}, "user": "alice"}, "alice"),
    ({"model": "chat", "messages": [{"role": "user", "content": 'say "user": "bob"'}], "user": "alice"}, "alice"),
    ({"user": "alice", "model": "chat", "messages": [{"role": "user", "content": "hi", "user": "bob"}]}, "alice"),
], ids=["nested-user-field", "user-in-message-text", "user-first-then-nested"])
def test_session_routing_keys_on_the_top_level_user_only(front, body, same_as):
    client, _ = front({"chat": ["r1", "r2", "r3", "r4"], "small": ["r5"]}, routing="session")
    homes = {}
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        replicas = {post(client, "/v1/completions", {"model": "chat", "prompt": "x", "user": user}).json()["replica"]
                    for _ in range(3)}
        assert len(replicas) == 1, (user, replicas)  # a session stays on one replica
        homes[user] = replicas.pop()
    assert len(set(homes.values())) >= 2  # sessions spread over the group
    assert {post(client, "/v1/completions", body).json()["replica"] for _ in range(3)} == {homes[same_as]}
    header = {"X-Session-ID": "s-42"}
    assert len({client.post("/v1/completions", json={"model": "chat", "prompt": "x", "user": user},
                            headers=header).json()["replica"] for user in homes}) == 1  # the header wins


def test_a_request_a_dying_replica_took_unanswered_is_answered_by_another(front):
    client, stand_ins = front({"chat": ["r1", "r2"]})
    stand_ins["r1"].is_dying = True
    answers = [post(client, "/v1/completions", {"model": "chat", "prompt": f"p{i}"}) for i in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    assert {a.json()["replica"] for a in answers} == {"r2"}
    assert stand_ins["r1"].num_posts >= 1  # some went there first (least_conn takes turns)


def test_a_request_a_draining_replica_refuses_is_answered_by_another(front):
    """Swarm's rolling update stops an old task (SIGTERM: it drains, refusing new requests
    with 503) before fleetctl has moved that NGINX address to the task's successor."""
    client, stand_ins = front({"chat": ["r1", "r2"]})
    stand_ins["r1"].is_draining = True
    answers = [post(client, "/v1/completions", {"model": "chat", "prompt": f"p{i}"}) for i in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    assert {a.json()["replica"] for a in answers} == {"r2"}
    assert stand_ins["r1"].num_posts >= 1


def test_when_every_replica_refuses_the_client_gets_the_replicas_503_after_two_tries(front):
    client, stand_ins = front({"chat": ["r1", "r2", "r3"]})
    for stand_in in stand_ins.values():
        stand_in.is_draining = True
    refused = post(client, "/v1/completions", {"model": "chat", "prompt": "x"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert sum(s.num_posts for s in stand_ins.values()) == 2


def test_a_request_every_replica_drops_fails_after_two_tries_not_one_per_replica(front):
    client, stand_ins = front({"chat": ["r1", "r2", "r3"]})
    for stand_in in stand_ins.values():
        stand_in.is_dying = True  # a prompt that kills whichever replica runs it
    failed = post(client, "/v1/completions", {"model": "chat", "prompt": "x"})
    assert failed.status_code in (502, 503) and "error" in failed.json()
    assert sum(s.num_posts for s in stand_ins.values()) == 2
