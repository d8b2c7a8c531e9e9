"""A GGUF file's metadata and tensors, with metadata arrays decoded only when asked for.

The `gguf` package's GGUFReader decodes every metadata value when it opens a file, one numpy view
per string: SmolLM2's tokenizer fields (98,000 strings) took 2.4 s of every model load, for values
a load then takes from Hearth's tokenizer cache (training/gguf_model.py). `GGUFFile` reads the
same layout (the GGUF specification: header, key/value pairs, tensor infos, aligned data): scalars
and strings at once, arrays when `contents()` is called; tensors as numpy views of the
memory-mapped file, shaped as GGUFReader shapes them, so the package's dequantisers take them
unchanged. It offers what the model loader uses of GGUFReader (`fields[key].contents()`,
`tensors` with name, tensor_type, shape, n_elements, n_bytes, data) and nothing more.

Open only files `training.model_store.check_gguf` has passed: this trusts the lengths it reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

# Metadata value types of the format: fixed-size scalars (struct format), string, array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32
# Tensor types stored as plain numbers (GGUFReader gives these typed arrays, the rest bytes).
_PLAIN = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: list[int]             # GGUF's order: fastest-varying dimension first
    n_elements: int
    n_bytes: int
    data: np.ndarray             # a view of the file


class GGUFField:
    """One metadata value; an array is decoded when `contents()` is first called."""

    def __init__(self, file: GGUFFile, kind: int, value: Any = None, item_kind: int = 0,
                 count: int = 0, offset: int = 0):
        self._file, self._kind, self._value = file, kind, value
        self._item_kind, self._count, self._offset = item_kind, count, offset

    def contents(self) -> Any:
        if self._kind == _ARRAY and self._value is None:
            self._value = self._file.read_array(self._item_kind, self._count, self._offset)
        return self._value


class GGUFFile:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._data = np.memmap(self.path, mode="r")
        self._pos = 8                                   # magic and version: check_gguf read them
        n_tensors, n_fields = self._unpack("<Q"), self._unpack("<Q")
        self.fields: dict[str, GGUFField] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._field(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            infos.append((name, dims, self._unpack("<I"), self._unpack("<Q")))
        alignment = self.fields["general.alignment"].contents() if "general.alignment" in self.fields \
            else _DEFAULT_ALIGNMENT
        start = -(-self._pos // alignment) * alignment
        self.tensors = [self._tensor(name, dims, kind, start + offset) for name, dims, kind, offset in infos]

    def read_array(self, item_kind: int, count: int, offset: int) -> list[Any]:
        if item_kind == _STRING:
            values, pos = [], offset
            for _ in range(count):
                length = struct.unpack_from("<Q", self._data, pos)[0]
                values.append(bytes(self._data[pos + 8:pos + 8 + length]).decode("utf-8"))
                pos += 8 + length
            return values
        item = np.dtype(_SCALARS[item_kind])          # struct and numpy read these codes alike
        return np.frombuffer(self._data, dtype=item, count=count, offset=offset).tolist()

    # --- reading the header, in order -------------------------------------------------------

    def _unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._data, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._unpack("<Q")
        text = bytes(self._data[self._pos:self._pos + length]).decode("utf-8")
        self._pos += length
        return text

    def _field(self, kind: int) -> GGUFField:
        if kind == _STRING:
            return GGUFField(self, kind, self._string())
        if kind != _ARRAY:
            return GGUFField(self, kind, self._unpack(_SCALARS[kind]))
        item_kind, count = self._unpack("<I"), self._unpack("<Q")
        offset = self._pos
        if item_kind == _STRING:                        # skip the strings, each length-prefixed
            for _ in range(count):
                self._pos += 8 + struct.unpack_from("<Q", self._data, self._pos)[0]
        elif item_kind == _ARRAY:
            raise ValueError(f"{self.path}: nested metadata arrays are not supported")
        else:
            self._pos += count * struct.calcsize(_SCALARS[item_kind])
        return GGUFField(self, _ARRAY, item_kind=item_kind, count=count, offset=offset)

    def _tensor(self, name: str, dims: list[int], kind: int, offset: int) -> GGUFTensor:
        tensor_type = GGMLQuantizationType(kind)
        n_elements = int(np.prod(dims)) if dims else 1
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        n_bytes = n_elements * type_size // block_size
        shape = tuple(reversed(dims))
        if tensor_type in _PLAIN:
            data = np.frombuffer(self._data, dtype=_PLAIN[tensor_type], count=n_elements, offset=offset)
        else:
            data = np.frombuffer(self._data, dtype=np.uint8, count=n_bytes, offset=offset)
            shape = quant_shape_to_byte_shape(shape, tensor_type)
        return GGUFTensor(name, tensor_type, dims, n_elements, n_bytes, data.reshape(shape))
