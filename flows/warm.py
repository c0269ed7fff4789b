"""Worker processes that are ready when the flow needs them, and gone when it is done.

A stage's first task waits for its worker to start Python and import Prefect, torch, transformers and TRL (about 7 s
here); the flow process meanwhile imports Prefect and MLflow, finds the Prefect server and creates its flow run
(about 4 s). Done one after the other (Prefect's ``ProcessPoolTaskRunner`` spawns its workers on the first submit),
they add up. ``start_warm_pool`` spawns the workers first — before the flow process imports Prefect — and has each
import what the stages it will run need, so the two overlap; ``WarmProcessPoolTaskRunner`` is Prefect's process pool
task runner that takes that pool over instead of starting its own (one made without a warm pool behaves as Prefect's).

On exit the runner does not wait for its workers to shut down (Prefect's ``cancel_all`` joins them: about 5 s of
interpreter and torch teardown a worker spends after its last task): every task future is resolved by then and a
worker's events and logs were flushed to the flow before its task returned, so the workers are stopped instead.
"""

from __future__ import annotations

import importlib
import multiprocessing
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterable

_POOL: "WarmPool | None" = None
_LOCK = threading.Lock()


def _initialize(queue: Any, initializer: Callable[..., None] | None, initargs: tuple,
                preload: tuple[str, ...] = ()) -> None:
    """In the worker: the user initializer first (it imports torch), then Prefect's own worker set-up (forwarding
    events and API logs to the flow through ``queue``), exactly as Prefect's runner would, then ``preload``: modules
    to import, or ``module:function`` to call."""
    import signal

    from prefect.task_runners import _initialize_process_pool_worker

    signal.signal(signal.SIGTERM, _exit_now)
    if initializer is not None:
        initializer(*initargs)
    _initialize_process_pool_worker(queue)
    for entry in preload:  # a module, or module:function to call
        module, _, function = entry.partition(":")
        try:
            imported = importlib.import_module(module)
            if function:
                getattr(imported, function)()
        except Exception:  # noqa: BLE001 - only a head start: the task that needs it meets the same error, and says it
            continue


def _exit_now(*_: Any) -> None:
    """A stopped worker's SIGTERM: release its multiprocessing locks (tqdm makes one; left alone, the resource
    tracker would warn of a "leaked semaphore") and exit without the rest of the interpreter's teardown."""
    import os
    from multiprocessing import util

    util._run_finalizers(0)
    os._exit(0)


def _spawned() -> None:
    """Nothing: a call that makes the pool spawn a worker (it spawns them as calls arrive, not before)."""


class WarmPool:
    """A spawned process pool whose workers are importing ``preload`` already; claimed by one task runner."""

    def __init__(self, workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 preload: Iterable[str] = ()):
        context = multiprocessing.get_context("spawn")  # as Prefect's runner: no shared state with the flow process
        self.workers = workers
        self.queue = context.Queue()
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_initialize,
                                            initargs=(self.queue, initializer, initargs, tuple(preload)))
        # one call per worker: the pool spawns a process for each call it cannot give to an idle one
        self.warming: list[Future] = [self.executor.submit(_spawned) for _ in range(workers)]

    @property
    def pids(self) -> set[int]:
        return set(getattr(self.executor, "_processes", None) or {})

    def stop(self, close_queue: bool = True) -> None:
        """Stop the workers without waiting for their teardown; pending calls are cancelled. A task runner that
        forwards the queue's messages closes it itself, after its forwarding thread has read them all."""
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=5)
        if close_queue:
            self.queue.close()


def start_warm_pool(workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = (),
                    preload: Iterable[str] = ()) -> WarmPool:
    """Spawn the pool the next ``WarmProcessPoolTaskRunner`` with ``workers`` workers will use (one at a time)."""
    global _POOL
    with _LOCK:
        if _POOL is not None:
            _POOL.stop()
        _POOL = WarmPool(workers, initializer, initargs, preload)
        return _POOL


def discard_warm_pool() -> None:
    """Stop a warm pool no runner claimed (the flow failed before it started its task runner)."""
    global _POOL
    with _LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.stop()


def _claim(workers: int) -> WarmPool | None:
    global _POOL
    with _LOCK:
        pool = _POOL if _POOL is not None and _POOL.workers == workers else None
        if pool is not None:
            _POOL = None
        return pool


def _base():
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner


def make_task_runner(workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()):
    """A ``WarmProcessPoolTaskRunner`` (the class is built on first use: importing Prefect costs seconds)."""
    return _runner_class()(max_workers=workers, initializer=initializer, initargs=initargs)


_RUNNER: type | None = None


def _runner_class() -> type:
    global _RUNNER
    if _RUNNER is None:
        base = _base()

        class WarmProcessPoolTaskRunner(base):
            """Prefect's ``ProcessPoolTaskRunner`` on a warm pool (``start_warm_pool``) when there is one for as many
            workers, on a pool of its own otherwise; its workers are stopped, not waited for, on exit."""

            def __enter__(self):
                pool = _claim(self._max_workers)
                if pool is None:
                    # Prefect's own: workers spawned as tasks arrive. A stage task's process enters a copy of the
                    # flow's runner (Prefect's hydrated_context) that never runs a task: a pool spawned there
                    # at once would start a process per stage that competes with the stage for the cores
                    return super().__enter__()
                self._pool = pool
                # what ProcessPoolTaskRunner.__enter__ does, on the warm pool's executor and message queue
                super(base, self).__enter__()
                self._subprocess_message_queue = pool.queue
                self._message_forwarding_thread = threading.Thread(
                    target=self._forward_subprocess_messages, name="ProcessPoolTaskRunnerMessageForwarder",
                    daemon=True)
                self._message_forwarding_thread.start()
                self._executor = pool.executor
                from concurrent.futures import ThreadPoolExecutor

                self._resolver_executor = ThreadPoolExecutor(max_workers=self._max_workers)
                return self

            def __exit__(self, exc_type, exc_value, traceback):
                pool = getattr(self, "_pool", None)
                if pool is not None:
                    self._executor = None  # cancel_all would join the workers: stop them instead
                    pool.stop(close_queue=False)
                    self._pool = None
                super().__exit__(exc_type, exc_value, traceback)

        WarmProcessPoolTaskRunner.__module__ = __name__
        globals()["WarmProcessPoolTaskRunner"] = WarmProcessPoolTaskRunner
        _RUNNER = WarmProcessPoolTaskRunner
    return _RUNNER
