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

Where the platform has it (Linux, macOS), the workers are forked from multiprocessing's fork server, which this
process starts once, on its first warm pool, with the heavy libraries (``FORK_PRELOAD``) imported: the first pool's
workers wait for that import (once, not once per worker: on 2 cores two spawned workers each importing torch took the
cores from each other and from the flow process), and every later pool of the process — a sweep's points, the studies
of a notebook or a test session, ``bench/overhead.py``'s repeats — starts its workers in milliseconds, with nothing to
import. The fork server imported the project's modules as they were on disk then, under the environment of then: a
pool started after either changed (``fork_fingerprint``) restarts it first, so a worker never runs stale code under a
new code-aware cache key. Each worker takes the flow process's current environment and working directory.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
_POOL: "WarmPool | None" = None
_LOCK = threading.Lock()


# what the fork server imports once for every worker it forks: what any stage's worker imports first; flows.forked
# last (it prepares the MLflow store's models and freezes the garbage collector's view of all of it)
FORK_PRELOAD = ("torch", "transformers", "trl", "peft", "prefect.task_engine", "prefect.task_runners", "mlflow",
                "tasks.common", "tasks.metrics", "roads.training", "flows.forked")
# the environment variables the fork server's imports may read (Hugging Face's offline and cache settings, torch's
# and the BLAS libraries' threads and devices, Prefect's logging, TQDM_DISABLE, ...): a change restarts the fork server.
# The rest is read when called — and a worker is given the flow process's values — or set by a library at run time
# (torch sets TORCHINDUCTOR_CACHE_DIR in the flow process), so it does not restart it; nor do CALL_TIME_ENV, which
# change from one test or bench run to the next.
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DATASETS_", "TOKENIZERS_", "TRL_", "PEFT_", "ACCELERATE_",
                   "TORCH_", "PYTORCH_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "PREFECT_",
                   "MLFLOW_", "TQDM_", "PYTHON", "LD_", "DO_NOT_TRACK", "ROADS_", "WANDB_", "RAY_")
CALL_TIME_ENV = frozenset({"ROADS_HOME", "PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"})
_FORK_SERVED: str | None = None  # fork_fingerprint() of the running fork server, None before it starts


def _initialize(queue: Any, initializer: Callable[..., None] | None, initargs: tuple,
                preload: tuple[str, ...] = (), environ: dict[str, str] | None = None,
                started: Any = None, workers: int = 1) -> None:
    """In the worker: the flow process's environment (``environ``: a forked worker inherits the fork server's),
    the user initializer (it imports torch), then Prefect's own worker set-up (forwarding events and API logs to the
    flow through ``queue``), exactly as Prefect's runner would, then ``preload``: modules to import, or
    ``module:function`` to call. Last, it counts itself in ``started`` and waits (at most ``WARM_WAIT`` s) until
    ``workers`` have: the pool spawns a worker for a call only when none is idle, and a worker forked in milliseconds
    that ran its warming call before the next was submitted took that one too — a pool of 2 started 1 worker
    (seen once in CI)."""
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
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
    if started is not None:
        with started.get_lock():
            started.value += 1
        deadline = time.monotonic() + WARM_WAIT
        while started.value < workers and time.monotonic() < deadline:  # a worker started later passes at once
            time.sleep(0.005)


WARM_WAIT = 60.0  # seconds a warm worker waits for the pool's others to start (a spawned worker imports for seconds)


def _exit_now(*_: Any) -> None:
    """A stopped worker's SIGTERM: release its multiprocessing locks (tqdm makes one; left alone, the resource
    tracker would warn of a "leaked semaphore") and exit without the rest of the interpreter's teardown."""
    import os
    from multiprocessing import util

    util._run_finalizers(0)
    os._exit(0)


def _spawned() -> None:
    """Nothing: a call that makes the pool spawn a worker (it spawns them as calls arrive, not before)."""


def fork_fingerprint() -> str:
    """What the fork server's imports depend on: the project's modules (path, size, modification time), the
    installed distributions, the interpreter and its search path, and the ``IMPORT_TIME_ENV`` variables less
    ``CALL_TIME_ENV``. About a millisecond: it is checked at every warm pool."""
    # a relative entry of the search path ('' under `python -c`) is the working directory: it counts as such
    digest = hashlib.sha256(f"{sys.executable}\n{[os.path.abspath(p) for p in sys.path]}".encode())
    for folder in ("roads", "tasks", "flows"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    for entry in sys.path:
        if entry.endswith("-packages") and os.path.isdir(entry):  # a distribution's version is in its folder's name
            digest.update("\n".join(sorted(os.listdir(entry))).encode())
    digest.update(repr(sorted((k, v) for k, v in os.environ.items()
                              if k.startswith(IMPORT_TIME_ENV) and k not in CALL_TIME_ENV)).encode())
    return digest.hexdigest()


def _context():
    """The fork server context, (re)started for the current code and environment when a worker is next started;
    spawn where the platform has no fork server (Windows)."""
    global _FORK_SERVED
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")  # as Prefect's runner: no shared state with the flow process
    context = multiprocessing.get_context("forkserver")
    fingerprint = fork_fingerprint()
    if fingerprint != _FORK_SERVED:
        restart_fork_server()
        context.set_forkserver_preload(list(FORK_PRELOAD))
        _FORK_SERVED = fingerprint
        atexit.unregister(_end_fork_server)  # once
        atexit.register(_end_fork_server)
    return context


def _end_fork_server() -> None:
    """At exit: end the fork server at once (left alone, one still importing FORK_PRELOAD when this process ends —
    a study that failed early — goes on importing for seconds before it notices)."""
    from multiprocessing import forkserver

    pid = forkserver._forkserver._forkserver_pid
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


def _stop_fork_server(server: Any) -> None:
    """Stop a fork server without waiting for it: it exits once the workers it forked (which hold the same "alive"
    pipe) are gone; a thread reaps it."""
    with server._lock:
        pid, fd = server._forkserver_pid, server._forkserver_alive_fd
        if pid is None:
            return
        os.close(fd)
        address = server._forkserver_address
        server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
    try:
        os.unlink(address)
    except (OSError, TypeError):
        pass
    threading.Thread(target=_reap, args=(pid,), name="roads-forkserver-reaper", daemon=True).start()


def restart_fork_server() -> None:
    """Stop the fork server: the next warm pool starts a new one (it imports FORK_PRELOAD again)."""
    global _FORK_SERVED
    from multiprocessing import forkserver

    _stop_fork_server(forkserver._forkserver)
    _FORK_SERVED = None


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


class WarmPool:
    """A process pool whose workers are starting already (forked from the fork server, or spawned where there is
    none) and importing ``preload``; claimed by one task runner."""

    def __init__(self, workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 preload: Iterable[str] = ()):
        context = _context()
        self.workers = workers
        self.queue = context.Queue()
        self.started = context.Value("i", 0)  # workers through _initialize: each waits for all of them
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_initialize,
                                            initargs=(self.queue, initializer, initargs, tuple(preload),
                                                      dict(os.environ), self.started, workers))
        # one call per worker: the pool starts a process for each call it cannot give to an idle one. Starting the
        # first waits until the fork server has imported FORK_PRELOAD: a thread does it, so that this process goes on
        # with its own start (importing Prefect, creating the flow run) meanwhile
        self._warming: list[Future] = []
        self._starter = threading.Thread(target=self._start, name="roads-warm-pool", daemon=True)
        self._starter.start()

    def _start(self) -> None:
        try:
            for _ in range(self.workers):
                self._warming.append(self.executor.submit(_spawned))
        except RuntimeError:  # stopped before its workers started
            pass

    @property
    def warming(self) -> list[Future]:
        """One call per worker, done when that worker has started and run its initializer."""
        self._starter.join()
        return self._warming

    @property
    def pids(self) -> set[int]:
        return set(getattr(self.executor, "_processes", None) or {})

    def stop(self, close_queue: bool = True) -> None:
        """Stop the workers without waiting for their teardown; pending calls are cancelled. A task runner that
        forwards the queue's messages closes it itself, after its forwarding thread has read them all."""
        self._starter.join()
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
