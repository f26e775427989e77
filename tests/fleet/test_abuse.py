"""Abuse through the public port, against the real NGINX and a real replica (127.0.0.1 only):
slowloris and slow readers are cut off without holding the replica, while real clients keep
100% success; oversize and maximum-length prompts get 4xx and the replica lives on; no server
version in any header; TLS 1.0 refused (1.1, HSTS and the internal routes: test_nginx.py)."""
import re
import socket
import ssl
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.fleet.client_loops import ClientLoops
from tests.fleet.conftest import SERVED_NAME
from tests.fleet.front import API_KEY

HEADER_TIMEOUT_S = 10  # client_header_timeout in lb/nginx.conf.j2
LEGIT = ("openai-no-retries", "ollama", "httpx")


def tls_socket(front, rcvbuf_bytes: int | None = None) -> ssl.SSLSocket:
    sock = socket.socket()
    if rcvbuf_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
    sock.connect(("127.0.0.1", front.https_port))
    ctx = ssl.create_default_context(cafile=str(front.tls.ca))
    return ctx.wrap_socket(sock, server_hostname="localhost")


def num_running(front) -> float:
    text = httpx.get(f"{front.internal_url}/replicas/r1/metrics", timeout=10).text
    return float(re.search(r"^pagefleet_num_requests_running\{[^}]*\} (\S+)", text, re.MULTILINE).group(1))


def test_slowloris_connections_are_cut_off_while_real_clients_keep_full_success(front):
    num_attackers = 40
    closed_after_s: list[float | None] = [None] * num_attackers

    def trickle(index: int) -> None:
        with tls_socket(front) as tls:
            tls.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            tls.settimeout(1.0)
            started = time.monotonic()
            while time.monotonic() - started < HEADER_TIMEOUT_S + 10:
                try:
                    tls.sendall(b"a")  # a header line that never ends, one byte a second
                    if tls.recv(100) == b"":
                        break
                except socket.timeout:
                    continue
                except OSError:
                    break
            else:
                return
            closed_after_s[index] = time.monotonic() - started

    with ClientLoops(front.url, front.tls.ca, SERVED_NAME, API_KEY, LEGIT) as loops:
        attackers = [threading.Thread(target=trickle, args=(i,)) for i in range(num_attackers)]
        for thread in attackers:
            thread.start()
        time.sleep(3)
        assert num_running(front) <= len(LEGIT)  # the attackers never reached the replica
        for thread in attackers:
            thread.join(HEADER_TIMEOUT_S + 15)
    assert all(t is not None and t < HEADER_TIMEOUT_S + 3 for t in closed_after_s), closed_after_s
    assert loops.num_failed() == 0 and all(t.num_ok >= 3 for t in loops.tallies.values()), loops.report()


def test_a_slow_reader_does_not_hold_the_replica(front):
    """A 200-token stream read one byte a second through a small receive buffer: the replica
    writes its tokens into NGINX's buffers and has no request running within seconds, while
    the reader has read a few bytes; real clients then succeed every time beside it."""
    body = (b'{"model":"%s","prompt":"hi","max_tokens":200,"ignore_eos":true,"stream":true}' % SERVED_NAME.encode())
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (API_KEY.encode(), len(body), body))
    with tls_socket(front, rcvbuf_bytes=2048) as slow:
        slow.sendall(request)
        num_read, started, was_running = 0, time.monotonic(), False
        while time.monotonic() - started < 20:
            num_read += len(slow.recv(1))
            running = num_running(front)
            was_running |= running > 0
            if running == 0 and num_read > 0:
                break
            time.sleep(1.0)
        assert num_running(front) == 0 and num_read < 25, (num_read, time.monotonic() - started, was_running)
        with ClientLoops(front.url, front.tls.ca, SERVED_NAME, API_KEY, LEGIT) as loops:
            for _ in range(3):
                num_read += len(slow.recv(1))
                time.sleep(1.0)
    assert loops.num_failed() == 0 and all(t.num_ok >= 3 for t in loops.tallies.values()), loops.report()


def test_fifty_concurrent_maximum_length_prompts_get_answers_or_4xx_and_the_replica_lives(front, replica):
    """Half fill the context exactly (256 prompt tokens: no room for output, 400), half leave
    room for their 16 tokens (200); nothing else, and the replica stays healthy."""
    def send(index: int) -> int:
        num_prompt = 256 if index % 2 else 240
        body = {"model": SERVED_NAME, "prompt": [7] * num_prompt, "max_tokens": 16, "ignore_eos": True}
        with httpx.Client(verify=ssl.create_default_context(cafile=str(front.tls.ca)), timeout=120) as client:
            return client.post(f"{front.url}/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {API_KEY}"}).status_code

    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(send, range(50)))
    assert set(codes) <= {200, 400, 413, 503} and codes.count(400) >= 20 and 200 in codes, codes
    assert replica.proc.poll() is None
    assert httpx.get(f"{replica.url}/health", timeout=10).status_code == 200
    assert num_running(front) == 0


def test_bodies_over_the_limit_get_a_json_413_and_no_header_names_a_version(front, replica):
    ctx = ssl.create_default_context(cafile=str(front.tls.ca))
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    over_nginx = b'{"prompt":"' + b"y" * 9_000_000 + b'"}'
    over_replica = b'{"prompt":"' + b"y" * 6_000_000 + b'"}'  # under NGINX's 8m, over the replica's 4 MiB

    def post(body: bytes) -> httpx.Response:
        with httpx.Client(verify=ctx, timeout=60) as client:
            return client.post(f"{front.url}/v1/completions", content=body, headers=headers)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(post, [over_nginx, over_nginx, over_replica, over_replica]))
    assert [a.status_code for a in answers] == [413] * 4
    assert "over the limit of 8m" in answers[0].json()["error"]["message"]
    assert "over the limit" in answers[2].json()["error"]["message"]
    assert replica.proc.poll() is None

    with httpx.Client(verify=ctx) as client:
        seen = [*answers, client.get(f"{front.url}/v1/models", headers=headers), client.get(f"{front.url}/nope"),
                httpx.get(f"http://127.0.0.1:{front.http_port}/v1/models")]
    for answer in seen:
        assert answer.headers.get("server") == "nginx", (answer.status_code, answer.headers)
        assert not re.search(r"nginx/\d|aiohttp|python", " ".join(answer.headers.values()), re.IGNORECASE)


def test_tls_1_0_is_refused(front):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(front.tls.ca)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
        with pytest.raises(ssl.SSLError):
            with socket.create_connection(("127.0.0.1", front.https_port), timeout=5) as sock:
                ctx.wrap_socket(sock, server_hostname="localhost")
