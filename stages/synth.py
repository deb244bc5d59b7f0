"""Stage `synth`: generate the synthetic default dataset."""

from __future__ import annotations

from pipeline.core import provenance
from pipeline.core.codedeps import stage_code
from pipeline.core.params import Params, subset
from pipeline.core.progress import log
from pipeline.media import synth


def run(params: Params, source: str) -> None:
    p = params.synth
    cfg = synth.SynthConfig(
        seed=p.seed, num_train=p.num_train, num_test=p.num_test, fps=p.fps, width=p.width,
        height=p.height, min_duration=p.min_duration, max_duration=p.max_duration,
        min_events=p.min_events, max_events=p.max_events, glove_dim=p.glove_dim,
    )
    manifest = synth.generate(cfg, p.out_dir)
    record = provenance.make_record(
        "synth", subset(params, "synth"), extra={"raw": True}, code=stage_code("synth")
    )
    provenance.write_record(p.out_dir, record)
    n_events = sum(len(v["events"]) for v in manifest["videos"].values())
    log(f"synth: {len(manifest['videos'])} videos, {n_events} captioned moments -> {p.out_dir}")
