"""A tiny extractor for engine tests (a small conv net on 8x8 frames), and hooks that kill the
process running it once: a decode worker (in `group`) or a model actor (in `embed`).

A hook fires once per marker file across all processes (created with O_EXCL), so the retry that
Ray makes succeeds. Hooks are instance attributes: they travel with the pickled extractor and stay
out of its description, so a run that lost a worker writes the same bytes as one that did not."""

from __future__ import annotations

import os
import signal

import torch

from extractors._base import Extractor, SamplingProtocol
from pipeline.media.framestore import FrameStore

PROTOCOL = SamplingProtocol(rule="fps_filter", rate=4.0, short_side=8, crop=8)


class Tiny(Extractor):
    name = "tiny"
    dim = 6

    def __init__(self, config=None, die_in: str | None = None, marker: str | None = None, after: int = 0):
        """die_in: "group:<video id>" kills the decode worker of that video; "embed" kills the
        actor in the forward pass after `after` passes of that process."""
        super().__init__(config)
        self.die_in, self.marker, self.after = die_in, marker, after
        self.calls = 0

    def protocol(self):
        return PROTOCOL

    def group(self, frames, windows, video=None):
        self._maybe_die(f"group:{video.video_id if video else ''}")
        return frames, windows

    def build_model(self):
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(5 * 6 * 6, self.dim)
        )

    def load_weights(self, model, path):
        model.load_state_dict(torch.load(path, weights_only=True))

    def preprocess(self, units):
        return units.permute(0, 3, 1, 2).float() / 255

    def embed(self, model, x):
        self._maybe_die("embed")
        return model(x)

    def _maybe_die(self, where: str) -> None:
        if where != self.die_in:
            return
        self.calls += 1
        if self.calls <= self.after:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return  # fired already: this is the retry
        os.kill(os.getpid(), signal.SIGKILL)


def load_model(extractor, device):
    """As stages/extract.py::load_model (seeded build on `device`), for an extractor outside the registry."""
    torch.manual_seed(extractor.config.seed)
    return extractor.build_model().eval().to(device), "random"


def register(monkeypatch) -> None:
    """Make `tiny` a registered extractor for CLI tests. Its code lives in tests/, outside the
    project, so the stages' code-dependency lists (provenance) leave it out."""
    import stages.decode
    import stages.extract
    from extractors import EXTRACTORS
    from pipeline.core.codedeps import stage_code

    EXTRACTORS.names()  # the real ones first
    monkeypatch.setitem(EXTRACTORS._members, "tiny", Tiny)
    # members are classes or module names (`Registry.modules`)
    project_only = lambda stage, members=(): stage_code(  # noqa: E731
        stage, [m for m in members if m is not Tiny and m != Tiny.__module__])
    for module in (stages.decode, stages.extract):
        monkeypatch.setattr(module, "stage_code", project_only)


class ReportingStore(FrameStore):
    """A frame store that reports `broken` as failed (as a replaying source does for a video it could
    not decode to the end) instead of raising."""

    def __init__(self, root, broken: str):
        super().__init__(root)
        self.broken = broken

    def failure(self, vid: str) -> str | None:
        return "decoder error at frame 3 (test)" if vid == self.broken else None
