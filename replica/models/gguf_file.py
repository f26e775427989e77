"""A GGUF file's metadata and tensor index in one pass of `struct` over a memory map; each
tensor's data a numpy view of that map (nothing is read until it is used).

Why not gguf-py's `GGUFReader`: it makes a numpy view for every part of every field, so a
model's tokenizer arrays (SmolLM2: 49,152 tokens and 48,900 merges; Llama 3: 128,256 and
280,147) cost it 5.7 s on SmolLM2's 98 MB file, and a replica read the header three times
before it served. Here the same file takes well under a second. gguf-py still names the tensor types
and dequantises (`gguf.quants`), and transformers still builds the tokenizer from the file
(once: `replica.models.tokenizer_cache` keeps what it built).

Layout (little-endian; GGUF versions 2 and 3):

    magic "GGUF" | version u32 | num_tensors u64 | num_fields u64
    field  × num_fields:   key (string) | value type u32 | value
    tensor × num_tensors:  name (string) | num_dims u32 | dims u64 × num_dims (fastest first)
                           | type u32 | offset u64 (from the data section's start)
    padding to `general.alignment` (32 by default) | the data section

    string: length u64 | UTF-8 bytes;  array: element type u32 | count u64 | elements
"""
import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# value type → struct code of a scalar (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    tensor_type: "object"     # gguf.GGMLQuantizationType
    shape: tuple[int, ...]    # GGUF's order: the fastest-varying dimension first
    data: np.ndarray          # uint8 [*slower dims, bytes of a row]: a view of the file


class GGUFFile:
    """fields: {key: int | float | bool | str | list}; tensors: [TensorInfo] in file order."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = self.path.stat().st_size
                if size < 24:
                    raise _FormatError("shorter than a GGUF header" if size else "an empty file")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.fields: dict[str, object] = {}
            self.tensors: list[TensorInfo] = []
            self._read()
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as err:
            if isinstance(err, _FormatError):
                detail = str(err)
            elif isinstance(err, struct.error):
                detail = "it ends inside its header (truncated?)"
            else:
                detail = type(err).__name__
            raise ValueError(f"{self.path.name} is not a readable GGUF file ({detail}); re-download it") from None

    @property
    def tensor_names(self) -> set[str]:
        return {t.name for t in self.tensors}

    # ---- parsing ------------------------------------------------------------------------------
    def _read(self) -> None:
        buf = self._map
        if buf[:4] != MAGIC:
            raise _FormatError("no GGUF magic")
        version = struct.unpack_from("<I", buf, 4)[0]
        if version not in (2, 3):
            swapped = version & 0xFFFF == 0
            raise _FormatError("a big-endian GGUF" if swapped else f"GGUF version {version}; versions 2 and 3 are read")
        num_tensors, num_fields = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        for _ in range(num_fields):
            key, pos = self._string(pos)
            value_type = struct.unpack_from("<I", buf, pos)[0]
            self.fields[key], pos = self._value(value_type, pos + 4)
        infos = []
        for _ in range(num_tensors):
            name, pos = self._string(pos)
            num_dims = struct.unpack_from("<I", buf, pos)[0]
            if num_dims > 8:
                raise _FormatError(f"tensor {name} has {num_dims} dimensions")
            dims = struct.unpack_from(f"<{num_dims}Q", buf, pos + 4)
            type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * num_dims)
            pos += 4 + 8 * num_dims + 12
            infos.append((name, dims, type_id, offset))
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-pos // alignment) * alignment
        whole = np.frombuffer(buf, dtype=np.uint8)
        self.tensors = [self._tensor(whole, data_start, *info) for info in infos]

    def _tensor(self, whole: np.ndarray, data_start: int, name: str, dims: tuple[int, ...],
                type_id: int, offset: int) -> TensorInfo:
        import gguf

        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise _FormatError(f"tensor {name} has type {type_id}, which this gguf package does not know") from None
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if not dims or dims[0] % block_size:
            raise _FormatError(f"tensor {name}: rows of {dims[:1]} are not whole {qtype.name} blocks")
        row_bytes = dims[0] // block_size * type_size
        num_bytes = row_bytes * int(np.prod(dims[1:], dtype=np.int64))
        start = data_start + offset
        if start + num_bytes > whole.size:
            raise _FormatError(f"tensor {name} ends past the end of the file (truncated?)")
        data = whole[start:start + num_bytes].reshape(*reversed(dims[1:]), row_bytes)
        return TensorInfo(name, qtype, tuple(int(d) for d in dims), data)

    def _string(self, pos: int) -> tuple[str, int]:
        length = struct.unpack_from("<Q", self._map, pos)[0]
        end = pos + 8 + length
        if end > len(self._map):
            raise _FormatError("a string runs past the end of the file (truncated?)")
        return self._map[pos + 8:end].decode("utf-8", errors="replace"), end

    def _value(self, value_type: int, pos: int) -> tuple[object, int]:
        if value_type in _SCALARS:
            code = "<" + _SCALARS[value_type]
            return struct.unpack_from(code, self._map, pos)[0], pos + struct.calcsize(code)
        if value_type == _STRING:
            return self._string(pos)
        if value_type != _ARRAY:
            raise _FormatError(f"unknown value type {value_type}")
        item_type, count = struct.unpack_from("<IQ", self._map, pos)
        pos += 12
        if item_type in _SCALARS:           # numbers: one read of the whole array
            dtype = np.dtype("<" + _SCALARS[item_type])
            if pos + count * dtype.itemsize > len(self._map):
                raise _FormatError("an array runs past the end of the file (truncated?)")
            values = np.frombuffer(self._map, dtype=dtype, count=count, offset=pos)
            return values.tolist(), pos + count * dtype.itemsize
        items = []
        for _ in range(count):              # strings (and nested arrays) one by one
            item, pos = self._value(item_type, pos)
            items.append(item)
        return items, pos


def metadata_digest(path: Path) -> str:
    """sha256 of the file's header and key/value fields: everything but the tensor table and the
    data, read without decoding a value (strings are skipped by their lengths). Two files with
    the same digest carry the same tokenizer, chat template and model settings. SmolLM2's 1.8 MB
    of fields take about 30 ms, a 128k-token vocabulary about 0.1 s; the weights are never read."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != MAGIC:
            raise _FormatError(f"{Path(path).name} has no GGUF magic")
        try:
            num_fields = struct.unpack_from("<Q", buf, 16)[0]
            pos = 24
            for _ in range(num_fields):
                pos = _skip_string(buf, pos)
                pos = _skip_value(buf, struct.unpack_from("<I", buf, pos)[0], pos + 4)
        except (struct.error, OverflowError):     # a length or offset past the end
            pos = len(buf) + 1
        if pos > len(buf):
            raise _FormatError(f"{Path(path).name}'s fields run past the end of the file (truncated?)")
        return hashlib.sha256(buf[:pos]).hexdigest()


def _skip_string(buf, pos: int) -> int:
    return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]


def _skip_value(buf, value_type: int, pos: int) -> int:
    if value_type in _SCALARS:
        return pos + struct.calcsize("<" + _SCALARS[value_type])
    if value_type == _STRING:
        return _skip_string(buf, pos)
    if value_type != _ARRAY:
        raise _FormatError(f"unknown value type {value_type}")
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if count > len(buf) - pos:            # every element takes a byte at least: a damaged count
        raise _FormatError("an array runs past the end of the file (truncated?)")
    if item_type in _SCALARS:
        return pos + count * struct.calcsize("<" + _SCALARS[item_type])
    if item_type == _STRING:              # the vocabulary and merges: the loop that costs
        unpack = struct.unpack_from
        for _ in range(count):
            pos += 8 + unpack("<Q", buf, pos)[0]
        return pos
    for _ in range(count):
        pos = _skip_value(buf, item_type, pos)
    return pos


class _FormatError(ValueError):
    """What is wrong with the file, in words for the user."""
