"""Reads the key/value metadata section of a GGUF file (types and constants from the `gguf` package).

gguf.GGUFReader parses the whole file and builds a numpy view per array element: about 6 s for SmolLM2's 49k
token strings on this machine type. The tokenizer needs only the metadata, which this reads in well under a
second and stops before the tensor infos. tests/tokenizer cross-check it against GGUFReader.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from gguf import GGUF_MAGIC, GGUFValueType

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT32: "f", GGUFValueType.FLOAT64: "d",
    GGUFValueType.BOOL: "?",
}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


class _Cursor:
    def __init__(self, buf: memoryview | mmap.mmap, endian: str):
        self.buf = buf
        self.pos = 0
        self.endian = endian

    def unpack(self, fmt: str) -> tuple:
        fmt = self.endian + fmt
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        start = self.pos
        self.pos += length
        try:
            return bytes(self.buf[start:self.pos]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFormatError(f"a string at byte {start} is not valid UTF-8") from exc

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = self.unpack("IQ")
            if item_type == GGUFValueType.STRING:
                return [self.string() for _ in range(count)]
            if item_type in _SCALAR_FORMATS:
                return list(self.unpack(f"{count}{_SCALAR_FORMATS[GGUFValueType(item_type)]}"))
            return [self.value(item_type) for _ in range(count)]  # nested arrays
        try:
            return self.unpack(_SCALAR_FORMATS[GGUFValueType(vtype)])[0]
        except (KeyError, ValueError) as exc:
            raise GGUFFormatError(f"unknown GGUF value type {vtype} at byte {self.pos}") from exc


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Every metadata key of the GGUF file at `path`, with plain Python values."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if len(mm) < 24 or struct.unpack_from("<I", mm, 0)[0] != GGUF_MAGIC:
            raise GGUFFormatError(f"{path} is not a GGUF file (bad magic)")
        # A big-endian file has its version field byte-swapped; real versions are small numbers.
        endian = "<" if struct.unpack_from("<I", mm, 4)[0] < 0x10000 else ">"
        cur = _Cursor(mm, endian)
        cur.pos = 4
        version, _tensor_count, kv_count = cur.unpack("IQQ")
        if version < 2:
            raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (need 2 or later)")
        metadata: dict[str, Any] = {}
        try:
            for _ in range(kv_count):
                key = cur.string()
                (vtype,) = cur.unpack("I")
                metadata[key] = cur.value(vtype)
        except struct.error as exc:
            raise GGUFFormatError(f"{path}: metadata is truncated or corrupt ({exc})") from exc
        return metadata
