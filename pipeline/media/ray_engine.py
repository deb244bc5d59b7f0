"""The Ray engine of `vmr extract` (`extract.engine: ray`; docs/cluster.md).

The driver (this process) runs the same batch plan as the local engine (`run_plan`) and writes every
file itself; Ray runs the work:

- per video, a task on a CPU worker runs `video_units` (read the frames, group them into the
  extractor's units) and streams the units into Ray's object store in chunks of `batch_size` units,
  materialising lazy units chunk by chunk; the driver fetches only the units' shapes and windows,
  which is all the plan needs, and hands chunk refs to the actors.
- each forward pass goes to an actor of a pool that built the extractor's model once (one actor per
  GPU, or CPU actors). The actor gathers the pass's units from the object store with `pass_input`
  and runs `forward`, as the local engine does: the same batches, the same arrays, the same torch
  threads, so the same bytes.
- bounded: `videos_ahead` decode tasks run ahead of the plan, and at most two batches per actor
  wait for their forward passes (Ray's object store spills to disk beyond its size).
- a worker that dies is replaced: Ray re-runs its decode task (max_retries), restarts a dead actor
  (max_restarts; it builds the same seeded model again) and re-sends the passes it held
  (max_task_retries).

Ray is an optional extra: this module imports it only when an engine starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.errors import VmrError
from pipeline.media.extract import (
    ExtractSummary,
    Loaded,
    forward,
    pass_input,
    resolve_device,
    run_plan,
    unit_shapes,
    video_units,
)


@dataclass(frozen=True)
class RayOptions:
    """How the work is spread; see `RayParams` in pipeline/core/params.py for each knob."""

    address: str | None = None  # None: start a local Ray instance; else connect ("auto", host:port)
    num_cpus: int | None = None  # CPUs of a local instance (None: the machine's)
    actors: int = 1  # model actors per extractor
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    cpus_per_decode: float = 1.0  # CPUs reserved by each decode task
    videos_ahead: int = 8  # decode tasks submitted ahead of the plan
    max_restarts: int = 3  # per actor, and retries per task


class RayConnectError(VmrError):
    """No Ray cluster answers at `ray.address`."""


class RayWeightsError(VmrError):
    """An actor loaded other weights than the driver checked (a different file on another node)."""


def decode_units(source, extractor, vid: str, chunk: int):
    """Ray task body (a generator): (unit shapes, windows) of one video, then its units in chunks of
    `chunk` units as plain arrays. Lazy units (LazySnippets) gather and resize their frames here, one
    chunk at a time, so the worker never holds a whole video, and the first chunk can run before the
    video is done."""
    units, windows = video_units(source, extractor, vid)
    yield unit_shapes(units), np.asarray(windows)  # shapes without materialising lazy units
    for start in range(0, len(units), chunk):
        part = units[start : start + chunk]
        yield [np.asarray(u) for u in part] if isinstance(part, list) else np.asarray(part)
    # last: why the frames could not be read, from a source that reports failures (known only now)
    yield source.failure(vid) if hasattr(source, "failure") else None


class Chunks:
    """The driver's view of a video's units: the refs of the chunks its decode task has yielded,
    taken from the task's generator as passes need them."""

    def __init__(self, generator, chunk: int, count: int):
        self.generator, self.chunk, self.refs = generator, chunk, []
        self.count = -(-count // chunk)  # chunks the task yields before its last item

    def last(self):
        """The ref of the task's last item (after every chunk)."""
        while len(self.refs) < self.count:
            self.refs.append(next(self.generator))
        return next(self.generator)

    def segments(self, start: int, stop: int) -> list[tuple[object, int, int]]:
        """(chunk ref, start, stop) within each chunk that covers units [start, stop)."""
        out = []
        while start < stop:
            index, offset = divmod(start, self.chunk)
            while len(self.refs) <= index:
                self.refs.append(next(self.generator))
            end = min(stop - start, self.chunk - offset)
            out.append((self.refs[index], offset, offset + end))
            start += end
        return out


class ModelActor:
    """Holds one extractor's model; `make_model(extractor, device) -> (model, weights record)`."""

    def __init__(self, extractor, make_model, weights: str, threads: int):
        torch.set_num_threads(threads)  # the driver's: the same kernels, the same bytes
        self.extractor, self.error = extractor, None
        self.device = resolve_device(extractor.config.device)
        try:
            self.model, record = make_model(extractor, self.device)
            if record != weights:
                raise RayWeightsError(
                    f"{extractor.name}: weights on this node ({record}) differ from the driver's ({weights}): "
                    f"the weights path must hold the same file on every node"
                )
        except (VmrError, OSError) as e:
            # raised by `ready`: Ray keeps a method's exception for the caller, not __init__'s
            self.error = e

    def ready(self) -> str:
        """The device type, once the model is built; the user's error (bad weights) if it was not."""
        if self.error is not None:
            raise self.error
        return self.device.type

    def forward(self, slices: list[tuple[int, int]], *units) -> tuple[np.ndarray, float]:
        parts = [(u, start, stop) for u, (start, stop) in zip(units, slices, strict=True)]
        return forward(self.extractor, self.model, self.device, pass_input(parts))

    def pid(self) -> int:
        return os.getpid()


def _user_error(e: BaseException) -> BaseException | None:
    """The VmrError or OSError behind a Ray task's or actor's failure, if that is what it was."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (VmrError, OSError)) and not type(e).__module__.startswith("ray."):
            return e
        e = getattr(e, "cause", None) or getattr(e, "_cause", None) or e.__cause__
    return None


def actor_name(extractor, index: int) -> str:
    """Actors are named so that operators and tests can find them; each `vmr extract` is its own Ray
    job, whose (anonymous) namespace holds the names."""
    return f"vmr-extract-{extractor.name}-{index}"


class RayEngine:
    """The engine interface of `run_plan` (see pipeline/media/extract.py: LocalEngine) on Ray."""

    def __init__(self, extractor, make_model, weights: str, source, options: RayOptions):
        import ray

        self.ray, self.extractor, self.source = ray, extractor, source
        self.ahead = options.videos_ahead
        self.in_flight = 2 * options.actors  # each actor has the next pass queued while it runs one
        self.chunk = extractor.config.batch_size
        self.chunks: dict[str, Chunks] = {}  # of the loaded videos, until their failure() is read
        self.decode = ray.remote(decode_units).options(num_cpus=options.cpus_per_decode,
                                                       max_retries=options.max_restarts)
        actor = ray.remote(ModelActor)
        threads = torch.get_num_threads()
        self.actors = [
            actor.options(
                name=actor_name(extractor, i), num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor,
                max_restarts=options.max_restarts, max_task_retries=options.max_restarts,
            ).remote(extractor, make_model, weights, threads)
            for i in range(options.actors)
        ]
        try:  # waits for every model: a failed build is reported here, before any video
            self.device_types = sorted(set(self.get([a.ready.remote() for a in self.actors])))
        except BaseException:
            self.close()
            raise
        self.passes = 0

    def load(self, vid: str):
        return vid, self.decode.remote(self.source, self.extractor, vid, self.chunk)

    def loaded(self, handle) -> Loaded:
        vid, generator = handle
        shapes, windows = self.get(next(generator))
        self.chunks[vid] = Chunks(generator, self.chunk, len(shapes))
        return Loaded(self.chunks[vid], shapes, windows)

    def failure(self, vid: str) -> str | None:
        """The source's failure report for a loaded video, from its decode task's last item."""
        return self.get(self.chunks.pop(vid).last())

    def forward(self, parts: list[tuple]):
        # the pass's units as slices of chunks, in order: concatenated, the same array as the local
        # engine's (pass_input of the pieces)
        segments = [seg for chunks, start, stop in parts for seg in chunks.segments(start, stop)]
        actor = self.actors[self.passes % len(self.actors)]  # passes are alike: round robin
        self.passes += 1
        return actor.forward.remote([(a, b) for _, a, b in segments], *(ref for ref, _, _ in segments))

    def result(self, handle) -> tuple[np.ndarray, float]:
        return self.get(handle)

    def get(self, refs):
        """ray.get, with the user's error (bad frames, bad weights) raised as the local engine would."""
        errors = self.ray.exceptions
        try:
            return self.ray.get(refs)
        except (errors.RayTaskError, errors.RayActorError) as e:
            cause = _user_error(e)
            if cause is None:
                raise
            raise cause from None

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def connect(options: RayOptions) -> bool:
    """Join the cluster at `options.address`, or start a local instance; False if Ray already runs
    in this process (then the caller's instance is used and left running)."""
    import ray

    if ray.is_initialized():
        return False
    if options.address is None:
        ray.init(num_cpus=options.num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        try:
            ray.init(address=options.address, log_to_driver=False)
        except ConnectionError as e:
            raise RayConnectError(f"cannot connect to the Ray cluster at {options.address!r} (params "
                                  f"`ray.address`): {str(e).splitlines()[0]}") from None
    return True


def extract_videos_ray(
    extractor,
    make_model,
    weights: str,
    store,
    video_ids: list[str],
    out_dir,
    options: RayOptions,
    all_video_ids: list[str] | None = None,
    progress=None,
) -> tuple[ExtractSummary, list[str]]:
    """`extract_videos` on Ray: the same files. Returns the summary and the actors' device types."""
    import ray

    started = connect(options)
    try:
        engine = RayEngine(extractor, make_model, weights, store, options)
        try:
            summary = run_plan(engine, extractor, store, video_ids, out_dir, weights, all_video_ids, progress)
        finally:
            engine.close()
        return summary, engine.device_types
    finally:
        if started:
            ray.shutdown()
