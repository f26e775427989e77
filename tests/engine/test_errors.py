"""Errors a user can cause, each a ValueError that says what is wrong and names the culprit."""
import json
import shutil

import pytest

from replica.engine.llm import LLM
from replica.models.model_config import SUPPORTED_ARCHITECTURES
from replica.sampling_params import SamplingParams

from .conftest import TINY_ENGINE


def test_unsupported_architecture_names_the_supported_ones(token_model_path, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(token_model_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture") as err:
        LLM(str(folder), **TINY_ENGINE)
    assert "GPT2LMHeadModel" in str(err.value)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(err.value)


def test_folder_without_config_json(token_model_path, tmp_path):
    folder = tmp_path / "no-config"
    folder.mkdir()
    shutil.copy(token_model_path / "model.safetensors", folder)
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(folder), **TINY_ENGINE)


def test_folder_without_safetensors(token_model_path, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(token_model_path / "config.json", folder)
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        LLM(str(folder), **TINY_ENGINE)


def test_missing_model_path(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        LLM(str(tmp_path / "nowhere"), **TINY_ENGINE)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_the_file(token_model_path, tmp_path, damage):
    folder = tmp_path / damage
    shutil.copytree(token_model_path, folder)
    weights = folder / "model.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"\x00not a safetensors file" * 64)
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt"):
        LLM(str(folder), **TINY_ENGINE)


def test_kv_cache_too_small_for_one_full_length_sequence_prints_the_numbers(token_model_path):
    with pytest.raises(ValueError, match="KV cache too small") as err:
        LLM(str(token_model_path), block_size=16, num_kv_blocks=3, max_model_len=64)
    message = str(err.value)
    for number in ("3 blocks x 16 tokens = 48 tokens", "max_model_len 64", "needs 4 blocks"):
        assert number in message


def test_prompt_plus_max_tokens_over_the_context(token_llm):
    with pytest.raises(ValueError, match=r"^max_tokens: the prompt \(60 tokens\) plus max_tokens \(10\) is "
                                         r"over the context length of 64 tokens"):
        token_llm.generate([[5] * 60], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="prompt: 64 tokens leave no room to generate in this model's context of 64"):
        token_llm.generate([[5] * 64], SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="at least one token"):
        token_llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        token_llm.generate([[5, 512]], SamplingParams())
    # the last token of the context may be generated
    out = token_llm.generate([[5] * 60], SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("max_tokens", 0), ("min_tokens", -1), ("temperature", -0.1), ("top_p", 0.0),
    ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("logprobs", 21), ("logprobs", -1),
    ("stop", [""]),
])
def test_sampling_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: must"):
        SamplingParams(**{field: value})


def test_sampling_params_min_tokens_over_max_tokens():
    with pytest.raises(ValueError, match="^min_tokens: must be <= max_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_more_samples_than_max_num_seqs_is_rejected(token_model_path):
    llm = LLM(str(token_model_path), **(TINY_ENGINE | dict(max_num_seqs=2)))   # private: left dirty
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.engine.add_request("wide", [5, 6, 7], SamplingParams(n=3, max_tokens=3))


def test_dummy_load_format_needs_only_config_json(tmp_path):
    """--load-format dummy: random weights of the configured shape, no weight files."""
    import json

    from replica.engine.llm import LLM
    from replica.sampling_params import SamplingParams
    from tests.tiny_models import _config

    folder = tmp_path / "shape-only"
    folder.mkdir()
    config = _config("qwen2", 512).to_dict() | {"architectures": ["Qwen2ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(folder), num_kv_blocks=64, max_model_len=128)
    llm = LLM(str(folder), load_format="dummy", num_kv_blocks=64, max_model_len=128)
    [result] = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(result.outputs[0].token_ids) == 4
