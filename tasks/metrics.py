"""Per-step metrics into one MLflow run, by explicit run id (the active run is thread-local). No Prefect here: the
stage task's tracker (``tasks.common.MlflowTracker``) and rank 0 of a launched stage (``roads.launched``, in a
process of its own) log through the same :class:`MlflowMetrics`. MLflow is imported only when there is a run."""

from __future__ import annotations

import time

# What a launched stage's rank 0 builds, from the run id, to log its per-step metrics (``roads.launch``)
RANK_METRICS = f"{__name__}:MlflowMetrics"


class MlflowMetrics:
    """``log_metrics`` sends one batch per call to the run ``run_id`` (nothing without a run id); metric names with
    ``@`` are logged with ``_`` (MLflow rejects ``@``). The store is ``MLFLOW_TRACKING_URI`` from the environment."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self._client = None
        if run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> list[str]:
        """Log ``metrics`` at ``step`` (0 if None); returns the keys as logged (none when nothing was)."""
        if not self._client or not metrics:
            return []
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key=k.replace("@", "_"), value=float(v), timestamp=now, step=step or 0)
                 for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch, synchronous=True)
        return [m.key for m in batch]


def open_store() -> None:
    """Open the tracking store (``MLFLOW_TRACKING_URI``) once in this process: a warm worker does it before its first
    stage (opening a SQLite store checks its schema: about a second), so the stage's first metrics do not wait."""
    from mlflow.tracking import MlflowClient

    MlflowClient().search_experiments(max_results=1)

