"""Schedules on a real Prefect server (PostgreSQL-backed): prefect.yaml's deployments register with `prefect deploy
--all`; `roads deploy` registers a scheduled deployment on a process work pool, a run is triggered, a process worker
runs it to COMPLETED, and the study it ran is in the MLflow server."""

import os
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
pytestmark = pytest.mark.slow


@pytest.fixture
def env(servers, tmp_path):
    if not (BIN / "roads").exists():
        pytest.skip(f"{BIN / 'roads'} not installed (make test builds .venv)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROADS_TEST_")}
    env.update(PREFECT_API_URL=servers["prefect"], MLFLOW_TRACKING_URI=servers["mlflow"],
               ROADS_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"), ROADS_PROJECT_DIR=str(ROOT))
    return env


def run(args: list[str], env: dict, timeout: int = 120) -> str:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def client_for(env: dict):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Sync:
        def __enter__(self):
            self.settings = temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]})
            self.settings.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return Sync()


def test_prefect_yaml_deploys_every_deployment_on_the_process_pool(env):
    run([str(BIN / "prefect"), "work-pool", "create", "roads-process", "--type", "process", "--overwrite"], env)
    out = run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
    assert "roads-scheduled-sweep/dpo-beta-sweep" in out
    with client_for(env) as client:
        names = {"roads-scheduled-study/nightly-study", "roads-scheduled-study/weekly-hypotheses",
                 "roads-scheduled-sweep/dpo-beta-sweep"}
        for name in names:
            deployment = client.read_deployment_by_name(name)
            assert deployment.work_pool_name == "roads-process"
            assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                              {"directory": str(ROOT)}}]
            assert deployment.schedules and not any(s.active for s in deployment.schedules)
        assert client.read_deployment_by_name("roads-scheduled-sweep/dpo-beta-sweep").parameters == {"sweep": "dpo-beta"}


def test_roads_deploy_then_a_worker_runs_it_to_completion(env, servers):
    pool = f"roads-test-{os.getpid()}"
    out = run([str(BIN / "roads"), "deploy", "smoke", "--set", "pipeline.tasks=[gap]", "--pool", pool,
               "--interval", "3600", "--run"], env)
    assert "deployment roads-scheduled-study/smoke" in out and "schedule: {'interval': 3600.0}" in out
    flow_run_id = out.split("flow run ")[1].split()[0]
    with client_for(env) as client:
        deployment = client.read_deployment_by_name("roads-scheduled-study/smoke")
        assert deployment.work_pool_name == pool
        assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [3600.0]
        assert deployment.parameters["pipeline"] == "smoke"
        assert deployment.parameters["overrides"] == ["pipeline.tasks=[gap]"]
    started = time.time()
    run([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"], env, timeout=600)
    with client_for(env) as client:
        flow_run = client.read_flow_run(flow_run_id)
        assert flow_run.state.is_completed(), flow_run.state
        assert flow_run.deployment_id == deployment.id
    print(f"deployment run by a worker: {time.time() - started:.1f} s")
    mlflow = MlflowClient(tracking_uri=servers["mlflow"])
    exp = mlflow.get_experiment_by_name("smoke")
    runs = mlflow.search_runs([exp.experiment_id], "tags.`roads.kind` = 'study'", order_by=["attribute.start_time DESC"])
    assert runs and runs[0].info.status == "FINISHED"
    assert runs[0].info.start_time / 1000 >= started - 5
