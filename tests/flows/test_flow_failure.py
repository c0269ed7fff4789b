"""A flow that breaks by itself (not in a stage) leaves no MLflow run RUNNING: every run it opened is FAILED with
the reason."""

import pytest
from mlflow.tracking import MlflowClient

import tasks
from flows.study import run_study


def test_a_broken_flow_marks_its_open_runs_failed(tmp_path, monkeypatch, pipelines_file):
    monkeypatch.setenv("ROADS_HOME", str(tmp_path / "home"))

    real = tasks.stage_task

    def broken(stage):  # the flow breaks when it submits SFT, after its child run was opened
        if stage == "sft":
            raise RuntimeError("submission broke")
        return real(stage)

    monkeypatch.setattr(tasks, "stage_task", broken)
    with pytest.raises(RuntimeError, match="submission broke"):
        run_study("smoke", ["pipeline.tasks=[gap]"], str(pipelines_file))
    client = MlflowClient()
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], "tags.`roads.error` LIKE '%submission broke%'")
    parents = [r for r in runs if r.data.tags["roads.kind"] == "study"]
    children = [r for r in runs if r.data.tags["roads.kind"] == "stage"]
    assert len(parents) == 1 and [r.data.tags["roads.node"] for r in children] == ["gap/seed0/sft"]
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert {r.info.status for r in runs} == {"FAILED"}
    assert all(r.data.tags["roads.error"] == "the flow failed: RuntimeError: submission broke" for r in runs)
