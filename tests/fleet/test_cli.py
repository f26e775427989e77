"""The CLI's contract with scripts and people: one-line errors that say what to do, exit codes
that mean something (errors.py), --help with examples, and `render` without starting anything."""
import pytest
from click.testing import CliRunner

from fleetctl.cli import cli
from fleetctl.errors import EXIT_NO_FLEET, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.fleet.conftest import free_ports


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEFLEET_HOME", str(tmp_path / "home"))
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, list(args), catch_exceptions=False)

    yield invoke
    invoke("down")  # stops the NGINX a test may have started


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("command", [["status"], ["scale", "2"], ["logs", "r1"], ["watch"]])
def test_commands_on_no_fleet_say_how_to_start_one(run, command):
    result = run(*command)
    assert result.exit_code == EXIT_NO_FLEET
    assert "fleetctl up" in one_line(result.output)


def test_down_without_a_fleet_is_fine(run):
    result = run("down")
    assert result.exit_code == 0 and "no fleet" in result.output


@pytest.mark.parametrize("args, words", [
    (["--api-key", "short"], "--api-key must be"),
    (["--port", "9000", "--http-port", "9000"], "ports must differ"),
    (["--model", "/nonexistent/model"], "not found: give a checkpoint folder"),
    (["--listen", "localhost"], "--listen must be an IP"),
    (["--tls-cert", "cert.pem"], "give both --tls-cert and --tls-key"),
    (["--health-interval", "0"], "--health-interval and --update-monitor must be at least 0.1 seconds"),
])
def test_invalid_up_options_fail_before_anything_starts(run, tmp_path, args, words):
    result = run("up", "--backend", "local", *args)
    assert result.exit_code == EXIT_USAGE
    assert words in one_line(result.output)
    assert not (tmp_path / "home" / "fleet.json").exists()


def test_docker_backend_without_an_engine_says_so(run, tmp_path):
    result = run("up", "--backend", "docker", "--docker-host", f"unix://{tmp_path}/no.sock")
    assert result.exit_code == EXIT_UNAVAILABLE
    assert "no Docker engine answers" in one_line(result.output)
    assert "--backend local" in result.output


def test_replica_settings_cannot_change_under_a_running_fleet(run):
    https_port, http_port, internal_port = map(str, free_ports(3))
    ports = ["--port", https_port, "--http-port", http_port, "--internal-port", internal_port]
    assert run("up", "--backend", "local", "--replicas", "0", *ports).exit_code == 0
    # NGINX-only settings converge in place; the model would need new replicas.
    assert run("up", "--rate-limit", "5").exit_code == 0
    result = run("up", "--served-model-name", "other")
    assert result.exit_code == EXIT_USAGE
    assert "fleetctl down" in one_line(result.output)


def test_render_prints_the_nginx_config_without_starting_anything(run, tmp_path):
    result = run("render", "nginx", "--replicas", "3")
    assert result.exit_code == 0
    assert result.output.count("max_fails=") == 3 and "ssl_protocols TLSv1.2 TLSv1.3;" in result.output
    assert not (tmp_path / "home" / "fleet.json").exists()
    assert run("render", "grafana").exit_code == EXIT_USAGE


def test_render_prometheus_and_compose_follow_the_fleet(run):
    prometheus = run("render", "prometheus", "--replicas", "2").output
    assert "127.0.0.1:9101" in prometheus and "127.0.0.1:9102" in prometheus
    compose = run("render", "compose", "--replicas", "2").output
    assert "replica-0:" in compose and "replica-1:" in compose and "replica-2:" not in compose


@pytest.mark.parametrize("command", ["up", "status", "scale", "down", "logs", "render", "watch"])
def test_every_command_has_help_with_examples(run, command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Examples:" in result.output
