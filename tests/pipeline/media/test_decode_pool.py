"""The decode worker pool: timeouts, crashes, recycling and failure reasons."""

from __future__ import annotations

import os
import re
import time

import pytest

from pipeline.media.decode_pool import Stream, TaskError, run_pool


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


def _counting(task):
    """Items 0..n-1; writes how many it has made so far to `path` (to see how far it runs ahead)."""
    path, n, mode = task
    for i in range(n):
        if mode == "hang" and i == 2:
            time.sleep(60)
        if mode == "crash" and i == 2:
            os._exit(5)
        if mode == "fail" and i == 2:
            raise TaskError("frame 2 is broken")
        with open(path, "w") as fh:
            fh.write(str(i + 1))
        yield i


def test_stream_is_bounded_and_in_order(tmp_path):
    made = tmp_path / "made"
    stream = Stream(_counting, (str(made), 100, "ok"), max_items=4, timeout_s=30)
    assert next(stream) == 0
    time.sleep(1.5)  # the worker fills the queue and waits
    assert int(made.read_text()) <= 1 + 4 + 1  # consumed + queued + one blocked in put
    assert list(stream) == list(range(1, 100))
    stream.close()


def test_stream_reports_hangs_crashes_and_failures(tmp_path):
    for mode, reason in [("hang", "timed out after 2 s"), ("crash", "worker crashed (exit code 5)"),
                         ("fail", "frame 2 is broken")]:
        stream = Stream(_counting, (str(tmp_path / mode), 10, mode), max_items=4, timeout_s=2)
        got = []
        with pytest.raises(TaskError, match=re.escape(reason)):
            for item in stream:
                got.append(item)
        # a crash may lose the items still in the worker's queue thread: they fail with the video
        assert got == [0, 1] if mode != "crash" else got == [0, 1][: len(got)]
        assert not stream.process.is_alive()
