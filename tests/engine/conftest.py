"""Shared fixtures of the engine tests: tiny checkpoints (built once per session), the SmolLM2
tokenizer, and an `llm_factory` whose engines are checked after every test: the KV pool must be
back to all-free and no request may be left behind.
"""
import json
import shutil

import pytest
import torch

from replica.engine.llm import LLM
from tests.tiny_models import make_tiny_model, smollm2_tokenizer_dir

# Small enough that every test runs in well under a second on 2 cores; block_size 4 makes even
# short prompts span several blocks.
# float32: these tests compare exact tokens (with transformers, across batch compositions); the
# engine's "auto" dtype is bf16 on CPUs with native bf16.
TINY_ENGINE = dict(block_size=4, num_kv_blocks=64, max_model_len=64, dtype="float32")


@pytest.fixture(scope="session")
def token_model_path(tmp_path_factory):
    """Tiny random Llama without a tokenizer (vocab 512, eos 2): prompts are token ids."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", with_tokenizer=False)


@pytest.fixture(scope="session")
def text_model_path(tmp_path_factory):
    """Tiny random Llama with the SmolLM2 tokenizer (vocab 49152): prompts can be strings."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-tok"), "llama", with_tokenizer=True)


def copy_checkpoint(src, dst, **config_changes):
    """A copy of a checkpoint folder with some config.json fields changed (same weights)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from replica.models.tokenizer import Tokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir())), [2])


@pytest.fixture(scope="session")
def _tracked_llms():
    return []


@pytest.fixture(scope="session")
def llm_factory(_tracked_llms):
    """`llm_factory(model_path, **engine_config)` → LLM, cached per (path, config) for the session."""
    cache = {}

    def make(model_path, **config) -> LLM:
        key = (str(model_path), tuple(sorted(config.items())))
        if key not in cache:
            cache[key] = LLM(str(model_path), **({"dtype": "float32"} | config))
            _tracked_llms.append(cache[key])
        return cache[key]

    return make


@pytest.fixture(scope="session")
def token_llm(llm_factory, token_model_path) -> LLM:
    return llm_factory(token_model_path, **TINY_ENGINE)


@pytest.fixture(scope="session")
def text_llm(llm_factory, text_model_path) -> LLM:
    return llm_factory(text_model_path, **TINY_ENGINE)


def assert_pool_free(engine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} blocks still held"
    assert all(block.ref_count == 0 for block in bm.blocks)
    assert not engine.requests, f"requests left behind: {sorted(engine.requests)}"
    assert not engine.scheduler.has_unfinished
    rows = engine.scheduler.rows
    assert rows.num_free == rows.capacity, f"{rows.capacity - rows.num_free} batch rows still held"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny models' matmuls are microseconds of work; with two OpenMP threads on a busy 2-core
    machine each waits milliseconds on a thread barrier instead (~100x slower). Restored after."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(autouse=True)
def _pool_is_free_after_each_test(request, _tracked_llms):
    yield
    for llm in _tracked_llms:
        assert_pool_free(llm.engine)
