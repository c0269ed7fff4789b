"""Per-step metrics into one MLflow run, by explicit run id (the active run is thread-local). No Prefect here: the
stage task's tracker (``tasks.common.MlflowTracker``) and rank 0 of a launched stage (``roads.launched``, in a
process of its own) log through the same :class:`MlflowMetrics`. MLflow is imported only when there is a run."""

from __future__ import annotations

import time

# What a launched stage's rank 0 builds, from the run id, to log its per-step metrics (``roads.launch``)
RANK_METRICS = f"{__name__}:MlflowMetrics"


class MlflowMetrics:
    """``log_metrics`` records metrics for the run ``run_id`` (nothing without a run id); metric names with ``@`` are
    logged with ``_`` (MLflow rejects ``@``). The store is ``MLFLOW_TRACKING_URI`` from the environment.

    Writes are batched: the first call is sent at once, later ones wait until ``interval`` seconds have passed since
    the last write and go in one ``log_batch`` (each metric keeps its own step and timestamp), and ``flush`` sends
    the rest — the stage's task calls it when the stage ends, whatever its outcome (``tasks.common.MlflowTracker``
    batches every 5 s). A SQLite store takes ~10 ms a write, and a training stage logs every few steps: one write per
    step was ~0.5 s of a 17 s SFT stage (cProfile in the worker). ``interval=0`` (the default: a launched stage's rank
    0, which has no end-of-stage hook) writes every call at once."""

    BATCH = 1000  # MLflow's limit on metrics per log_batch

    def __init__(self, run_id: str | None, interval: float = 0.0):
        self.run_id, self.interval = run_id, interval
        self._client = None
        self._pending: list = []
        self._last = float("-inf")  # when the last write went out
        if run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> list[str]:
        """Record ``metrics`` at ``step`` (0 if None); returns the keys as logged (none when nothing was)."""
        if not self._client or not metrics:
            return []
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key=k.replace("@", "_"), value=float(v), timestamp=now, step=step or 0)
                 for k, v in metrics.items()]
        self._pending.extend(batch)
        if time.monotonic() - self._last >= self.interval:
            self.flush()
        return [m.key for m in batch]

    def flush(self) -> None:
        """Send every recorded metric not yet written."""
        if not self._client or not self._pending:
            return
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.BATCH):
            self._client.log_batch(self.run_id, metrics=pending[start:start + self.BATCH], synchronous=True)
        self._last = time.monotonic()


def open_store() -> None:
    """Open the tracking store (``MLFLOW_TRACKING_URI``) once in this process: a warm worker does it before its first
    stage (opening a SQLite store checks its schema: about a second), so the stage's first metrics do not wait."""
    from mlflow.tracking import MlflowClient

    MlflowClient().search_experiments(max_results=1)

