"""Which protocols' frames `vmr decode` stores (`decode.store_frames`, stages/decode.py::stored_for)."""

from __future__ import annotations

from pathlib import Path

import pytest

from extractors import EXTRACTORS
from models import MODELS
from pipeline.core.params import load_params
from stages.decode import stored_for

REPO = Path(__file__).resolve().parents[2]


def keys(params, *features: str) -> set[str]:
    return {EXTRACTORS.get(f)(EXTRACTORS.config(params, f)).protocol().key for f in features}


def load(*overrides: str):
    return load_params(REPO / "params.yaml", list(overrides), registries=(EXTRACTORS, MODELS))


@pytest.mark.parametrize("policy, stored", [
    ("sparse", {"clip"}),  # 1 frame/s; VGG 8 fps, SlowFast 30 fps, C3D every frame, CLIP every 8th: replayed
    ("none", set()),
    ("all", {"clip", "vgg", "slowfast", "c3d"}),
])
def test_store_frames_policy(policy, stored):
    params = load('features=["clip", "vgg", "slowfast", "c3d"]', f"decode.store_frames={policy}")
    assert stored_for(params) == keys(params, *stored)


def test_sparse_is_at_most_one_frame_per_second():
    two_s = load('features=["clip"]', "extractors.clip.clip_len=2")  # QVHighlights: 0.5 frame/s
    assert stored_for(two_s) == keys(two_s, "clip")
    every8 = load('features=["clip"]', "extractors.clip.sampling=every_n")  # CNM: 1 in 8 native frames
    assert stored_for(every8) == set()


def test_frames_of_pixel_models_are_always_stored():
    params = load('features=["clip"]', 'models=["glscl"]', "model.glscl.input=frames",
                  "dataset.video_captions=captions.json", "decode.store_frames=none")
    glscl = MODELS.get("glscl")
    key = glscl.needs(MODELS.config(params, "glscl"), params.dataset).frames.key
    assert stored_for(params) == {key}
