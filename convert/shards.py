"""Safetensors shards written one tensor at a time.

``mx.save_safetensors`` needs a whole shard in memory at once. Every output
shape and dtype is known before any weight is read, so the header can be
written first and each tensor appended as soon as it is converted: memory
then holds one tensor, not one shard.
"""

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import List, Sequence, Tuple

import mlx.core as mx

SAFETENSORS_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16",
    mx.uint32: "U32", mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64",
    mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32", mx.float64: "F64",
}

# (name, shape, dtype) of one tensor in a shard
Entry = Tuple[str, Tuple[int, ...], mx.Dtype]

_READ_CHUNK = 16 << 20


def nbytes(shape: Sequence[int], dtype: mx.Dtype) -> int:
    return math.prod(shape) * dtype.size


class ShardWriter:
    """Writes the tensors of ``entries``, in that order, to a safetensors file
    and hashes the bytes on their way to disk."""

    def __init__(self, path: Path, entries: List[Entry], metadata: dict):
        self.path = path
        self._pending = list(reversed(entries))
        header = {"__metadata__": metadata}
        offset = 0
        for name, shape, dtype in entries:
            end = offset + nbytes(shape, dtype)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, end]}
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
        self._sha256 = hashlib.sha256()
        self._file = open(path, "wb")
        self._write(struct.pack("<Q", len(text)) + text)

    def _write(self, data) -> None:
        self._sha256.update(data)
        self._file.write(data)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def add(self, name: str, array: mx.array) -> None:
        expected = self._pending.pop()
        if (name, tuple(array.shape), array.dtype) != expected:
            raise AssertionError(f"wrote {name} {array.shape} {array.dtype}, planned {expected}")
        # The bytes go to disk in row-major order, as the header promises.
        array = mx.contiguous(array)
        mx.eval(array)
        self._write(memoryview(array))

    def finish(self) -> str:
        """Flush the file to disk and close it; the SHA-256 of what was written."""
        self._file.flush()
        # On disk before the output is renamed into place, so a crash cannot
        # leave a finished-looking folder with empty shards.
        os.fsync(self._file.fileno())
        self._file.close()
        if self._pending:
            raise AssertionError(f"{self.path.name}: {len(self._pending)} tensors never written")
        return self._sha256.hexdigest()


def file_sha256(path: Path, progress=None) -> str:
    """SHA-256 of a file read back from disk; ``progress(n)`` after each chunk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if hasattr(os, "posix_fadvise"):
            # Read the disk, not the page cache that still holds what was just written.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()
