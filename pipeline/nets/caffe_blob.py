"""Caffe `.binaryproto` files: one serialized `BlobProto`, the format of Caffe's mean files.

The C3D fork of Caffe (facebook/C3D v1.0, `src/caffe/proto/caffe.proto`) gives the message five
optional int32 dimensions and two packed float arrays:

    num = 1, channels = 2, length = 3, height = 4, width = 5, data = 6 (packed), diff = 7 (packed)

`data` is row-major over (num, channels, length, height, width). A blob without `length` (written by
image Caffe, which has no field 3) is read as length 1, as the fork's `Blob::FromProto` does.
Caffe itself never checks that `data` holds num*channels*length*height*width values; we do, so a
truncated or foreign file fails here with its name instead of giving garbage means.

The message is parsed by the `protobuf` runtime from a descriptor built here for just `BlobProto`
(no generated `caffe_pb2`, no copy of caffe.proto).
"""

from __future__ import annotations

import math
import os
from functools import cache

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from pipeline.core.errors import VmrError

DIMENSIONS = ("num", "channels", "length", "height", "width")  # field numbers 1..5


class BlobProtoError(VmrError, ValueError):
    """A `.binaryproto` file is unreadable, not a BlobProto, or not the expected shape (names the file)."""


@cache
def blob_proto_class() -> type:
    """The message class of `caffe.BlobProto` (C3D fork field numbers), in a private descriptor pool."""
    FieldProto = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="vmr_caffe_blob.proto", package="caffe", syntax="proto2")
    message = file.message_type.add(name="BlobProto")
    for number, name in enumerate(DIMENSIONS, start=1):
        message.field.add(name=name, number=number, type=FieldProto.TYPE_INT32, label=FieldProto.LABEL_OPTIONAL)
    for number, name in ((6, "data"), (7, "diff")):
        field = message.field.add(name=name, number=number, type=FieldProto.TYPE_FLOAT,
                                  label=FieldProto.LABEL_REPEATED)
        field.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.BlobProto"))


def read_blob_proto(path: str | os.PathLike) -> np.ndarray:
    """The `data` of a BlobProto file as float32 (num, channels, length, height, width)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise BlobProtoError(f"{path}: cannot read the Caffe blob file ({e.strerror or e})") from None
    blob = blob_proto_class()()
    try:
        blob.ParseFromString(raw)
    except DecodeError as e:
        raise BlobProtoError(
            f"{path}: not a Caffe BlobProto .binaryproto (truncated or another format: {e})"
        ) from None
    shape = tuple(getattr(blob, name) for name in DIMENSIONS)
    if not blob.HasField("length"):
        shape = (shape[0], shape[1], 1, shape[3], shape[4])
    count = math.prod(shape)
    if any(d <= 0 for d in shape) or len(blob.data) != count:
        dims = " x ".join(f"{n} {d}" for n, d in zip(DIMENSIONS, shape, strict=True))
        raise BlobProtoError(
            f"{path}: not a usable Caffe BlobProto: {dims} needs {count} data values, "
            f"the file holds {len(blob.data)} ({len(raw)} bytes; truncated or another format?)"
        )
    return np.asarray(blob.data, dtype=np.float32).reshape(shape)
