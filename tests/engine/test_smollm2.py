"""The bundled SmolLM2-135M-Instruct GGUF: same greedy answer as transformers on the same weights."""
import pytest
import torch

from replica.engine.llm import LLM
from replica.models.registry import resolve_model_path
from replica.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def smollm2():
    return LLM("smollm2", max_model_len=2048, dtype="float32")  # exact vs transformers fp32


def _transformers_parses_the_gguf_once(monkeypatch) -> None:
    """transformers' from_pretrained parses the GGUF with gguf-py twice (config, then weights;
    ~8 s each over SmolLM2's 49k-token vocabulary on 2 cores) and builds gguf-py's tensor-name map
    again for every tensor: both memoised for this test (the file does not change), half the
    reference's load time. The reference model is the same: its tokens are compared exactly."""
    import functools

    import gguf

    monkeypatch.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))


def test_greedy_chat_answer_equals_transformers_and_is_sensible(smollm2, monkeypatch):
    from transformers import AutoModelForCausalLM

    tok = smollm2.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    result = smollm2.generate([ids], SamplingParams(temperature=0.0, max_tokens=32))[0]
    answer = result.outputs[0]
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"

    gguf = resolve_model_path("smollm2")
    _transformers_parses_the_gguf_once(monkeypatch)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert answer.token_ids == ref
    assert answer.text == tok.decode(ref)


def test_batch_of_questions_each_answered(smollm2):
    tok = smollm2.tokenizer
    questions = {"What is 2 + 2?": "4", "What color is the sky on a clear day?": "blue"}
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    results = smollm2.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48))
    for (question, expected), result in zip(questions.items(), results):
        assert expected in result.outputs[0].text.lower(), question
    bm = smollm2.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_gguf_without_an_installed_gguf_package_gets_an_error_that_says_pip_install_gguf(monkeypatch, tmp_path):
    # A gguf-py folder on PYTHONPATH imports but has no distribution metadata; transformers then
    # fails with "Invalid version: 'N/A'" (seen on the GPU machine). The metadata lookup is patched
    # here because uninstalling the real package would break the other tests.
    import importlib.metadata

    from replica.models.tokenizer import Tokenizer

    real_version = importlib.metadata.version

    def version(name):
        if name == "gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setenv("PAGEFLEET_CACHE_DIR", str(tmp_path))       # the tokenizer not built yet
    with pytest.raises(ValueError, match="pip install gguf"):
        Tokenizer.load(resolve_model_path("smollm2"), "gguf", [2])
