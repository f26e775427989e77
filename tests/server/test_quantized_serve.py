"""`replica serve --quantization gguf`: the bundled SmolLM2 served with its weights packed
answers the test question, and /api/show says what the weights take on the device."""
import ollama
import pytest

from tests.server.conftest import ServerProcess

NAME = "smollm2-135m-instruct"


@pytest.mark.slow
def test_gguf_served_packed_answers_and_reports_its_weight_bytes(tmp_path):
    server = ServerProcess(["--model", "smollm2", "--quantization", "gguf", "--max-model-len", "512",
                            "--num-kv-blocks", "64", "--dtype", "float32"], tmp_path / "smollm2.log")
    try:
        server.wait_ready()
        client = ollama.Client(host=server.url)
        reply = client.chat(model=NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
                            options={"temperature": 0, "num_predict": 30})
        assert "Paris" in reply.message.content
        info = client.show(NAME).modelinfo
        assert info["pagefleet.quantization"] == "gguf"
        # 30 layers of Q4_1 projections at 5 bits a weight + the fp32 embedding and norms
        assert 0.15 * 2**30 < info["pagefleet.weights_device_bytes"] < 0.2 * 2**30
    finally:
        server.stop()
