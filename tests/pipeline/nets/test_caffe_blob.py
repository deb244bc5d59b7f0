"""pipeline/nets/caffe_blob.py: Caffe BlobProto (.binaryproto) files in the official byte layout,
written by hand (tests/support/caffe.py), read back; bad files fail with their name."""

from __future__ import annotations

import numpy as np
import pytest
from support.caffe import OFFICIAL_HEADER_1x3x16x128x128, blob_proto_bytes, varint, write_blob_proto

from pipeline.core.errors import VmrError
from pipeline.nets.caffe_blob import BlobProtoError, read_blob_proto

SPORT1M_SHAPE = (1, 3, 16, 128, 171)


def test_writer_reproduces_the_official_mean_file_header():
    assert blob_proto_bytes(np.zeros((1, 3, 16, 128, 128), np.float32))[:17] == OFFICIAL_HEADER_1x3x16x128x128
    # the sport1m volume: width 171 -> varint ab 01; 3*16*128*171*4 = 0x402000 data bytes
    head = blob_proto_bytes(np.zeros(SPORT1M_SHAPE, np.float32))[:17]
    assert head == bytes.fromhex("0801 1003 1810 208001 28ab01 3280c08002".replace(" ", ""))


def test_reads_a_sport1m_shaped_volume_exactly(tmp_path):
    rng = np.random.default_rng(0)
    volume = (rng.random(SPORT1M_SHAPE) * 255).astype(np.float32)  # fractional means, as in the real file
    path = write_blob_proto(tmp_path / "sport1m_train16_128_mean.binaryproto", volume)
    out = read_blob_proto(path)
    assert out.dtype == np.float32 and out.shape == SPORT1M_SHAPE
    assert np.array_equal(out, volume)  # bit for bit, index ((c * L + l) * H + h) * W + w
    assert out[0, 2, 15, 127, 170] == volume.reshape(-1)[-1]


def test_a_blob_without_length_is_length_one(tmp_path):
    image = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # image-Caffe (no field 3)
    out = read_blob_proto(write_blob_proto(tmp_path / "mean.binaryproto", image, with_length=False))
    assert out.shape == (2, 3, 1, 4, 5) and np.array_equal(out[:, :, 0], image)


def test_unpacked_floats_are_read_too(tmp_path):
    # protobuf parsers accept a repeated float written element by element (wire type 5)
    data = np.array([1.5, -2.25, 3.0], np.float32)
    raw = varint(1 << 3) + varint(1) + varint(2 << 3) + varint(3) + varint(3 << 3) + varint(1)
    raw += varint(4 << 3) + varint(1) + varint(5 << 3) + varint(1)
    raw += b"".join(varint(6 << 3 | 5) + v.astype("<f4").tobytes() for v in data)
    (tmp_path / "m.binaryproto").write_bytes(raw)
    assert read_blob_proto(tmp_path / "m.binaryproto").reshape(-1).tolist() == data.tolist()


@pytest.mark.parametrize("damage, reason", [
    (lambda raw: raw[: len(raw) // 2], "truncated or another format"),  # cut inside the packed data
    (lambda raw: raw[:12], "needs 1050624 data values, the file holds 0"),  # cut after the dimensions
    (lambda raw: b"", "needs 0 data values"),  # empty: every dimension 0
    (lambda raw: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + raw[100:200], "truncated or another format"),  # a JPEG
    (lambda raw: b"name: 'mean'\nshape { dim: 1 }\n", "truncated or another format"),  # prototxt text
])
def test_bad_files_fail_with_their_name(tmp_path, damage, reason):
    raw = blob_proto_bytes(np.ones((1, 3, 16, 128, 171), np.float32))
    path = tmp_path / "bad_mean.binaryproto"
    path.write_bytes(damage(raw))
    with pytest.raises(BlobProtoError, match=reason) as err:
        read_blob_proto(path)
    assert str(path) in str(err.value) and isinstance(err.value, VmrError)


def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(BlobProtoError, match="absent.binaryproto: cannot read"):
        read_blob_proto(tmp_path / "absent.binaryproto")
