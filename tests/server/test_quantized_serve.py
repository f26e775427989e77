"""`replica serve --quantization gguf --kv-cache-dtype fp8`: the bundled SmolLM2 served with its
weights packed and its keys and values in FP8 answers the test question, and /api/show says what
the weights take on the device and what the cache holds."""
import ollama
import pytest

from tests.server.conftest import ServerProcess

NAME = "smollm2-135m-instruct"


@pytest.mark.slow
def test_gguf_served_packed_with_an_fp8_cache_answers_and_reports_its_weight_bytes(tmp_path):
    server = ServerProcess(["--model", "smollm2", "--quantization", "gguf", "--max-model-len", "512",
                            "--num-kv-blocks", "64", "--dtype", "float32", "--kv-cache-dtype", "fp8"],
                           tmp_path / "smollm2.log")
    try:
        server.wait_ready()
        client = ollama.Client(host=server.url)
        reply = client.chat(model=NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
                            options={"temperature": 0, "num_predict": 30})
        assert "Paris" in reply.message.content
        info = client.show(NAME).modelinfo
        assert info["pagefleet.quantization"] == "gguf"
        assert info["pagefleet.kv_cache_dtype"] == "float8_e4m3fn"
        # 30 layers of Q4_1 projections at 5 bits a weight + the fp32 embedding and norms
        assert 0.15 * 2**30 < info["pagefleet.weights_device_bytes"] < 0.2 * 2**30
    finally:
        server.stop()
