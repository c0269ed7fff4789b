"""`roads sweep` on a small grid: the points run at once on a local Ray cluster (prefect-ray's task runner), each point is
an MLflow run with its swept values as params and tags, shared stages run once, and a rerun is all hits."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from flows.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
LONGER = ["offline_dpo.epochs=6"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("sweep-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROADS_HOME", str(home))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.chdir(ROOT)
        yield home


@pytest.fixture(scope="module")
def first(home):
    # DPO a little longer than a Prefect task's own overhead, so that stages which can overlap do (2 busy cores)
    return run_sweep("sweep-smoke", LONGER, file=str(ROOT / "pipelines.yaml"), runner="ray", workers=2)


def _by_node(point: dict) -> dict[str, str]:
    return {n["node"]: n["cache"] for n in point["nodes"]}


def test_the_points_run_on_ray_at_once_and_shared_stages_run_once(first, home):
    assert [a["point"] for a in first["points"]] == ["offline_dpo.beta=0.1", "offline_dpo.beta=0.5"]
    assert first["stages"] == 7  # prepare_data, sft, evaluate[sft] shared; offline_dpo and its evaluation twice
    a, b = (_by_node(point) for point in first["points"])
    assert set(a.values()) == {"miss"}
    assert b["gap/seed0/offline_dpo"] == "miss" and b["gap/seed0/evaluate[offline_dpo]"] == "miss"
    assert b["gap/seed0/sft"] == "hit" and b["gap/seed0/prepare_data"] == "hit"  # the same run, not a second one
    client = MlflowClient()
    runs = client.search_runs([first["points"][0]["experiment_id"]], "tags.`roads.node` = 'gap/seed0/offline_dpo'")
    assert len(runs) == 2
    windows = sorted((float(r.data.metrics["offline_dpo/wall_seconds"]), r.data.tags["roads.worker"]) for r in runs)
    workers = {tag for _, tag in windows}
    assert all(":" in w for w in workers)
    import os
    assert not any(w.endswith(f":{os.getpid()}") for w in workers)  # run in Ray's worker processes, not here


def test_stages_ran_at_the_same_time_in_different_ray_workers(first, home):
    import json

    runs = [json.loads(json.loads(p.read_text())["result"]) for p in (home / "results").iterdir()
            if not p.name.startswith(".")]
    assert len(runs) == 7
    overlapping = [(a["worker"], b["worker"]) for a in runs for b in runs
                   if a["worker"] != b["worker"] and a["started_at"] < b["started_at"] < a["finished_at"]]
    assert overlapping, "no two stages ran at once: the sweep did not run in parallel"


def test_one_mlflow_run_per_point_with_the_swept_values_as_params_and_tags(first):
    client = MlflowClient()
    exp = client.get_experiment_by_name("sweep/sweep-smoke")
    runs = client.search_runs([exp.experiment_id], "tags.`roads.kind` = 'study'")
    assert len(runs) == 2
    by_point = {r.data.tags["roads.sweep_point"]: r for r in runs}
    assert set(by_point) == {"offline_dpo.beta=0.1", "offline_dpo.beta=0.5"}
    for name, run in by_point.items():
        beta = name.split("=")[1]
        assert run.info.status == "FINISHED"
        assert run.data.params["sweep.offline_dpo.beta"] == beta
        assert run.data.tags["sweep.offline_dpo.beta"] == beta
        assert run.data.tags["roads.sweep"] == "sweep-smoke" and run.data.tags["roads.runner"] == "ray"
        assert run.data.params["sweep"] == "sweep-smoke"
        assert any(k.endswith("/offline_dpo/gold_reward_mean") for k in run.data.metrics)
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert len(children) == 5 and {c.info.status for c in children} == {"FINISHED"}
        assert run.data.tags["roads.version.torch"] and run.data.tags["roads.version.ray"]


def test_a_rerun_through_the_cli_is_all_hits(first, capsys):
    assert main(["sweep", "sweep-smoke", "--runner", "ray", "--workers", "2", "--set", LONGER[0]]) == 0
    out = capsys.readouterr().out
    assert "0 ran, 10 hits" in out
    # the rerun's point runs hold the summary and no child runs: the hits name the runs that produced them
    client = MlflowClient()
    exp = client.get_experiment_by_name("sweep/sweep-smoke")
    rerun = client.search_runs([exp.experiment_id], "tags.`roads.kind` = 'study'", order_by=["attributes.start_time DESC"],
                               max_results=2)
    for run in rerun:
        assert run.info.status == "FINISHED" and any(k.endswith("/gold_reward_mean") for k in run.data.metrics)
        assert not client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert "| offline_dpo.beta=0.5 | gap | offline_dpo |" in out


def test_sweep_list_and_a_bad_sweep_on_the_command_line(capsys):
    assert main(["sweep", "--list"]) == 0
    out = capsys.readouterr().out
    assert "sweep-smoke:" in out and "    offline_dpo.beta=0.5" in out
    assert main(["sweep", "nope"]) == 2
    assert "unknown sweep 'nope'" in capsys.readouterr().err
