"""`replica models` lists Ollama's store as `ollama list` does (names, ids, sizes)."""
import json

from replica.cli import main
from tests.models.ollama_store_builder import ASSISTANT_NAME, build_test_store


def test_replica_models_lists_the_store(tmp_path, monkeypatch, capsys):
    store = build_test_store(tmp_path / "models", ("Q4_K_M",))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert main(["models", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["store"] == str(store)
    rows = {r["name"]: r for r in report["models"]}
    assert set(rows) == {"smollm2:135m", ASSISTANT_NAME, "tiny:q4_k_m"}
    assert rows["tiny:q4_k_m"]["quantization"] == "Q4_K_M"
    assert rows[ASSISTANT_NAME]["id"] == rows[ASSISTANT_NAME]["digest"][:12]
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "myorg/assistant:v1" in table and rows["smollm2:135m"]["id"] in table


def test_replica_models_without_a_store_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nothing"))
    assert main(["models"]) == 1
    assert "no Ollama store found" in capsys.readouterr().err


def test_fleetctl_models_is_the_same_listing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fleetctl.cli import cli

    store = build_test_store(tmp_path / "models")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    result = CliRunner().invoke(cli, ["models", "--json"])
    assert result.exit_code == 0
    assert {r["name"] for r in json.loads(result.output)["models"]} == {"smollm2:135m", ASSISTANT_NAME}
