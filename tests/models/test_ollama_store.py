"""Ollama's store read in place: where it is, how names resolve, what manifests and layers say."""
import hashlib
import json

import pytest

from replica.models import ollama_store, ollama_template
from replica.models.loader import open_checkpoint
from replica.models.ollama_store import ModelName, find_store, open_model
from replica.models.registry import default_served_name, resolve_model_path
from tests.models.gguf_files import PRESETS, write_tiny_gguf
from tests.models.ollama_store_builder import (ASSISTANT_NAME, ASSISTANT_PARAMS, ASSISTANT_SYSTEM,
                                               CHATML_GO_TEMPLATE, add_model, build_test_store)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_test_store(tmp_path_factory.mktemp("ollama") / "models", tuple(PRESETS))


@pytest.fixture
def env(store, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    return {"OLLAMA_MODELS": str(store)}


@pytest.mark.parametrize("name, expected, display", [
    ("llama3.2", ("registry.ollama.ai", "library", "llama3.2", "latest"), "llama3.2:latest"),
    ("llama3.2:3b", ("registry.ollama.ai", "library", "llama3.2", "3b"), "llama3.2:3b"),
    ("library/llama3.2:3b", ("registry.ollama.ai", "library", "llama3.2", "3b"), "llama3.2:3b"),
    ("myorg/assistant:v1", ("registry.ollama.ai", "myorg", "assistant", "v1"), "myorg/assistant:v1"),
    ("hub.example:5000/team/m:q4", ("hub.example:5000", "team", "m", "q4"), "hub.example:5000/team/m:q4"),
    ("qwen3@sha256:abc", ("registry.ollama.ai", "library", "qwen3", "latest"), "qwen3:latest"),
])
def test_names_resolve_as_ollama_resolves_them(name, expected, display):
    parsed = ModelName.parse(name)
    assert (parsed.host, parsed.namespace, parsed.model, parsed.tag) == expected
    assert parsed.display == display


@pytest.mark.parametrize("name", ["", "a//b", "../x", "a/b/c/d", "model:", "./m"])
def test_names_ollama_would_refuse_are_refused(name):
    with pytest.raises(ValueError, match="not an Ollama model name"):
        ModelName.parse(name)


def test_same_model_ignores_default_host_namespace_tag_and_case():
    assert ollama_store.same_model("llama3.2", "registry.ollama.ai/library/llama3.2:latest")
    assert ollama_store.same_model("MyOrg/Assistant:v1", "myorg/assistant:v1")
    assert not ollama_store.same_model("llama3.2", "llama3.2:3b")


def test_store_is_found_where_ollama_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_store({}) is None
    (tmp_path / ".ollama" / "models" / "manifests").mkdir(parents=True)
    assert find_store({}) == tmp_path / ".ollama" / "models"
    (tmp_path / "elsewhere" / "manifests").mkdir(parents=True)
    assert find_store({"OLLAMA_MODELS": str(tmp_path / "elsewhere")}) == tmp_path / "elsewhere"
    assert ollama_store.store_candidates({})[-1].as_posix() == "/usr/share/ollama/.ollama/models"


def test_manifest_layers_digest_and_size_are_ollamas(store, env):
    model = open_model(ASSISTANT_NAME, env)
    manifest_path = store / "manifests/registry.ollama.ai/myorg/assistant/v1"
    manifest = json.loads(manifest_path.read_text())
    assert model.digest == hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    assert model.size_bytes == (sum(layer["size"] for layer in manifest["layers"])
                                + manifest["config"]["size"])
    assert model.system == ASSISTANT_SYSTEM and model.params == ASSISTANT_PARAMS
    assert model.template == CHATML_GO_TEMPLATE and model.license is None
    blob = model.model_path
    assert blob.parent == store / "blobs" and blob.name.startswith("sha256-")
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name.removeprefix("sha256-")
    smol = open_model("library/smollm2:135m", env)
    assert smol.model_path == blob                     # one blob, shared as Ollama shares it
    assert smol.license == "Apache 2.0" and smol.system is None


def test_store_names_resolve_to_the_blob_and_keep_their_name(store, env):
    path = resolve_model_path("smollm2:135m")
    assert path == open_model("smollm2:135m").model_path
    assert default_served_name("smollm2:135m") == "smollm2:135m"
    assert default_served_name("registry.ollama.ai/myorg/assistant:v1") == "myorg/assistant:v1"
    assert default_served_name("smollm2") == "smollm2-135m-instruct"     # the bundled name wins
    checkpoint = open_checkpoint("tiny:q4_k_m")
    assert checkpoint.format == "gguf" and checkpoint.config.hidden_size == 256


def test_missing_models_and_blobs_say_what_to_do(store, env, tmp_path):
    with pytest.raises(ValueError, match=r"not in the Ollama store .*ollama pull llama3.2:latest"):
        resolve_model_path("llama3.2")
    with pytest.raises(ValueError, match="no Ollama store was found"):
        open_model("llama3.2", {"OLLAMA_MODELS": str(tmp_path / "none")})
    broken = tmp_path / "broken"
    add_model(broken, "gone:1", write_tiny_gguf(tmp_path / "g.gguf", "Q8_0"))
    for blob in (broken / "blobs").iterdir():
        if blob.stat().st_size > 10_000:
            blob.unlink()
    with pytest.raises(ValueError, match="model blob .* is missing"):
        open_model("gone:1", {"OLLAMA_MODELS": str(broken)})
    (broken / "manifests/registry.ollama.ai/library/bad").mkdir(parents=True)
    (broken / "manifests/registry.ollama.ai/library/bad/1").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid Ollama manifest"):
        open_model("bad:1", {"OLLAMA_MODELS": str(broken)})


def test_list_models_lists_every_manifest(store):
    names = {m.name.display for m in ollama_store.list_models(store)}
    assert names == {"smollm2:135m", ASSISTANT_NAME} | {f"tiny:{q.lower()}" for q in PRESETS}


def test_a_blob_finds_its_model(store, env):
    model = open_model("tiny:q6_k", env)
    assert ollama_store.find_model_of_blob(model.model_path).name == model.name
    assert ollama_store.find_model_of_blob(resolve_model_path("smollm2")) is None


def test_go_templates_of_known_families_translate_and_others_are_refused():
    assert ollama_template.family_of(CHATML_GO_TEMPLATE) == "chatml"
    llama3 = "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>{{ .Content }}<|eot_id|>{{ end }}"
    assert ollama_template.family_of(llama3) == "llama3"
    assert ollama_template.family_of("[INST] {{ .Prompt }} [/INST]") == "mistral"
    with pytest.raises(ValueError, match="model odd:1: its GGUF has no chat template"):
        ollama_template.translate("### User: {{ .Prompt }}", "odd:1")


def test_a_gguf_without_chat_template_uses_its_ollama_template(tmp_path):
    from replica.models.tokenizer import Tokenizer

    source = resolve_model_path("smollm2")
    store = tmp_path / "models"
    gguf = write_tiny_gguf(tmp_path / "t.gguf", "Q4_K_M", tokenizer_from=source)
    add_model(store, "chatty:1", gguf, template=CHATML_GO_TEMPLATE)
    add_model(store, "odd:1", write_tiny_gguf(tmp_path / "u.gguf", "Q4_0", tokenizer_from=source),
              template="### User: {{ .Prompt }}")
    env = {"OLLAMA_MODELS": str(store)}
    tok = Tokenizer.load(open_model("chatty:1", env).model_path, "gguf", [])
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi"}])
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    odd = Tokenizer.load(open_model("odd:1", env).model_path, "gguf", [])
    assert not odd.has_chat_template
    with pytest.raises(ValueError, match="model odd:1: .*not one of the prompt formats"):
        odd.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_a_blob_path_as_fleetctl_passes_it_finds_its_manifest(store, env):
    blob = open_model(ASSISTANT_NAME, env).model_path            # shared with smollm2:135m
    assert ollama_store.lookup(str(blob), served_name=ASSISTANT_NAME).system == ASSISTANT_SYSTEM
    assert ollama_store.lookup(str(blob), served_name="smollm2:135m").system is None
    assert default_served_name(str(open_model("tiny:q8_0", env).model_path)) == "tiny:q8_0"
    assert ollama_store.lookup(str(resolve_model_path("smollm2"))) is None


def test_the_bundled_name_never_picks_up_a_store_model_of_that_name(tmp_path, monkeypatch):
    from replica.server.ollama_store_api import store_defaults

    store = tmp_path / "models"
    add_model(store, "smollm2", resolve_model_path("smollm2"), system="shadow")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert store_defaults("smollm2").model is None
    assert store_defaults("smollm2:latest").system == "shadow"
    assert resolve_model_path("smollm2").name.endswith(".gguf")     # the package's file
