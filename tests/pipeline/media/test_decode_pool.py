"""The decode worker pool: timeouts, crashes, recycling and failure reasons."""

from __future__ import annotations

import os
import time

from pipeline.media.decode_pool import TaskError, run_pool


def _sleepy(task):
    if task == "hang":
        time.sleep(60)
    if task == "crash":
        os._exit(3)
    return (task, os.getpid())


def _failing(task):
    if task == "expected":
        raise TaskError("no video stream\nsecond line kept")
    raise ValueError("bad value\nC++ context nobody needs")


def test_pool_times_out_hung_tasks_and_survives_crashes():
    t0 = time.monotonic()
    results = list(run_pool(_sleepy, ["a", "hang", "b", "crash", "c"], workers=2, timeout_s=3, recycle_after=100))
    assert time.monotonic() - t0 < 30
    by_task = {r.task: r for r in results}
    assert by_task["hang"].status == "failed" and "timed out after 3 s" in by_task["hang"].value
    assert by_task["crash"].status == "failed" and "worker crashed" in by_task["crash"].value
    assert all(by_task[t].status == "ok" for t in "abc")


def test_pool_recycles_workers():
    results = list(run_pool(_sleepy, list("abcd"), workers=1, timeout_s=30, recycle_after=2))
    pids = [r.value[1] for r in sorted(results, key=lambda r: r.task)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]


def test_failure_reasons():
    """A TaskError's message is the whole reason; anything else is its type and first line."""
    results = list(run_pool(_failing, ["expected", "other"], workers=1, timeout_s=30, recycle_after=100))
    reasons = {r.task: (r.status, r.value) for r in results}
    assert reasons == {
        "expected": ("failed", "no video stream\nsecond line kept"),
        "other": ("failed", "ValueError: bad value"),
    }


def test_failure_reasons_carry_no_wall_clock_time():
    from pipeline.media.decode_pool import first_line

    # decord's (dmlc-core's) messages start with the time of day: failures.json would change every run
    e = RuntimeError("[18:40:07] /github/workspace/src/video/video_reader.cc:151: Error reading\nmore context")
    assert first_line(e) == "/github/workspace/src/video/video_reader.cc:151: Error reading"
