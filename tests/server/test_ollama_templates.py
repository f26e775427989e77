"""A store model whose GGUF has no chat template: its Ollama template's family is used, and a
template of no known family gets a 400 that names the model and says why (tiny GGUFs with the
SmolLM2 tokenizer, Q4_K_M)."""
import httpx
import pytest

from replica.models.registry import resolve_model_path
from tests.models.gguf_files import write_tiny_gguf
from tests.models.ollama_store_builder import CHATML_GO_TEMPLATE, add_model
from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.slow          # two servers; tests/models covers the same logic in seconds


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ollama")
    smollm2 = resolve_model_path("smollm2")
    add_model(root / "models", "chatty:1", write_tiny_gguf(root / "a.gguf", "Q4_K_M", tokenizer_from=smollm2),
              template=CHATML_GO_TEMPLATE, file_type="Q4_K_M")
    add_model(root / "models", "odd:1", write_tiny_gguf(root / "b.gguf", "Q5_K_M", tokenizer_from=smollm2),
              template="### User: {{ .Prompt }}\n### Bot:", file_type="Q5_K_M")
    return root / "models"


@pytest.fixture(scope="module", params=["chatty:1", "odd:1"])
def server(request, store, tmp_path_factory):
    server = ServerProcess(["--model", request.param, "--max-model-len", "128", "--num-kv-blocks", "16"],
                           tmp_path_factory.mktemp("logs") / "templates.log",
                           env={"OLLAMA_MODELS": str(store)})
    try:
        yield request.param, server.wait_ready()
    finally:
        server.stop()


def test_chat_uses_the_translated_family_or_refuses_naming_the_model(server):
    name, srv = server
    chat = httpx.post(srv.url + "/api/chat", timeout=60, json={
        "model": name, "stream": False, "options": {"num_predict": 3},
        "messages": [{"role": "user", "content": "Hi"}]})
    raw = httpx.post(srv.url + "/api/generate", timeout=60, json={
        "model": name, "stream": False, "raw": True, "prompt": "Hi", "options": {"num_predict": 3}})
    assert raw.status_code == 200 and raw.json()["eval_count"] == 3    # raw prompts always work
    if name == "chatty:1":
        assert chat.status_code == 200 and chat.json()["eval_count"] == 3
        tokens = httpx.post(srv.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]})
        text = httpx.post(srv.url + "/detokenize", json={"tokens": tokens.json()["tokens"]}).json()["prompt"]
        assert text == "user\nHi\nassistant\n"           # ChatML, special tokens skipped
    else:
        assert chat.status_code == 400
        assert chat.json()["error"].startswith("messages: model odd:1: its GGUF has no chat template")
