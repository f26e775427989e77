"""Pure pieces of the server, without a process: auth, error messages, settings, the document."""
import pytest
from pydantic import ValidationError

from replica.server.auth import is_authorized
from replica.server.config import ServerConfig
from replica.server.errors import from_validation_error
from replica.server.model_info import _human_count
from replica.server.openapi import build_openapi
from replica.server.routes import ROUTES
from replica.server.protocol import ChatCompletionRequest, CompletionRequest


def test_api_keys_match_exactly():
    keys = ("alpha", "beta")
    assert is_authorized("beta", keys)
    assert not is_authorized("bet", keys) and not is_authorized("betaa", keys)
    assert not is_authorized(None, keys) and not is_authorized("", keys)
    assert not is_authorized("\udcff", keys)              # undecodable header bytes


def _error(model, raw: bytes):
    with pytest.raises(ValidationError) as err:
        model.model_validate_json(raw)
    return from_validation_error(err.value)


def test_validation_errors_name_the_field_not_the_input():
    err = _error(CompletionRequest, b'{"prompt": "secret", "temperature": 7}')
    assert err.status == 400 and err.param == "temperature"
    assert err.message == "temperature: Input should be less than or equal to 2"
    err = _error(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": 5}]}')
    assert err.param == "messages[0].content"
    err = _error(CompletionRequest, b'{"prompt": "x", "secret_field": 1}')
    assert err.param == "secret_field" and "unknown field" in err.message
    err = _error(CompletionRequest, b'{"prompt": "secret", ')
    assert "JSON" in err.message and "secret" not in err.message


def test_server_config_is_validated():
    with pytest.raises(ValueError, match="max_n"):
        ServerConfig(max_n=0)
    with pytest.raises(ValueError, match="drain_timeout"):
        ServerConfig(drain_timeout_s=-1)
    assert ServerConfig(api_keys=("", "k")).api_keys == ("k",)


def test_document_security_follows_the_keys():
    assert "securitySchemes" not in build_openapi(ServerConfig(), "m")["components"]
    doc = build_openapi(ServerConfig(api_keys=("k",)), "m")
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert doc["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert len({(r.method, r.path) for r in ROUTES}) == len(ROUTES)


def test_parameter_sizes_read_like_ollama():
    assert [_human_count(n) for n in (134_515_008, 1_700_000_000, 7_241_000_000)] == \
        ["135M", "1.7B", "7.2B"]


def test_serve_port_defaults_to_pagefleet_port_as_the_image_healthcheck_reads_it(monkeypatch):
    from replica.server.cli import _parser

    monkeypatch.setenv("PAGEFLEET_PORT", "8123")
    assert _parser().parse_args([]).port == 8123
    assert _parser().parse_args(["--port", "9000"]).port == 9000
    monkeypatch.delenv("PAGEFLEET_PORT")
    assert _parser().parse_args([]).port == 8000


def test_serve_exposes_the_engine_switches_a_fleet_group_may_set():
    from fleetctl.groups import ENGINE_OPTIONS, ModelGroup
    from replica.server.cli import _configs, _parser

    group = ModelGroup("chat", "smollm2", engine={"enable_prefix_caching": False, "enforce_eager": True,
                                                  "max_num_seqs": 8, "kernel_backend": "torch",
                                                  "cuda_graph_max_tokens": 512})
    args = _parser().parse_args(group.engine_args())
    _, engine = _configs(args)
    assert engine.enable_prefix_caching is False and engine.enforce_eager is True
    assert engine.cuda_graph_max_tokens == 512
    assert engine.max_num_seqs == 8 and engine.kernel_backend == "torch"
    known = {a.dest for a in _parser()._actions}
    assert set(ENGINE_OPTIONS) <= known, "every group setting is a replica serve option"
