"""A GGUF's tokenizer is built by transformers once, then loaded from replica's cache: the same
tokens, special tokens and chat template, and a cache that cannot be used costs only time."""
import logging
import os
import shutil

import pytest

from replica.models import tokenizer_cache
from replica.models.registry import resolve_model_path
from replica.models.tokenizer import Tokenizer

TEXTS = ["Héllo, wörld! 你好", "def f(x):\n    return x ** 2  # 🤖", "  two  spaces\tand a tab",
         "<|im_start|>user\nhi<|im_end|>"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    saved = os.environ.get("PAGEFLEET_CACHE_DIR")
    os.environ["PAGEFLEET_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        del os.environ["PAGEFLEET_CACHE_DIR"]
    else:
        os.environ["PAGEFLEET_CACHE_DIR"] = saved


@pytest.fixture(scope="module")
def built(cache_dir):
    """The bundled model's tokenizer as transformers builds it from the GGUF (the cache empty)."""
    path = resolve_model_path("smollm2")
    assert not tokenizer_cache.entry_for(path).exists()
    return Tokenizer.load(path, "gguf", [])


def refuse_gguf_builds(monkeypatch):
    from transformers import AutoTokenizer
    plain = AutoTokenizer.from_pretrained.__func__

    def no_gguf(cls, *args, **kwargs):
        if kwargs.get("gguf_file"):
            raise AssertionError("built from the GGUF again")
        return plain(cls, *args, **kwargs)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(no_gguf))


def test_the_second_load_comes_from_the_cache_and_tokenizes_the_same(built, monkeypatch):
    path = resolve_model_path("smollm2")
    assert (tokenizer_cache.entry_for(path) / "tokenizer.json").is_file()
    refuse_gguf_builds(monkeypatch)
    cached = Tokenizer.load(path, "gguf", [])
    for text in TEXTS:
        for special in (True, False):
            ids = built.encode(text, add_special_tokens=special)
            assert cached.encode(text, add_special_tokens=special) == ids
            assert cached.decode(ids, skip_special_tokens=False) == built.decode(ids, skip_special_tokens=False)
    assert cached.apply_chat_template(CHAT) == built.apply_chat_template(CHAT)
    assert (cached.eos_token_ids, cached.bos_token, cached.vocab_size) == (
        built.eos_token_ids, built.bos_token, built.vocab_size)


def test_a_changed_file_gets_its_own_entry(built, tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copyfile(resolve_model_path("smollm2"), copy)
    before = tokenizer_cache.entry_for(copy)
    os.utime(copy, ns=(1, 1))
    assert tokenizer_cache.entry_for(copy) != before
    assert tokenizer_cache.entry_for(copy) != tokenizer_cache.entry_for(resolve_model_path("smollm2"))


def test_a_damaged_entry_is_ignored_with_a_warning(built, tmp_path, caplog):
    copy = tmp_path / "model.gguf"
    shutil.copyfile(resolve_model_path("smollm2"), copy)
    entry = tokenizer_cache.entry_for(copy)
    shutil.copytree(tokenizer_cache.entry_for(resolve_model_path("smollm2")), entry)
    assert tokenizer_cache.load(copy) is not None
    (entry / "tokenizer.json").write_text("{ not json")
    with caplog.at_level(logging.WARNING):
        assert tokenizer_cache.load(copy) is None
    assert "the cached tokenizer of model.gguf is unreadable" in caplog.text
    tokenizer_cache.save(copy, built.hf)             # a rebuilt one replaces it
    assert tokenizer_cache.load(copy).encode(TEXTS[0]) == built.encode(TEXTS[0])


def test_a_cache_that_cannot_be_written_is_skipped(built, tmp_path, monkeypatch, caplog):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("PAGEFLEET_CACHE_DIR", str(not_a_folder))
    with caplog.at_level(logging.INFO):
        tokenizer_cache.save(resolve_model_path("smollm2"), built.hf)
    assert "not cached" in caplog.text
    assert tokenizer_cache.load(resolve_model_path("smollm2")) is None
