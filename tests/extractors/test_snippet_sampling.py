"""Snippet sampling rules of the snippet-level extractors (pure functions, no video, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from extractors._snippets import (
    LazySnippets,
    c3d_plan,
    hero_fast_positions,
    hero_slowfast_plan,
    i3d_plan,
    lgi_chunks,
    make_units,
    slow_positions,
    strided_snippets,
    tall_windows,
    vslnet_windows,
    windows_plan,
)
from pipeline.media.sampling import fps_filter

# -- HERO SlowFast ------------------------------------------------------------------------------


def test_hero_fast_positions_follow_floor_of_source_fps():
    # feature_protocols.md 2a: the span is 64 * floor(fps) / 30 frames of the 30 fps snippet
    assert hero_fast_positions(30, 60).tolist() == list(range(0, 60, 2))[:30] + [59, 59]
    assert hero_fast_positions(25, 60).tolist()[:4] == [0, 1, 3, 5]
    assert hero_fast_positions(25, 60)[-1] == 52
    assert hero_fast_positions(23.976, 60)[-1] == 48  # floor -> 23
    assert hero_fast_positions(29.97, 60).tolist() == hero_fast_positions(29, 60).tolist()
    assert hero_fast_positions(29.97, 60)[-1] == 59
    sixty = hero_fast_positions(60, 60)
    assert (sixty[16:] == 59).all() and len(set(sixty.tolist())) == 16  # second half repeats frame 59
    assert len(set(hero_fast_positions(50, 60).tolist())) == 19


def test_slow_positions():
    assert slow_positions().tolist() == [0, 4, 8, 13, 17, 22, 26, 31]


def test_hero_plan_counts_and_rows():
    plan = hero_slowfast_plan(300, source_fps=30, duration=10.0, clip_len=2)
    assert len(plan.snippets) == 5 and all(c.shape == (32,) for c in plan.snippets)
    assert plan.snippets[1][0] == 60 and plan.snippets[1][-1] == 119
    windows = np.stack([np.arange(300), np.arange(1, 301)], 1) / 30
    assert np.allclose(plan.row_windows(windows), [[2 * k, 2 * k + 2] for k in range(5)])
    charades = hero_slowfast_plan(300, source_fps=30, duration=10.0, clip_len=1)
    assert len(charades.snippets) == 10
    assert (charades.snippets[0][15:] == 29).all()  # span 64 frames over a 30-frame snippet


def test_hero_tail_padding_repeats_last_frame_then_last_second():
    # 65 frames at 30 fps: pad to 90 with frame 64, then a 4th second copying the 3rd (frames 60..64, 64...)
    plan = hero_slowfast_plan(65, source_fps=30, duration=2.17, clip_len=2)
    assert len(plan.snippets) == 2
    second_clip = plan.snippets[1]  # fast positions 0,2,..,28 -> 3rd second; 30.. -> copied 3rd second
    assert second_clip[0] == 60 and second_clip[1] == 62 and second_clip[2] == 64
    assert second_clip[15] == 60  # position 30 = first frame of the copied second, not frame 64
    assert hero_slowfast_plan(65, 30, duration=1.9, clip_len=2).snippets.__len__() == 1


def test_hero_duration_caps_clips_and_unknown_duration_keeps_all():
    # 135 frames (4.5 s from the file start) but a 4.0 s stream: ceil(4/2) = 2 snippets
    assert len(hero_slowfast_plan(135, 30, 4.0, 2).snippets) == 2
    assert len(hero_slowfast_plan(135, 30, None, 2).snippets) == 3
    assert len(hero_slowfast_plan(0, 30, 0.0, 2).snippets) == 0
    assert len(hero_slowfast_plan(135, 30, None, 1.5).snippets) == 4  # "3/2": seconds padded to 6
    with pytest.raises(ValueError, match="whole number"):
        hero_slowfast_plan(100, 30, None, clip_len=0.51)


@pytest.mark.parametrize("fps", [25.0, 30000 / 1001, 30.0, 60.0])
@pytest.mark.parametrize("seconds", [3.0, 4.5, 7.37])
def test_protocol_counts_over_frame_rates(fps, seconds):
    """Rows per protocol for videos of several lengths and frame rates, through decode's fps filter."""
    n_src = int(round(seconds * fps))
    starts = np.arange(n_src) / fps
    end = n_src / fps
    # SlowFast: 30 fps slots padded to whole snippets, capped at ceil(duration / clip_len)
    n30 = len(fps_filter(starts, end, 30)[0])
    assert n30 == math.floor(end * 30 + 0.5)
    for clip_len in (1, 2):
        expected = min(math.ceil(n30 / (30 * clip_len)), math.ceil(end / clip_len))
        assert len(hero_slowfast_plan(n30, fps, end, clip_len).snippets) == expected
    # I3D at 24 fps: LGI ceil(T/8) - 1 rows, VSLNet 2 per 24-frame window
    n24 = len(fps_filter(starts, end, 24)[0])
    assert i3d_plan(n24, "lgi").num_rows == math.ceil(n24 / 8) - 1
    assert i3d_plan(n24, "vslnet").num_rows == 2 * math.ceil(n24 / 24)
    # C3D on native frames
    assert c3d_plan(n_src, "clips16", tail="pad").num_rows == math.ceil(n_src / 8)
    assert c3d_plan(n_src, "clips16", tail="drop").num_rows == (n_src - 16) // 8 + 1


# -- I3D ---------------------------------------------------------------------------------------


def test_lgi_whole_video_and_piergiaj_chunks():
    assert lgi_chunks(1600) == [(0, 1600)]
    assert lgi_chunks(3300) == [(1, 1657), (1553, 3257), (3153, 3299)]
    plan = i3d_plan(64, "lgi")
    assert plan.num_rows == 7 and plan.rows[0][0].tolist() == [0, 15] and plan.rows[0][-1].tolist() == [48, 63]
    assert i3d_plan(17, "lgi").num_rows == 2 and i3d_plan(16, "lgi").num_rows == 1
    with pytest.raises(ValueError, match="too short"):
        i3d_plan(8, "lgi")


def test_vslnet_windows_right_aligned_and_last_frame_unused():
    assert vslnet_windows(72) == [(0, 24), (24, 48), (47, 71)]  # end capped at T-1 = 71
    assert vslnet_windows(50) == [(0, 24), (24, 48), (25, 49)]
    plan = i3d_plan(50, "vslnet")
    assert [len(c) for c in plan.snippets] == [24, 24, 24] and plan.num_rows == 6
    windows = np.stack([np.arange(50), np.arange(1, 51)], 1) / 24
    times = plan.row_windows(windows)
    assert np.allclose(times[:2], [[0, 16 / 24], [8 / 24, 24 / 24]])


def test_windows_plan_for_r50():
    plan = windows_plan(70, 8, 8)
    assert len(plan.snippets) == 2 and plan.snippets[0].tolist() == list(range(0, 64, 8))
    assert plan.snippets[1].tolist() == [64, 69, 69, 69, 69, 69, 69, 69]


# -- C3D ---------------------------------------------------------------------------------------


def test_c3d_clip_and_tall_windows():
    assert strided_snippets(40, 16, 8, "drop") == [0, 8, 16, 24]
    assert strided_snippets(40, 16, 8, "pad") == [0, 8, 16, 24, 32]
    assert c3d_plan(40, "clips16").snippets[-1].tolist() == list(range(32, 40)) + [39] * 8
    # 2D-TAN: (N - 64) // 12 + 1 windows starting at i*12; VSLNet/MESM: N - 16 frames, 128/25
    assert tall_windows(300, 64, 12) == [12 * i for i in range((300 - 64) // 12 + 1)]
    assert len(tall_windows(1000, 128, 25, trim=16)) == (1000 - 16 - 128) // 25 + 1
    plan = c3d_plan(300, "tall64")
    assert len(plan.snippets) == 20 and all(len(c) == 64 for c in plan.snippets)
    assert plan.info["stride"] == 12
    with pytest.raises(ValueError, match="too short"):
        c3d_plan(100, "tall128")


def test_lazy_clips_gather_on_demand():
    frames = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    units = make_units(frames, [np.array([0, 2]), np.array([4, 9])])
    assert isinstance(units, LazySnippets) and units.shape == (2, 2, 1, 1, 3) and len(units) == 2
    assert units[1][:, 0, 0, 0].tolist() == [4, 9]
    assert np.asarray(units)[0, :, 0, 0, 0].tolist() == [0, 2]
    ragged = make_units(frames, [np.arange(3), np.arange(5)])
    assert isinstance(ragged, list) and [len(u) for u in ragged] == [3, 5]


# -- per-video facts reach the SlowFast rule ----------------------------------------------------


def test_slowfast_group_takes_video_info_or_the_decode_record(tmp_path):
    from extractors import EXTRACTORS
    from extractors._base import VideoInfo

    ex = EXTRACTORS.get("slowfast")(EXTRACTORS.get("slowfast").Config(clip_len=1))  # group never resizes
    frames = np.zeros((45, 8, 8, 3), np.uint8)
    windows = np.stack([np.arange(45), np.arange(1, 46)], 1) / 30
    units, rows = ex.group(frames, windows, video=VideoInfo("a", 25.0, 1.5))
    assert units.shape == (2, 32, 8, 8, 3) and rows.tolist() == [[0, 1], [1, 2]]
    assert units.index[0].tolist() == hero_fast_positions(25, 30).tolist()
    assert len(ex.group(frames, windows, video=VideoInfo("a", 25.0, 0.9))[0]) == 1  # duration caps
    with pytest.raises(ValueError, match="native fps"):
        ex.group(frames, windows)  # a plain array, no record to find
    # frame-store layout: <store>/<protocol key>/<vid>.npy, record in <store>/videos/<vid>.json
    (tmp_path / "key").mkdir()
    (tmp_path / "videos").mkdir()
    np.save(tmp_path / "key" / "b.npy", frames)
    (tmp_path / "videos" / "b.json").write_text('{"video": "b", "native_fps": 60.0, "stream_duration": 1.2}')
    units, _ = ex.group(np.asarray(np.load(tmp_path / "key" / "b.npy", mmap_mode="r")), windows)
    assert len(units) == 2 and units.index[0].tolist() == hero_fast_positions(60, 30).tolist()
