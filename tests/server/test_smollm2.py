"""A few realistic checks with the bundled SmolLM2 (GGUF, chat template, real answers)."""
import signal

import ollama
import openai
import pytest

from tests.server.conftest import ServerProcess

NAME = "smollm2-135m-instruct"          # derived from --model smollm2
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    server = ServerProcess(["--model", "smollm2", "--max-model-len", "512", "--num-kv-blocks", "64"],
                           tmp_path_factory.mktemp("logs") / "smollm2.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_openai_chat_answers_the_question(smol):
    client = openai.OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=30,
                                         temperature=0)
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"          # the model ended its turn itself
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=30, temperature=0, stream=True))
    assert streamed == out.choices[0].message.content


def test_ollama_chat_and_model_details(smol):
    client = ollama.Client(host=smol.url)
    parts = list(client.chat(model=NAME, messages=QUESTION, stream=True,
                             options={"temperature": 0, "num_predict": 30}))
    assert "Paris" in "".join(p.message.content for p in parts)
    assert parts[-1].done_reason == "stop"
    details = client.show(NAME).details
    assert (details.format, details.family, details.quantization_level) == ("gguf", "llama", "Q4_1")
    assert details.parameter_size == "135M"
    assert [m.model for m in client.list().models] == [NAME]


def test_tokenize_round_trip(smol):
    import httpx

    text = "Héllo, wörld! 你好"
    ids = httpx.post(smol.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}
                     ).json()["tokens"]
    assert httpx.post(smol.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == text
    chat = httpx.post(smol.url + "/tokenize", json={"messages": QUESTION}).json()
    assert chat["count"] == len(chat["tokens"]) > len(ids) and chat["max_model_len"] == 512


def test_sigint_drains_and_exits_0(smol):
    smol.signal(signal.SIGINT)
    assert smol.proc.wait(30) == 0
