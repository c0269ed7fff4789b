"""Per-step metrics into MLflow (tasks/metrics.py): one batch per call, ``@`` logged as ``_``, step 0 for None,
nothing without a run; the stage task's tracker keeps the keys it logged (the flow reads them as
``logged_metrics``) and rank 0 of a launched stage logs through the same sink."""

from __future__ import annotations

import pytest

from roads.launched import RankZeroTracker, metrics_sink
from roads.training import NullTracker
from tasks.common import MlflowTracker
from tasks.metrics import RANK_METRICS, MlflowMetrics


@pytest.fixture(scope="module")
def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()  # MLFLOW_TRACKING_URI from tests/conftest.py


@pytest.fixture
def run_id(client):
    experiment = client.get_experiment_by_name("test-metrics")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("test-metrics")
    return client.create_run(experiment_id).info.run_id


def test_mlflow_metrics_logs_one_batch(client, run_id):
    sink = MlflowMetrics(run_id)
    assert sink.log_metrics({"eval/win@1": 0.5, "sft/loss": 2}, step=3) == ["eval/win_1", "sft/loss"]
    assert sink.log_metrics({"sft/loss": 1.5}) == ["sft/loss"]
    assert sink.log_metrics({}) == []
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "sft/loss")] == [(3, 2.0), (0, 1.5)]
    assert [m.value for m in client.get_metric_history(run_id, "eval/win_1")] == [0.5]


def test_batched_metrics_wait_for_the_interval_or_the_flush(client, run_id):
    """The first write goes out at once (the UI shows the stage started); later ones wait for the interval, and
    flush sends them with their own steps — what the stage task does when its stage ends."""
    sink = MlflowMetrics(run_id, interval=3600)
    sink.log_metrics({"sft/loss": 2.0}, step=1)
    sink.log_metrics({"sft/loss": 1.5}, step=2)
    sink.log_metrics({"sft/loss": 1.0, "sft/lr": 0.1}, step=3)
    assert [m.step for m in client.get_metric_history(run_id, "sft/loss")] == [1]
    sink.flush()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "sft/loss")] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert [m.step for m in client.get_metric_history(run_id, "sft/lr")] == [3]
    sink.flush()  # nothing left: nothing written twice
    assert len(client.get_metric_history(run_id, "sft/loss")) == 3


def test_without_a_run_nothing_is_logged():
    assert MlflowMetrics(None).log_metrics({"sft/loss": 1.0}, step=1) == []
    tracker = MlflowTracker(None, "sft")
    tracker.log_metrics({"sft/loss": 1.0}, step=1)
    assert tracker.logged == set()


def test_the_task_tracker_keeps_what_it_logged(client, run_id):
    tracker = MlflowTracker(run_id, "sft")
    tracker.log_metrics({"sft/loss": 1.0, "eval/win@1": 0.25}, step=1)
    tracker.log_metrics({"sft/loss": 0.5}, step=2)
    assert tracker.logged == {"sft/loss", "eval/win_1"}
    tracker.flush()  # the stage task does at the stage's end: the tracker batches its writes
    assert [m.step for m in client.get_metric_history(run_id, "sft/loss")] == [1, 2]
    assert tracker.rank_metrics == RANK_METRICS  # what a launched stage's rank 0 logs through


def test_rank_zero_logs_through_the_named_sink(client, run_id, capsys):
    sink = metrics_sink(RANK_METRICS, run_id)
    assert isinstance(sink, MlflowMetrics) and sink.run_id == run_id
    assert isinstance(metrics_sink(None, run_id), NullTracker)
    tracker = RankZeroTracker(sink)
    tracker.log_metrics({"sft/loss": 0.75}, step=4)
    tracker.progress("step 4/4 loss 0.7500")
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "sft/loss")] == [(4, 0.75)]
    assert capsys.readouterr().out == "step 4/4 loss 0.7500\n"
