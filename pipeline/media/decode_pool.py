"""Worker processes for decode: one task at a time each, with a per-task timeout, kills and recycling.

decord 0.6 leaks memory per reader and can deadlock holding the GIL (dmlc/decord#373), so a task that
runs past its timeout gets its worker killed (SIGKILL: a deadlocked thread holding the GIL cannot be
interrupted) and replaced, a worker that dies is replaced, and every worker is retired after
`recycle_after` tasks. Failures come back as results, never as exceptions: one bad video must not stop
the others.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any


class TaskError(Exception):
    """A task failure whose message is the whole reason (other exceptions are reported with their type)."""


# decord (dmlc-core) starts its messages with the wall-clock time, e.g. "[18:40:07] src/...": a
# reason that changes on every run would make failures.json and the records irreproducible.
_LOG_TIME_PREFIX = re.compile(r"\[\d{2}:\d{2}:\d{2}\] ")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (C++ libraries append pages of context), without a
    log-time prefix, capped."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return _LOG_TIME_PREFIX.sub("", line)[:300]


@dataclass
class PoolResult:
    task: Any
    status: str  # "ok" | "failed"
    value: Any  # the function's result, or the failure reason


@dataclass
class _Worker:
    process: Any
    conn: Any
    done: int = 0  # tasks finished, for recycling
    task: Any = None  # the task it runs now; None when idle
    started: float = 0.0  # time.monotonic() when `task` was handed out


def _worker_main(conn, fn: Callable[[Any], Any]) -> None:
    """Run tasks from the pipe until told to stop (None); every task answers ("ok" | "failed", value)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    while True:
        task = conn.recv()
        if task is None:
            return
        try:
            conn.send(("ok", fn(task)))
        except TaskError as e:
            conn.send(("failed", str(e)))
        except Exception as e:  # anything else about this one task: report it, keep working
            conn.send(("failed", f"{type(e).__name__}: {first_line(e)}"))


def _start_worker(ctx, fn: Callable[[Any], Any]) -> _Worker:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker_main, args=(child, fn), daemon=True)
    proc.start()
    child.close()
    return _Worker(proc, parent)


def _stop_worker(w: _Worker, kill: bool = False) -> None:
    """Ask the worker to exit (or kill it), and kill it anyway if it has not exited within 10 s."""
    if kill:
        w.process.kill()
    else:
        try:
            w.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
    w.process.join(timeout=10)
    if w.process.is_alive():
        w.process.kill()
        w.process.join()
    w.conn.close()


def run_pool(
    fn: Callable[[Any], Any],
    tasks: Iterable[Any],
    workers: int,
    timeout_s: float,
    recycle_after: int,
    preload: tuple[str, ...] = (),
) -> Iterator[PoolResult]:
    """Run `fn(task)` in `workers` processes; yields results as they finish (any order).

    A task running longer than `timeout_s` gets its worker killed and is reported as failed; a worker
    that dies is replaced; a worker is retired after `recycle_after` tasks. `fn` must be picklable (a
    module-level function).

    Workers are forked from multiprocessing's fork server: a fresh single-threaded Python process
    (nothing inherited from the parent: no decord/torch state, no threads), started once per parent
    process, that has imported the main module, this module and `preload` (the module of `fn` and the
    libraries it uses). Starting or replacing a worker then costs a fork instead of a new interpreter
    plus its imports (0.2-0.35 s of CPU each).
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__, *preload])  # no effect once the server runs
    pending = list(tasks)[::-1]
    pool: list[_Worker] = []

    def retire(w: _Worker, kill: bool = False) -> None:
        _stop_worker(w, kill)
        pool.remove(w)

    try:
        while pending or any(w.task is not None for w in pool):
            # hand out work
            while pending and (len(pool) < workers or any(w.task is None for w in pool)):
                idle = next((w for w in pool if w.task is None), None)
                if idle is None:
                    idle = _start_worker(ctx, fn)
                    pool.append(idle)
                idle.task, idle.started = pending.pop(), time.monotonic()
                idle.conn.send(idle.task)
            busy = [w for w in pool if w.task is not None]
            deadline = min(w.started for w in busy) + timeout_s
            ready = wait([w.conn for w in busy], timeout=max(0.0, deadline - time.monotonic()))
            for w in busy:
                if w.conn in ready:
                    try:
                        status, value = w.conn.recv()
                    except (EOFError, OSError):
                        code = w.process.exitcode if not w.process.is_alive() else None
                        task, w.task = w.task, None
                        retire(w, kill=True)
                        yield PoolResult(task, "failed", f"worker crashed (exit code {code})")
                        continue
                    task, w.task = w.task, None
                    w.done += 1
                    if w.done >= recycle_after:
                        retire(w)
                    yield PoolResult(task, status, value)
                elif time.monotonic() - w.started >= timeout_s:
                    task, w.task = w.task, None
                    retire(w, kill=True)
                    yield PoolResult(task, "failed", f"timed out after {timeout_s:g} s (worker killed)")
    finally:
        for w in list(pool):
            retire(w, kill=w.task is not None)
