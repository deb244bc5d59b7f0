"""The ISO-BMFF reading behind the mp4 end rule. The rule itself is tested against the 5.1 binary and
ffprobe in test_ffmpeg_oracle.py; here: box layouts the generated corpus does not produce."""

from __future__ import annotations

import struct

from pipeline.media.ffmpeg51 import _mov_layout


def box(kind: bytes, payload: bytes = b"", large: bool = False) -> bytes:
    if large:  # size 1: a 64-bit size follows the type
        return struct.pack(">I4sQ", 1, kind, 16 + len(payload)) + payload
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def video_trak(ctts_entries: int | None, handler: bytes = b"vide") -> bytes:
    hdlr = box(b"hdlr", bytes(8) + handler + bytes(12))
    stbl = box(b"stbl", box(b"stts", bytes(8)) + (box(b"ctts", struct.pack(">II", 0, ctts_entries))
                                                   if ctts_entries is not None else b""))
    return box(b"trak", box(b"tkhd", bytes(84)) + box(b"mdia", hdlr + box(b"minf", stbl)))


def test_ctts_of_the_first_video_track(tmp_path):
    sound = video_trak(ctts_entries=3, handler=b"soun")  # an audio track's ctts does not count
    f = tmp_path / "a.mp4"
    f.write_bytes(box(b"ftyp", b"isom") + box(b"moov", sound + video_trak(ctts_entries=2)) + box(b"mdat", bytes(64), large=True))
    assert _mov_layout(f) == (False, True)
    f.write_bytes(box(b"ftyp", b"isom") + box(b"moov", sound + video_trak(ctts_entries=0)) + box(b"mdat", bytes(64)))
    assert _mov_layout(f) == (False, False)  # 5.1 ignores a ctts box without entries
    f.write_bytes(box(b"ftyp", b"isom") + box(b"moov", video_trak(None)) + box(b"moof", box(b"mfhd", bytes(8)))
                  + box(b"mdat", bytes(8)))
    assert _mov_layout(f) == (True, False)


def test_unreadable_layout_keeps_the_demuxers_duration(tmp_path):
    f = tmp_path / "bad.mp4"
    f.write_bytes(box(b"ftyp", b"isom") + struct.pack(">I4s", 4096, b"moov") + bytes(16))  # runs past the end
    assert _mov_layout(f) is None
    f.write_bytes(box(b"ftyp", b"isom") + box(b"mdat", bytes(8)))  # no moov
    assert _mov_layout(f) is None
    f.write_bytes(b"\x00\x00")  # too short for a box header
    assert _mov_layout(f) is None
    assert _mov_layout(tmp_path / "missing.mp4") is None
