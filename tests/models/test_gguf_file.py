"""replica.models.gguf_file reads what gguf-py's GGUFReader reads (the library is the
reference here), and says in one line what is wrong with a damaged file."""
import struct

import gguf
import numpy as np
import pytest

from replica.models.gguf_file import GGUFFile
from replica.models.registry import resolve_model_path
from tests.models.gguf_files import write_tiny_gguf


def assert_same_as_gguf_py(path):
    ours, reference = GGUFFile(path), gguf.GGUFReader(str(path))
    keys = [k for k in reference.fields if not k.startswith("GGUF.")]    # gguf-py's own header entries
    assert list(ours.fields) == keys
    for key in keys:
        assert ours.fields[key] == pytest.approx(reference.fields[key].contents()), key
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors):
        assert mine.tensor_type == theirs.tensor_type and mine.shape == tuple(int(d) for d in theirs.shape)
        their_bytes = np.asarray(theirs.data).view(np.uint8)
        assert mine.data.dtype == np.uint8 and mine.data.size == their_bytes.size == theirs.n_bytes
        assert np.array_equal(mine.data.reshape(-1), their_bytes.reshape(-1)), mine.name


def test_the_bundled_model_reads_as_gguf_py_reads_it_tokenizer_arrays_included():
    path = resolve_model_path("smollm2")
    assert_same_as_gguf_py(path)
    fields = GGUFFile(path).fields
    assert len(fields["tokenizer.ggml.tokens"]) == 49152 and fields["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert len(fields["tokenizer.ggml.merges"]) > 40000 and fields["general.architecture"] == "llama"


@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0", "F16", "BF16", "Q4_K_M", "Q5_K_M"])
def test_each_tensor_type_reads_as_gguf_py_reads_it(tmp_path, quant):
    assert_same_as_gguf_py(write_tiny_gguf(tmp_path / "m.gguf", quant))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf", "Q4_0").read_bytes()


def damaged(good: bytes, how: str) -> bytes:
    if how == "empty":
        return b""
    if how == "shorter than a header":
        return good[:20]
    if how == "not GGUF":
        return b"PK\x03\x04" + good[4:]
    if how == "version 1":
        return good[:4] + struct.pack("<I", 1) + good[8:]
    if how == "big-endian":
        return good[:4] + struct.pack(">I", 3) + good[8:]
    if how == "cut in a string":
        return good[:200]
    if how == "cut in a number":
        return good[:26]
    if how == "cut in the data":
        return good[:len(good) - 1000]
    raise AssertionError(how)


@pytest.mark.parametrize("how, says", [
    ("empty", "an empty file"), ("shorter than a header", "shorter than a GGUF header"),
    ("not GGUF", "no GGUF magic"), ("version 1", "GGUF version 1; versions 2 and 3 are read"),
    ("big-endian", "a big-endian GGUF"), ("cut in a string", "a string runs past the end of the file"),
    ("cut in a number", "it ends inside its header (truncated?)"),
    ("cut in the data", "ends past the end of the file (truncated?)")])
def test_a_damaged_file_is_a_one_line_value_error_naming_it(good, tmp_path, how, says):
    path = tmp_path / "model.gguf"
    path.write_bytes(damaged(good, how))
    with pytest.raises(ValueError) as err:
        GGUFFile(path)
    message = str(err.value)
    assert message.startswith("model.gguf is not a readable GGUF file (") and message.endswith("re-download it")
    assert says in message and "\n" not in message


def test_an_unknown_tensor_type_is_named(good, tmp_path):
    (tmp_path / "good.gguf").write_bytes(good)
    last = GGUFFile(tmp_path / "good.gguf").tensors[-1]
    data = bytearray(good)
    # the type id sits before the tensor's u64 offset, at the end of its entry in the index
    name_at = data.rindex(last.name.encode())
    type_at = name_at + len(last.name) + 4 + 8 * len(last.shape)
    assert struct.unpack_from("<I", data, type_at)[0] == last.tensor_type.value
    struct.pack_into("<I", data, type_at, 999)
    path = tmp_path / "odd.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"tensor {last.name} has type 999, which this gguf package does not know"):
        GGUFFile(path)
