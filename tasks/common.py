"""What every stage task shares: the cache key, the stale-record check, and the tracker that writes per-step metrics
to the stage's MLflow child run and progress lines to the Prefect log.

The cache key and the records are in ``tasks/keys.py`` (Prefect-free): stage name + VERSION + config fingerprint +
input digests + a digest of the library code the stage reaches (Prefect's TASK_SOURCE would hash only the thin task
body). Results are small JSON documents naming the content-addressed output folder; a record whose folder is gone is
deleted before Prefect looks, so it reruns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem

from roads.artifacts import ArtifactRef
from roads.config import StageSpec
from tasks.keys import cache_key, read_record, results_dir
from tasks.metrics import RANK_METRICS, MlflowMetrics
from tasks.steps import clear_step, write_step


class AtomicLocalFileSystem(LocalFileSystem):
    """Prefect's local result storage, but a record is written to a temporary file and renamed into place: two
    studies sharing one store (concurrent sweeps) never read each other's half-written cache records."""

    _block_type_name = "Roads Atomic Local File System"

    def _atomic_write(self, path: str, content: bytes) -> str:
        target = Path(self._resolve_path(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_bytes(content)
        os.replace(tmp, target)
        return str(target)

    def write_path(self, path: str, content: bytes, **_: Any) -> str:  # Prefect may pass _sync=True
        return self._atomic_write(path, content)

    async def awrite_path(self, path: str, content: bytes, **_: Any) -> str:
        return self._atomic_write(path, content)


def result_storage() -> AtomicLocalFileSystem:
    """Where the stage tasks' cache records live: ``results_dir()``, read when the study starts. Prefect wants a
    task's storage block saved on its server: it is saved once per folder (and API) under a name from the path."""
    folder = str(results_dir().resolve())
    return _saved_storage(folder, os.environ.get("PREFECT_API_URL", ""))


@lru_cache(maxsize=8)
def _saved_storage(folder: str, api: str) -> AtomicLocalFileSystem:
    from prefect.exceptions import ObjectAlreadyExists

    block = AtomicLocalFileSystem(basepath=folder)
    name = f"roads-results-{hashlib.sha256(folder.encode()).hexdigest()[:16]}"
    for attempt in range(4):
        try:
            block.save(name, overwrite=True)
            return block
        except ObjectAlreadyExists:  # another study registered the block type or document at the same moment
            time.sleep(0.2 * (attempt + 1))
    block.save(name, overwrite=True)  # a fifth try: its error, if any, is the caller's
    return block


def _refs(inputs: dict[str, Any]) -> dict[str, ArtifactRef]:
    return {name: ArtifactRef.from_json(value["artifact"]) for name, value in inputs.items()}


class StageCachePolicy(CachePolicy):
    """Key from the stage spec and its inputs' digests; a cached record whose artifact folder is gone is dropped."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        key = cache_key(StageSpec(**inputs["spec"]), _refs(inputs["inputs"]))
        read_record(key)  # drops a record whose folder was removed: rerun rather than return a dangling path
        return key


METRICS_INTERVAL = 5.0  # seconds between a stage's per-step metric writes (the rest at its end): tasks.metrics


class MlflowTracker:
    """Per-step metrics into the stage's child run (``tasks.metrics``), progress lines into the Prefect task log.
    ``run_id`` and ``rank_metrics`` tell ``roads.launch`` where a launched stage's rank 0 logs, and through what."""

    rank_metrics = RANK_METRICS

    def __init__(self, run_id: str | None, label: str, progress_dir: str | None = None):
        self.run_id, self.label, self.progress_dir = run_id, label, progress_dir
        self.logged: set[str] = set()  # metric keys with a per-step history in the run (the flow skips them)
        self._metrics = MlflowMetrics(run_id, interval=METRICS_INTERVAL)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.update(self._metrics.log_metrics(metrics, step))

    def flush(self) -> None:
        """Write the metrics still batched (``tasks.metrics.MlflowMetrics``)."""
        self._metrics.flush()

    def progress(self, message: str) -> None:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            logger = get_run_logger()
        except MissingContextError:  # called as task.fn(...) outside a flow
            logger = logging.getLogger("roads")
        logger.info(f"[{self.label}] {message}")
        write_step(self.progress_dir, self.label, message)


def release_memory() -> None:
    """Give the memory a finished stage freed back to the system, so the worker's next stage (and its neighbours)
    have it. glibc keeps freed heap memory in the process: after SFT of SmolLM2-135M (8 x 512 tokens a step) a
    worker held 11.3 GB while idle, and the next stages beside it ran the machine out of memory (hh-rlhf, 2 workers,
    measured). ``gc.collect`` frees what cycles hold (a Trainer and its model), then ``malloc_trim(0)`` returns the
    free pages. No-op where the C library has no ``malloc_trim`` (macOS, Windows, musl)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols, glibc's among them
    except (OSError, AttributeError, TypeError):
        pass


def run_stage(spec: dict, inputs: dict, ctx: dict) -> dict:
    """The body of every stage task: run the stage into the artifact store, return its result as JSON."""
    from roads.runner import execute

    parsed = StageSpec(**spec)
    refs = _refs(inputs)
    tracker = MlflowTracker(ctx.get("child_run_id"), ctx.get("node_id", parsed.stage), ctx.get("progress_dir"))
    started = time.time()
    tracker.progress("started")
    try:
        result = execute(parsed, refs, ctx["store"], tracker)
    finally:
        tracker.flush()
        clear_step(ctx.get("progress_dir"), tracker.label)
        release_memory()
    doc = result.to_json()
    doc["cache_key"] = cache_key(parsed, refs)
    doc["produced_by"] = ctx.get("child_run_id")
    doc["logged_metrics"] = sorted(tracker.logged)
    doc["wall_seconds"] = round(time.time() - started, 3)
    doc["started_at"], doc["finished_at"] = started, time.time()
    doc["worker"] = f"{socket.gethostname()}:{os.getpid()}"  # which machine and process ran it (a Ray node …)
    return doc


def stage_task(stage: str) -> Callable:
    """The Prefect task of one stage. ``ctx`` (store, node id, MLflow child run) is not part of the cache key. The
    flow sets ``result_storage`` per run (``result_storage()``) so that $ROADS_HOME is read when the study starts."""

    def body(spec: dict, inputs: dict, ctx: dict) -> dict:
        return run_stage(spec, inputs, ctx)

    body.__name__ = body.__qualname__ = stage
    return task(
        body,
        name=stage,
        cache_policy=StageCachePolicy(),
        persist_result=True,
        result_serializer="json",
        retries=0,
    )
