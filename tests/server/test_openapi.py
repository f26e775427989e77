"""/openapi.json describes every route, and schemathesis finds no 5xx in what it describes."""
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from replica.server.routes import ROUTES
from tests.server.conftest import API_KEY, TINY_NAME, ServerProcess, engine_idle, tiny_server_args


@pytest.fixture(scope="module")
def fuzz_server(tiny_model, tmp_path_factory):
    """A short context and n <= 2 bound the work of each generated request, so that the fuzzer
    can send many of them in a minute on two cores: 40 tokens hold a generated chat (35 tokens
    of template and message) and leave it 5 to generate; a longer prompt is refused (400). Most
    of the server's time goes to the ~180 chats of the coverage phase that fit, ~9 ms a generated
    token: a 48-token context (13 generated) made the run 83 s instead of 71 s."""
    args = tiny_server_args(tiny_model, "--api-key", API_KEY, "--max-n", "2")
    args[args.index("--max-model-len") + 1] = "40"
    server = ServerProcess(args, tmp_path_factory.mktemp("logs") / "fuzz.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_document_lists_every_route_with_its_bodies(http):
    doc = http.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == {(r.method, r.path) for r in ROUTES if r.in_openapi}
    assert {r.path for r in ROUTES if not r.in_openapi} == {
        "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"}, "only Ollama's store changes hide"
    for route in (r for r in ROUTES if r.in_openapi):
        op = doc["paths"][route.path][route.method]
        if route.request is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"]
        assert ("security" in op) and (op["security"] == [] if route.is_open else op["security"])


def test_every_documented_route_is_served(http):
    """No route in the document answers 404 or 405 (the router and ROUTES agree)."""
    for route in ROUTES:
        path = route.path.replace("{model}", TINY_NAME)           # the one name a path parameter takes
        r = http.request(route.method.upper(), path, json={} if route.request else None)
        assert r.status_code not in (404, 405), route.path


def test_schemathesis_finds_no_server_errors(fuzz_server, tmp_path):
    """Generated requests (valid and invalid) against every operation: never a 5xx, and the
    answers match the document (status codes, content types, response and SSE event schemas).
    Only positive_data_acceptance is left out: some valid-looking bodies are refused for rules
    a JSON schema cannot state (prompt + max_tokens over the context, token ids over the vocab).
    The coverage phase sends every operation its boundary and invalid cases (most of the run);
    the fuzzing phase then 25 random examples per operation, every operation included."""
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run",
           f"{fuzz_server.url}/openapi.json",
           "--checks", "all", "--exclude-checks", "positive_data_acceptance",
           "--header", f"Authorization: Bearer {API_KEY}",
           # One worker: hypothesis parses lambdas with `ast` while it generates, and on
           # Python 3.11 concurrent `ast.parse` calls can fail spuriously (CPython gh-106905).
           "--max-examples", "25", "--seed", "4", "--workers", "1", "--no-shrink",
           "--phases", "coverage,fuzzing", "--request-timeout", "60",
           "--report", "json", "--report-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "generated" in run.stdout
    # the server is fine afterwards, and every request left the engine
    r = httpx.post(fuzz_server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": TINY_NAME, "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, json.dumps(r.json())[:300]
    assert engine_idle(fuzz_server.url)["pagefleet_kv_cache_usage_perc"] == 0
