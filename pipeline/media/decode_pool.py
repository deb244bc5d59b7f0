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


# -- one task's items, streamed -----------------------------------------------------------------------


def _stream_main(queue, fn: Callable[[Any], Iterable[Any]], task: Any) -> None:
    """Put ("item", x) for every item of `fn(task)`, then ("end", None), or ("failed", reason)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        for item in fn(task):
            queue.put(("item", item))
        queue.put(("end", None))
    except TaskError as e:
        queue.put(("failed", str(e)))
    except Exception as e:
        queue.put(("failed", f"{type(e).__name__}: {first_line(e)}"))


class Stream:
    """The items of a generator `fn(task)` run in a worker process, through a bounded queue.

    The worker runs ahead of the reader by at most `max_items` items, then blocks: memory is bounded
    whatever the number of items. The discipline of `run_pool` holds: the worker is forked from the
    same fork server (with `preload`), a worker that gives no item for `timeout_s` while the reader
    waits is killed (SIGKILL: decord can deadlock holding the GIL), and a worker that dies or fails
    makes `next()` raise TaskError with the reason. `close()` kills a worker that is not finished.
    """

    def __init__(self, fn: Callable[[Any], Iterable[Any]], task: Any, max_items: int, timeout_s: float,
                 preload: tuple[str, ...] = ()):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", __name__, *preload])  # no effect once the server runs
        self.timeout_s = timeout_s
        self.queue = ctx.Queue(maxsize=max(1, max_items))
        self.process = ctx.Process(target=_stream_main, args=(self.queue, fn, task), daemon=True)
        self.process.start()
        self.finished = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        import queue

        if self.finished:
            raise StopIteration
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:  # wake up every second to see whether the worker is still alive
                kind, value = self.queue.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                break
            except queue.Empty:
                if not self.process.is_alive():
                    try:  # its last items may have arrived meanwhile
                        kind, value = self.queue.get(timeout=0.1)
                        break
                    except queue.Empty:
                        code = self.process.exitcode
                        self.close()
                        raise TaskError(f"worker crashed (exit code {code})") from None
                if time.monotonic() >= deadline:
                    self.close()
                    raise TaskError(f"timed out after {self.timeout_s:g} s waiting for the next frame "
                                    "(worker killed)") from None
        if kind == "item":
            return value
        self.close()
        if kind == "end":
            raise StopIteration
        raise TaskError(value)

    def close(self) -> None:
        """Stop the worker (killed unless it has finished) and release the queue."""
        self.finished = True
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.queue.close()
        self.queue.cancel_join_thread()

    def __del__(self) -> None:  # a reader dropped mid-stream must not leave a blocked worker behind
        try:
            if not self.finished:
                self.close()
        except Exception:
            pass
