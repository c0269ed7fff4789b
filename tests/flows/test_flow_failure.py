"""A flow that breaks by itself (not in a stage) leaves no MLflow run RUNNING: every run it opened is FAILED with
the reason."""

import pytest
from mlflow.tracking import MlflowClient

import flows.study
from flows.study import run_study


def test_a_broken_flow_marks_its_open_runs_failed(tmp_path, monkeypatch, pipelines_file):
    monkeypatch.setenv("ROADS_HOME", str(tmp_path / "home"))

    def boom(*args, **kwargs):
        raise RuntimeError("submission broke")

    monkeypatch.setattr(flows.study, "submit_nodes", boom)
    with pytest.raises(RuntimeError, match="submission broke"):
        run_study("smoke", ["pipeline.tasks=[gap]"], str(pipelines_file))
    client = MlflowClient()
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], "tags.`roads.error` LIKE '%submission broke%'")
    parents = [r for r in runs if r.data.tags["roads.kind"] == "study"]
    children = [r for r in runs if r.data.tags["roads.kind"] == "stage"]
    assert len(parents) == 1 and len(children) == 6
    assert {r.info.status for r in runs} == {"FAILED"}
    assert all(r.data.tags["roads.error"] == "the flow failed: RuntimeError: submission broke" for r in runs)
