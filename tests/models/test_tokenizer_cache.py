"""A GGUF's tokenizer is built by transformers once, then loaded from replica's cache: the same
tokens, special tokens and chat template, and a cache that cannot be used costs only time.
The cache is keyed on the file's fields, not its path: copies share an entry, a file changed in
place never gets the old one."""
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from replica.models import tokenizer_cache
from replica.models.gguf_file import GGUFFile, metadata_digest
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


def write_small_gguf(path: Path, eos_token_id: int = 257, weight: float = 0.0) -> Path:
    """A GGUF with a byte-level BPE vocabulary of 261 tokens and one tensor (a few kB)."""
    import gguf

    tokens = [chr(0x100 + i) for i in range(256)] + ["<s>", "</s>", "ab", "cd", "abcd"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("small-vocab")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3, 1, 1, 1])
    writer.add_token_merges(["a b", "c d", "ab cd"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(eos_token_id)
    writer.add_tensor("token_embd.weight", np.full((len(tokens), 8), weight, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_metadata_digest_covers_every_field_and_no_weight(tmp_path):
    a = write_small_gguf(tmp_path / "a.gguf")
    other_weights = write_small_gguf(tmp_path / "w.gguf", weight=1.0)
    other_eos = write_small_gguf(tmp_path / "e.gguf", eos_token_id=256)
    assert a.read_bytes() != other_weights.read_bytes()
    assert metadata_digest(a) == metadata_digest(other_weights)
    assert metadata_digest(a) != metadata_digest(other_eos)
    assert GGUFFile(a).fields["tokenizer.ggml.eos_token_id"] == 257      # the files are what they say
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(a.read_bytes()[:2000])                          # inside the vocabulary
    with pytest.raises(ValueError, match="past the end of the file"):
        metadata_digest(truncated)


def test_copies_of_one_file_share_its_entry_wherever_they_are(built, tmp_path, monkeypatch):
    original = resolve_model_path("smollm2")
    copies = [tmp_path / "model.gguf", tmp_path / "blobs" / ("sha256-" + "0" * 64)]
    for copy in copies:
        copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(original, copy)
        assert tokenizer_cache.entry_for(copy) == tokenizer_cache.entry_for(original)
    refuse_gguf_builds(monkeypatch)
    assert Tokenizer.load(copies[1], "gguf", []).encode(TEXTS[0]) == built.encode(TEXTS[0])


def test_a_file_changed_in_place_is_never_served_the_old_tokenizer(built, tmp_path):
    path = write_small_gguf(tmp_path / "model.gguf", eos_token_id=257)
    tokenizer_cache.save(path, built.hf)           # what a build from the first file left
    assert tokenizer_cache.load(path) is not None
    times = path.stat()
    write_small_gguf(path, eos_token_id=256)       # same path, same size, the same times set back
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (times.st_size, times.st_mtime_ns)
    assert tokenizer_cache.load(path) is None


def test_a_damaged_entry_is_ignored_with_a_warning(built, tmp_path, caplog):
    path = write_small_gguf(tmp_path / "model.gguf")
    tokenizer_cache.save(path, built.hf)
    assert tokenizer_cache.load(path) is not None
    (tokenizer_cache.entry_for(path) / "tokenizer.json").write_text("{ not json")
    with caplog.at_level(logging.WARNING):
        assert tokenizer_cache.load(path) is None
    assert "the cached tokenizer of model.gguf is unreadable" in caplog.text
    tokenizer_cache.save(path, built.hf)             # a rebuilt one replaces it
    assert tokenizer_cache.load(path).encode(TEXTS[0]) == built.encode(TEXTS[0])


def test_a_file_whose_fields_cannot_be_read_has_no_entry(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 40)
    assert tokenizer_cache.load(broken) is None     # the build then says what is wrong


def test_a_cache_that_cannot_be_written_is_skipped(built, tmp_path, monkeypatch, caplog):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("PAGEFLEET_CACHE_DIR", str(not_a_folder))
    with caplog.at_level(logging.INFO):
        tokenizer_cache.save(resolve_model_path("smollm2"), built.hf)
    assert "not cached" in caplog.text
    assert tokenizer_cache.load(resolve_model_path("smollm2")) is None
