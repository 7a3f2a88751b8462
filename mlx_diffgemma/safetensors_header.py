"""Safetensors headers read and checked before anything trusts them.

A safetensors file is an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the data. A damaged
file (random bytes, cut short, empty) would otherwise surface as whatever the
first reader trips over: a huge allocation, a JSON error, a struct error, or
a crash mid-load. Every path that opens a checkpoint's weights (the loader,
the memory planner, convert) checks the headers here first.
"""

import json
import math
import struct
from pathlib import Path
from typing import Dict

from .errors import UserError

# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U64": 8, "U32": 4, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
INDEX_FILE = "model.safetensors.index.json"
# Far above any real header (the 26B-A4B shards' are well under 1 MB), far below a wild length.
_MAX_HEADER_BYTES = 100 << 20
_ADVICE = "download or convert the checkpoint again"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used, with a message meant for people."""


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file ({why}); {_ADVICE}")


def read_header(path: Path) -> Dict[str, dict]:
    """The tensors of a safetensors file, {name: {"dtype", "shape", "data_offsets"}},
    after checking that the header and every tensor's bytes lie within the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if size < 8:
                raise _damaged(path, f"{size} bytes, shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8 or length > _MAX_HEADER_BYTES:
                raise _damaged(path, f"its header claims {length} bytes but the file has {size} in all (cut short?)")
            raw = f.read(length)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"its header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    data = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            width = DTYPE_BYTES[dtype]
            valid = (all(isinstance(n, int) and n >= 0 for n in shape) and isinstance(start, int)
                     and isinstance(end, int) and 0 <= start <= end)
        except (TypeError, KeyError, ValueError):
            raise _damaged(path, f"the entry of {name} is malformed") from None
        if not valid or end - start != math.prod(shape) * width:
            raise _damaged(path, f"the entry of {name} is malformed")
        if end > data:
            raise _damaged(path, f"{name} ends at byte {end} of the data but there are {data} (cut short?)")
        tensors[name] = entry
    return tensors


def weight_headers(path: Path) -> Dict[Path, Dict[str, dict]]:
    """``read_header`` of each of the checkpoint's safetensors shards, once
    every shard its index names is found present."""
    path = Path(path)
    files = sorted(path.glob("model*.safetensors"))
    index = path / INDEX_FILE
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid index ({type(e).__name__}); {_ADVICE}") from None
        missing = sorted(name for name in named if not (path / name).is_file())
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(f"{path / missing[0]}{more}: missing, but {INDEX_FILE} lists it; {_ADVICE}")
    return {file: read_header(file) for file in files}
