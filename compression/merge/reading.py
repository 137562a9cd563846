"""Reading a safetensors file one tensor at a time with plain reads.

`safetensors.safe_open` maps the whole file into memory: every page a merge touches stays
mapped and counts in the process's resident memory until the file is closed, so streaming
three models that way costs as much resident memory as loading them. This reader seeks to one
tensor's bytes and reads only those into a fresh buffer, which is freed with the tensor.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}} (offsets from the end of the header), then the data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ...core.errors import InputError

MAX_HEADER = 100 << 20  # the header of a model with hundreds of thousands of tensors fits
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class TensorFile:
    """One safetensors file, open for reading single tensors."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            size = struct.unpack("<Q", self._file.read(8))[0]
            if size > MAX_HEADER:
                raise ValueError(f"a header of {size:,} bytes")
            header = json.loads(self._file.read(size))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            self._file.close()
            raise InputError(f"{self.path} is not a readable safetensors file ({exc}); "
                             "re-create it.") from None
        self._start = 8 + size
        self._meta = {k: v for k, v in header.items() if k != "__metadata__"}
        for key, meta in self._meta.items():
            try:
                begin, end = meta["data_offsets"]
                assert 0 <= begin <= end
            except (KeyError, TypeError, ValueError, AssertionError):
                self._file.close()
                raise InputError(f"{self.path}: the header entry of {key[:200]} is damaged; "
                                 "re-create the file.") from None

    def header(self) -> bytes:
        """The file's first bytes up to its data: the length and the JSON header."""
        self._file.seek(0)
        return self._file.read(self._start)

    def span(self, key: str) -> tuple[int, int]:
        """Where a tensor's bytes lie in the file: (begin, end) from the file's start."""
        begin, end = self._meta[key]["data_offsets"]
        return self._start + begin, self._start + end

    def copy_bytes(self, begin: int, end: int, out, block: int = 1 << 24) -> None:
        """Copy the file's bytes [begin, end) to the open file `out`, a block at a time."""
        self._file.seek(begin)
        while begin < end:
            data = self._file.read(min(block, end - begin))
            if not data:
                raise InputError(f"{self.path} is truncated; re-create it.")
            out.write(data)
            begin += len(data)

    def keys(self) -> list[str]:
        """The tensor names the file holds."""
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the header."""
        return tuple(self._meta[key]["shape"])

    def get(self, key: str, rows: slice | None = None):
        """A tensor, or the block `rows` of its first dimension, read from disk now into
        memory of its own."""
        import torch

        meta = self._meta[key]
        if meta.get("dtype") not in _DTYPES:
            raise InputError(f"{self.path}: the tensor {key} has dtype {meta.get('dtype')}, "
                             "which mmkit merge does not read.")
        dtype = getattr(torch, _DTYPES[meta["dtype"]])
        begin, end = meta["data_offsets"]
        shape = list(meta["shape"])
        if rows is not None and shape:
            first, last, _ = rows.indices(shape[0])
            row_bytes = (end - begin) // max(1, shape[0])
            begin, end = begin + first * row_bytes, begin + last * row_bytes
            shape[0] = last - first
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        self._file.seek(self._start + begin)
        data = bytearray(end - begin)
        if self._file.readinto(data) != len(data):
            raise InputError(f"{self.path} ends inside the tensor {key}: the file is truncated; "
                             "re-create it.")
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
