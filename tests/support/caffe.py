"""Caffe `.binaryproto` mean files written byte by byte, independently of the parser under test.

The layout is the one Caffe's own `WriteProtoToBinaryFile` gives a C3D-fork `BlobProto`: the five
int32 dimensions as varint fields 1..5 in order, then `data` (field 6) as ONE packed run of
little-endian float32. The official `fb_train16_128_mean.binaryproto` of facebook/C3D v1.0 starts with
exactly the bytes `OFFICIAL_HEADER_1x3x16x128x128` below (read from that file), which the tests check
this writer reproduces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# facebook/C3D C3D-v1.0/examples/c3d_feature_extraction/fb_train16_128_mean.binaryproto, first 17 bytes
OFFICIAL_HEADER_1x3x16x128x128 = bytes.fromhex("0801 1003 1810 208001 288001 328080c001".replace(" ", ""))


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def blob_proto_bytes(data: np.ndarray, with_length: bool = True) -> bytes:
    """A (num, channels, length, height, width) array as BlobProto bytes (`with_length=False`:
    a 4-D image-Caffe blob, no field 3, from data of shape (num, channels, height, width))."""
    dims = list(data.shape)
    numbers = [1, 2, 3, 4, 5] if with_length else [1, 2, 4, 5]
    out = bytearray()
    for number, d in zip(numbers, dims, strict=True):
        out += varint(number << 3 | 0) + varint(d)  # wire type 0: varint
    payload = np.ascontiguousarray(data, dtype="<f4").tobytes()
    out += varint(6 << 3 | 2) + varint(len(payload)) + payload  # wire type 2: packed floats
    return bytes(out)


def write_blob_proto(path: Path, data: np.ndarray, with_length: bool = True) -> Path:
    path.write_bytes(blob_proto_bytes(data, with_length))
    return path
