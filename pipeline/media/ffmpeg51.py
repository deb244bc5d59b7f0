"""Where vmr's frame selection follows FFmpeg 5.1 rather than the FFmpeg its decoders bundle.

The `fps` filter's output depends on where the file starts and where the video ends, and libavformat
changed both after 5.1 (Debian 12's `ffmpeg`, the version vmr follows: docs/features.md). PyAV bundles
FFmpeg 8, so the two places are recomputed here from the container, as 5.1 computes them. What is said
below was read in the 5.1.9 sources (libavformat/mov.c, libavformat/demux.c, fftools/ffmpeg.c) and is
tested against the 5.1 binary (tests/pipeline/media/test_ffmpeg_oracle.py).
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any


def first_packet_start(path: str, max_packets: int = 1000) -> float:
    """The earliest time of the first shown packet of any stream, in seconds (inf if none seen).

    FFmpeg 5.1 starts a file there. Newer libavformat moves an audio stream's start past its encoder
    priming (AAC or Opus in Matroska: the first packet at -0.064 s, the stream start at 0), which moves
    every slot of the fps filter. A second open reads only the first packets (the stream being decoded
    keeps its position).
    """
    import av

    firsts: dict[int, float] = {}
    try:
        with av.open(path) as container:
            for n, packet in enumerate(container.demux()):
                if shown(packet) and packet.stream.index not in firsts:
                    firsts[packet.stream.index] = float(packet.pts * packet.time_base)
                if len(firsts) == len(container.streams) or n >= max_packets:
                    break
    except av.error.FFmpegError:
        pass  # the reader reports what is wrong with the file
    return min(firsts.values(), default=math.inf)


def shown(packet: Any) -> bool:
    """A packet whose frame is shown. An edit list (e.g. a file cut with `ffmpeg -ss ... -c copy`) can
    start after the first frames: their packets carry the discard flag (negative times), the decoder
    needs them as references but outputs nothing for them, and FFmpeg's filters never see them."""
    return packet.pts is not None and packet.size > 0 and not packet.is_discard


# -- where an mp4/mov video ends ------------------------------------------------------------------
# 5.1's command line ends the video at the last shown frame's pts plus that packet's duration, which
# comes from the first of these that gives one:
#   1. the mov demuxer (mov_read_packet): in a track without composition offsets, sample i lasts
#      dts[i+1] - dts[i] and the last sample `stream duration - dts`, none when that is not positive
#      (an empty edit shifted the dts past the media duration: a video starting late). Tracks with
#      composition offsets (a `ctts` box; movie fragments, whose samples 5.1 always gives offsets) get
#      none, and codecs parsed in full (MOV_FULL_PARSE) lose the demuxer's duration.
#   2. libavformat (compute_frame_duration): 1 / r_frame_rate when the codec has no parser or its
#      headers give no frame rate; else one tick of a time base coarser than 1 ms; else 1 / the
#      headers' frame rate (H.264's SPS timing) if under 1000 fps. An SPS saying 180000 fps (x264 given
#      a 1/180000 time base) gives none.
# Without either the command line adds 1 / the decoder's frame rate, which is then at least 1000 fps:
# under 1 ms, not modelled. FFmpeg 8 (PyAV) keeps the whole last frame in these cases: one slot more
# where end x rate passes a half.

MOV_HEADER_PARSE = {"h264", "av1"}  # mov.c gives these a header parser (complete frames)
MOV_FULL_PARSE = {"mpeg1video", "vc1", "vp8", "vp9"}  # and these a full one (durations dropped)


def is_mov(container: Any) -> bool:
    return "mov" in container.format.name.split(",")


def mov_last_duration(path: str | Path, stream: Any, last_dts: int) -> int | None:
    """The duration in `stream.time_base` ticks (0: none) that FFmpeg 5.1 gives the packet of the last
    shown frame of `stream`, a video stream of an mp4/mov file (`last_dts`: the dts of its last packet
    in decode order). None where the file's boxes cannot be read."""
    layout = _mov_layout(Path(path))
    if layout is None:
        return None
    fragmented, has_ctts = layout
    codec = stream.codec_context.codec.canonical_name  # "av1", not the decoder ("libdav1d")
    if not (fragmented or has_ctts or codec in MOV_FULL_PARSE) and stream.duration:
        if stream.duration > last_dts:
            return stream.duration - last_dts
    parsed = codec in MOV_HEADER_PARSE or codec in MOV_FULL_PARSE
    return _frame_duration_ticks(stream, Fraction(stream.time_base), parsed)


def _frame_duration_ticks(stream: Any, tb: Fraction, parsed: bool) -> int:
    """5.1's compute_frame_duration for a video packet, rounded down to ticks (0: none)."""
    headers_rate = Fraction(stream.codec_context.framerate) if stream.codec_context.framerate else None
    r_frame_rate = Fraction(stream.base_rate) if stream.base_rate else None
    if r_frame_rate and (not parsed or not headers_rate):
        frame = 1 / r_frame_rate
    elif tb > Fraction(1, 1000):
        frame = tb
    elif headers_rate and headers_rate < 1000:
        frame = 1 / headers_rate
    else:
        return 0
    return math.floor(frame / tb)


def _mov_layout(path: Path) -> tuple[bool, bool] | None:
    """(fragmented, ctts): whether the file has movie fragments (a top-level `moof`) and whether its
    first video track has composition offsets (a `ctts` box with entries). None if unreadable."""
    fragmented, moov = False, None
    try:
        with open(path, "rb") as f:
            for kind, start, size in _boxes(f, 0, path.stat().st_size):
                if kind == b"moof":
                    fragmented = True
                elif kind == b"moov":
                    f.seek(start)
                    moov = f.read(size)
    except (OSError, ValueError, struct.error):
        return None
    if moov is None:
        return None
    for trak in _children(moov, b"trak"):
        for mdia in _children(trak, b"mdia"):
            hdlr = next(_children(mdia, b"hdlr"), b"")
            if hdlr[8:12] != b"vide":  # version/flags, pre_defined, then the handler type
                continue
            stbls = [s for minf in _children(mdia, b"minf") for s in _children(minf, b"stbl")]
            ctts = [c for s in stbls for c in _children(s, b"ctts")]
            return fragmented, any(len(c) >= 8 and struct.unpack(">I", c[4:8])[0] > 0 for c in ctts)
    return fragmented, False


def _boxes(f, offset: int, end: int):
    """(type, payload start, payload size) of the ISO-BMFF boxes between `offset` and `end` of file `f`."""
    while offset + 8 <= end:
        f.seek(offset)
        size, kind = struct.unpack(">I4s", f.read(8))
        header = 8
        if size == 1:  # 64-bit size follows
            size, header = struct.unpack(">Q", f.read(8))[0], 16
        elif size == 0:  # the box runs to the end of the file
            size = end - offset
        if size < header or offset + size > end:
            raise ValueError(f"malformed box {kind!r} at byte {offset}")
        yield kind, offset + header, size - header
        offset += size


def _children(payload: bytes, kind: bytes):
    """The payloads of the child boxes of type `kind` in a container box's payload."""
    offset = 0
    while offset + 8 <= len(payload):
        size, child = struct.unpack(">I4s", payload[offset : offset + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", payload[offset + 8 : offset + 16])[0], 16
        elif size == 0:
            size = len(payload) - offset
        if size < header:
            return
        if child == kind:
            yield payload[offset + header : offset + size]
        offset += size
