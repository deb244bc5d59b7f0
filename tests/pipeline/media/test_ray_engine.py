"""The Ray engine on a local Ray instance: the same bytes as the local engine, also when a decode
worker or a model actor dies mid-run, on resume, and with the driver's weights only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from support.ray_local import local_ray
from support.tiny_extractor import PROTOCOL, ReportingStore, Tiny, load_model
from support.videos import write_video

from extractors._base import ExtractorConfig
from pipeline.media.decode import decode_all, list_videos
from pipeline.media.extract import extract_videos
from pipeline.media.framestore import FrameStore
from pipeline.media.ray_engine import (
    Chunks,
    RayOptions,
    RayWeightsError,
    actor_name,
    extract_videos_ray,
)

CONFIG = ExtractorConfig(batch_size=3, device="cpu")
# two actors that reserve no CPU: both of the instance's CPUs run decode tasks
OPTIONS = RayOptions(actors=2, cpus_per_actor=0, videos_ahead=3, max_restarts=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FrameStore:
    root = tmp_path_factory.mktemp("ray_engine")
    (root / "videos").mkdir()
    for i, n in enumerate([31, 20, 45, 12, 38, 26]):  # 6 videos, 4 kept frames per second
        write_video(root / "videos" / f"v{i}.mp4", frames=n, width=32, height=24)
    decode_all(list_videos(root / "videos"), root / "frames", [PROTOCOL], workers=1)
    return FrameStore(root / "frames")


@pytest.fixture(scope="module")
def local(store, tmp_path_factory) -> dict[str, bytes]:
    """The local engine's files: the reference."""
    out = tmp_path_factory.mktemp("local")
    ex = Tiny(CONFIG)
    model, _ = load_model(ex, torch.device("cpu"))
    extract_videos(ex, model, torch.device("cpu"), store, store.video_ids(PROTOCOL.key), out, "random")
    return tree(out)


@pytest.fixture(scope="module")
def ray():
    with local_ray() as ray:
        yield ray


def tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def run_ray(store, out, extractor, weights="random", progress=None, options=OPTIONS):
    ids = store.video_ids(PROTOCOL.key)
    return extract_videos_ray(extractor, load_model, weights, store, ids, out, options,
                              all_video_ids=ids, progress=progress)


def test_same_bytes_as_the_local_engine(ray, store, local, tmp_path):
    summary, devices = run_ray(store, tmp_path, Tiny(CONFIG))
    assert tree(tmp_path) == local
    assert (summary.videos, summary.computed, summary.skipped) == (6, 6, 0) and devices == ["cpu"]
    assert summary.units == sum(len(store.load(v, PROTOCOL.key).frames) for v in store.video_ids(PROTOCOL.key))


def test_an_actor_killed_mid_forward_is_restarted_and_the_run_completes(ray, store, local, tmp_path):
    marker = tmp_path / "killed"
    # the actor that runs a third pass dies inside it (SIGKILL); Ray restarts it and re-sends its passes
    summary, _ = run_ray(store, tmp_path / "out", Tiny(CONFIG, die_in="embed", marker=str(marker), after=2))
    assert marker.exists()
    assert tree(tmp_path / "out") == local and summary.computed == 6


def test_a_decode_worker_killed_is_retried(ray, store, local, tmp_path):
    marker = tmp_path / "killed"
    summary, _ = run_ray(store, tmp_path / "out", Tiny(CONFIG, die_in="group:v3", marker=str(marker)))
    assert marker.exists()
    assert tree(tmp_path / "out") == local and summary.computed == 6


def test_an_actor_killed_from_outside_is_restarted_and_resume_keeps_the_bytes(ray, store, local, tmp_path):
    """ray.kill(..., no_restart=False) after the first written video, on a run that resumes an
    interrupted one (two videos lost their files)."""
    out = tmp_path / "out"
    out.mkdir()
    for name, data in local.items():
        if not name.startswith(("v1.", "v4.")):
            (out / name).write_bytes(data)
    ex = Tiny(CONFIG)
    killed = []

    def kill_an_actor():
        if not killed:
            actor = ray.get_actor(actor_name(ex, 0))
            killed.append(ray.get(actor.pid.remote()))
            ray.kill(actor, no_restart=False)

    summary, _ = run_ray(store, out, ex, progress=kill_an_actor)
    assert killed and tree(out) == local
    assert (summary.computed, summary.skipped) == (2, 4)


def test_an_actor_with_other_weights_than_the_driver_fails_clearly(ray, store, tmp_path):
    with pytest.raises(RayWeightsError, match="differ from the driver's"):
        run_ray(store, tmp_path, Tiny(CONFIG), weights="0" * 64)
    assert not any(tmp_path.glob("*.npy"))


def test_a_missing_frames_file_is_the_local_engines_error(ray, store, tmp_path):
    broken = FrameStore(tmp_path / "frames")
    shutil.copytree(store.root, broken.root)
    broken.frames_path(PROTOCOL.key, "v2").unlink()
    ex = Tiny(CONFIG)
    model, _ = load_model(ex, torch.device("cpu"))
    with pytest.raises(FileNotFoundError) as local_error:
        extract_videos(ex, model, torch.device("cpu"), broken, broken.video_ids(PROTOCOL.key), tmp_path / "a", "random")
    with pytest.raises(FileNotFoundError) as ray_error:  # the worker's error itself, not Ray's wrapper
        run_ray(broken, tmp_path / "b", ex)
    assert type(ray_error.value) is FileNotFoundError and str(ray_error.value) == str(local_error.value)


def test_chunks_map_a_piece_to_slices_of_the_chunks_that_cover_it():
    taken = []

    def generator():  # stands for a decode task's refs: chunks of 3 units
        for name in "abcd":
            taken.append(name)
            yield name

    chunks = Chunks(generator(), chunk=3, count=10)
    assert chunks.segments(1, 2) == [("a", 1, 2)] and taken == ["a"]  # taken only when needed
    assert chunks.segments(2, 8) == [("a", 2, 3), ("b", 0, 3), ("c", 0, 2)]
    assert chunks.segments(9, 10) == [("d", 0, 1)] and taken == list("abcd")
    assert chunks.segments(4, 4) == []


def test_a_video_the_source_reports_as_failed_is_reported_not_written(ray, store, local, tmp_path):
    source = ReportingStore(store.root, broken="v2")
    ex = Tiny(CONFIG)
    model, _ = load_model(ex, torch.device("cpu"))
    ids = store.video_ids(PROTOCOL.key)
    here = extract_videos(ex, model, torch.device("cpu"), source, ids, tmp_path / "local", "random")
    on_ray, _ = run_ray(source, tmp_path / "ray", ex)
    for summary in (here, on_ray):
        assert summary.failed == {"v2": "decoder error at frame 3 (test)"} and summary.computed == 5
    expected = {name: data for name, data in local.items() if not name.startswith("v2.")}
    assert tree(tmp_path / "local") == tree(tmp_path / "ray") == expected
