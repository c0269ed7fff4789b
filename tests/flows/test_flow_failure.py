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


def _records(outcome: dict) -> dict[str, object]:
    """The parent run of a failed study and its children, by node (the session's store holds other tests' runs)."""
    client, parent = MlflowClient(), outcome["parent_run_id"]
    children = client.search_runs([outcome["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent}'")
    return {"parent": client.get_run(parent), **{r.data.tags["roads.node"]: r for r in children}}


def test_a_stage_that_diverges_leaves_a_true_record(tmp_path, monkeypatch, pipelines_file):
    """Issue 15 item 4: the failing stage's run is FAILED with its one-line reason, stages that never started get no
    run, the parent is FAILED with the reason, nothing of the failed stage is in the store (not even Prefect's record
    of the exception), and the error carries the stage error's own exit code."""
    from flows.outcome import StudyFailed
    from tasks.keys import results_dir

    monkeypatch.setenv("ROADS_HOME", str(tmp_path / "home"))
    with pytest.raises(StudyFailed) as info:
        run_study("smoke", ["pipeline.tasks=[gap]", "sft.lr=1e3"], str(pipelines_file))
    assert info.value.exit_code == 1  # a TrainingError's own code
    assert "first: gap/seed0/sft: sft: loss rose" in str(info.value) and "lower sft.lr" in str(info.value)
    runs = _records(info.value.outcome)
    assert set(runs) == {"parent", "gap/seed0/prepare_data", "gap/seed0/sft"}  # the rest never started: no run
    assert runs["gap/seed0/prepare_data"].info.status == "FINISHED"
    assert runs["gap/seed0/sft"].info.status == "FAILED"
    assert runs["gap/seed0/sft"].data.tags["roads.error"].startswith("sft: loss rose from")
    assert runs["parent"].info.status == "FAILED"
    assert runs["parent"].data.tags["roads.error"].startswith("gap/seed0/sft: sft: loss rose from")
    assert [p.name.split("-")[0] for p in results_dir().iterdir()] == ["prepare_data"]
    artifacts = tmp_path / "home" / "artifacts"
    assert sorted(p.name for p in artifacts.iterdir()) == ["prepare_data"]


def test_bad_data_found_mid_run_exits_with_the_data_errors_code(tmp_path, monkeypatch):
    """A data mistake that only a stage finds (here: the preflight is switched off) fails the study with exit code 2,
    the DataError's own, not the flow's 1."""
    import yaml

    import flows.study
    from flows.outcome import StudyFailed

    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "Q?", "chosen": " a"}\n' * 8)  # no "rejected"
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "tasks": {"prefs": {"family": "preferences", "source": str(bad), "format": "standard"}},
        "pipelines": {"real": {"tasks": ["prefs"], "seeds": [0], "stages": ["prepare_data", "sft"]}}}))
    monkeypatch.setenv("ROADS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(flows.study, "preflight", lambda *args, **kwargs: {})
    with pytest.raises(StudyFailed) as info:
        run_study("real", [], str(study))
    assert info.value.exit_code == 2 and "rejected" in str(info.value)
    runs = _records(info.value.outcome)
    assert set(runs) == {"parent", "prefs/seed0/prepare_data"}
    assert {r.info.status for r in runs.values()} == {"FAILED"}


def _die():
    import os

    os._exit(137)  # what the kernel's OOM killer leaves: the process gone, no exception, no message


def test_a_worker_killed_under_a_stage_is_named_with_what_to_do():
    """A stage whose worker is killed (out of memory on hh-rlhf at batch 8 beside two other stages) failed with
    Python's "A process in the process pool was terminated abruptly ...": the line now says what likely happened and
    which settings to lower."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from flows.outcome import Failure

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        err = pool.submit(_die).exception(timeout=120)
    line = Failure.of(err)
    assert line.startswith("a worker process died under the stage (BrokenProcessPool), most often killed for memory")
    assert "batch_size" in line and "--workers 1" in line and line.exit_code == 1
