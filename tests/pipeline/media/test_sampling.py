"""Frame selection rules on constructed timestamps (no video): the numbers are worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from extractors._base import SamplingProtocol
from pipeline.media.sampling import every_n, fps_filter, hero_rate, round_half_up, select, uniform


def cfr(fps: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(n) / fps
    return starts, starts + 1 / fps


def test_round_half_up_matches_ffmpeg_near_inf():
    assert round_half_up(np.array([0.49, 0.5, 1.5, 2.5, 74.5])).tolist() == [0, 1, 2, 3, 75]


def test_qvhighlights_150s_gives_75_mid_window_frames():
    starts, stops = cfr(30, 4500)  # 150 s at 30 fps
    idx, win = fps_filter(starts, stops[-1], 0.5)
    assert len(idx) == 75
    # slot k = last frame with t < 2k + 1: frame 30 * (2k + 1) - 1, at 2k + 0.967 s (mid-window)
    assert idx.tolist() == [60 * k + 29 for k in range(75)]
    assert np.allclose(starts[idx][:2], [29 / 30, 89 / 30])
    assert win[0].tolist() == [0, 2] and win[-1].tolist() == [148, 150]
    starts, stops = cfr(30, 4530)  # 151 s -> round_half_up(75.5) = 76
    assert len(fps_filter(starts, stops[-1], 0.5)[0]) == 76


def test_frame_exactly_on_the_half_boundary_goes_to_the_next_slot():
    # at rate 1, a frame at t = 0.5 rounds to slot 1, so slot 0 keeps the frame before it
    starts = np.array([0.0, 0.25, 0.5, 1.0, 1.5])
    idx, _ = fps_filter(starts, 2.0, 1.0)
    assert idx.tolist() == [1, 3]  # slot 1: t < 1.5 -> the frame at 1.0 (1.5 is excluded too)
    # float noise (0.1 + 0.2 + 0.2 != 0.5 exactly) must not move it
    starts = np.array([0.0, 0.1 + 0.15, 0.1 + 0.2 + 0.2, 1.0, 1.5])
    assert fps_filter(starts, 2.0, 1.0)[0].tolist() == [1, 3]


def test_slots_before_the_first_kept_slot_repeat_its_frame_and_gaps_repeat_the_previous():
    # FFmpeg's rule (checked against the binary in test_ffmpeg_oracle.py): the first slot with a
    # frame is k0 = round(1.2) = 1, it keeps the last frame with t < 1.5 (frame 1), and slot 0
    # repeats that frame, not the stream's first one
    starts = np.array([1.2, 1.3, 4.0])  # video starts 1.2 s after the file; a 2.7 s hole
    idx, _ = fps_filter(starts, 4.1, 1.0)  # round(4.1) = 4 slots: t < 0.5, 1.5, 2.5, 3.5
    assert idx.tolist() == [1, 1, 1, 1]


def test_frames_before_the_file_start_only_compete_for_slot_0():
    # a first frame at -0.52 s (e.g. one an edit list should have discarded) rounds to slot -1: the
    # slots still start at 0, and no negative index wraps a frame from the end into the early slots
    starts = np.arange(-13, 77) * 0.04  # 25 fps from -0.52 s to 3.04 s
    idx, windows = fps_filter(starts, 3.08, 1.0)  # round(3.08) = 3 slots: t < 0.5, 1.5, 2.5
    assert idx.tolist() == [25, 50, 75]  # the frames at 0.48, 1.48 and 2.48 s
    assert windows.tolist() == [[0, 1], [1, 2], [2, 3]]
    assert uniform(starts, 3.08, 1.0)[0].tolist() == [13, 38, 63, 88]  # first frame at or after k s


def test_nothing_is_kept_when_the_video_starts_after_the_last_slot():
    starts = np.array([2.6, 2.7])  # k0 = round(2.6) = 3, but only round(2.8) = 3 slots: 0, 1, 2
    idx, windows = fps_filter(starts, 2.8, 1.0)
    assert idx.size == 0 and windows.shape == (0, 2)


def test_count_follows_the_end_time():
    starts, _ = cfr(30, 75)  # frames to 2.467 s
    assert len(fps_filter(starts, 2.49, 1.0)[0]) == 2
    assert len(fps_filter(starts, 2.5, 1.0)[0]) == 3


def test_hero_short_video_rule():
    assert hero_rate(0.5, 2.05) == 1.0  # 2 / int(2.05)
    assert hero_rate(0.5, 0.8) == 2.0  # 2 / max(int(0.8), 1)
    assert hero_rate(0.5, 2.2) == 0.5  # not shorter than clip_len + 0.1
    assert hero_rate(0.5, None) == 0.5  # mkv/webm/ts: HERO's duration is -1
    assert hero_rate(1.0, 1.05) == 2.0


def test_uniform_and_every_n():
    starts, stops = cfr(30, 40)
    idx, win = uniform(starts, stops[-1], 2.0)  # first frame at or after 0, 0.5, 1.0; ceil(2.67) = 3
    assert idx.tolist() == [0, 15, 30] and win[1].tolist() == [0.5, 1.0]
    idx, win = every_n(starts, stops, 8)
    assert idx.tolist() == [0, 8, 16, 24, 32]
    assert win[-1].tolist() == pytest.approx([32 / 30, 40 / 30])  # the short last group ends at the video end


def test_select_dispatches_on_the_protocol():
    starts, stops = cfr(30, 95)
    p = SamplingProtocol(rule="fps_filter", rate=0.5, hero_short_video=True)
    idx, _, rate = select(p, starts, stops, stops[-1], stream_duration=95 / 30)
    assert rate == 0.5 and idx.tolist() == [29, 89]
    idx, _, rate = select(p, starts[:62], stops[:62], stops[61], stream_duration=62 / 30)
    assert rate == 1.0 and idx.tolist() == [14, 44]
    with pytest.raises(ValueError, match="rate > 0"):
        SamplingProtocol(rule="fps_filter", rate=0)


def test_protocol_keys_are_stable_and_distinct():
    a = SamplingProtocol(rule="fps_filter", rate=1.0)
    assert a.key == SamplingProtocol(rule="fps_filter", rate=1.0).key
    assert a.key.startswith("fps_filter-1-s224-c224-")
    assert a.key != SamplingProtocol(rule="fps_filter", rate=1.0, interpolation="bicubic").key
    # the fields added for C3D (exact size, OpenCV resizer) leave the keys of existing protocols as they were:
    # frame stores and trained models' recipes written before them still match
    assert a.key == "fps_filter-1-s224-c224-44ffc7d9"
    c3d = SamplingProtocol(rule="all", short_side=0, size=[128, 171], crop=112, resizer="opencv")
    assert c3d.size == (128, 171) and c3d == SamplingProtocol(**json.loads(json.dumps(c3d.as_dict())))
    assert c3d.key.startswith("all-1-s128x171-c112-")
    assert c3d.key != SamplingProtocol(rule="all", short_side=0, size=(128, 171), crop=112).key


def test_an_exact_size_is_checked():
    with pytest.raises(ValueError, match="either short_side or size"):
        SamplingProtocol(rule="all", short_side=128, size=(128, 171))
    with pytest.raises(ValueError, match=r"crop 224 does not fit in size \(128, 171\)"):
        SamplingProtocol(rule="all", short_side=0, size=(128, 171), crop=224)
    with pytest.raises(ValueError, match="size must be"):
        SamplingProtocol(rule="all", short_side=0, size=(0, 171), crop=0)
