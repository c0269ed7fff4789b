"""Schedules: the study and sweep flows as Prefect deployments on a process work pool.

``roads deploy NAME --cron "0 3 * * *"`` (or ``--interval``, or none: run on demand) registers a deployment whose
entrypoint is one of the two flows below, from this project folder (a ``set_working_directory`` pull step), on a
work pool of type ``process`` (created if missing). A worker runs it: ``prefect worker start --pool roads-process``.
``prefect.yaml`` declares the same deployments for ``prefect deploy --all``.

The flows configure the environment themselves (project-local state unless the worker's environment says
otherwise) and run the study or sweep as a subflow with its own task runner.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from prefect import flow

from roads.errors import RoadsError

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_POOL = "roads-process"


def _brief(outcome: dict) -> dict:
    nodes = outcome.get("nodes") or [n for point in outcome.get("points", []) for n in point["nodes"]]
    return {"hits": sum(n["cache"] == "hit" for n in nodes), "misses": sum(n["cache"] == "miss" for n in nodes),
            "parent_run_ids": [outcome["parent_run_id"]] if "parent_run_id" in outcome
            else [a["parent_run_id"] for a in outcome.get("points", [])]}


@flow(name="roads-scheduled-study", log_prints=True)
def scheduled_study(pipeline: str = "default", overrides: Optional[list[str]] = None, file: str = "pipelines.yaml",
                    runner: str = "process", workers: Optional[int] = None) -> dict:
    """A pipeline of the study file, run as `roads run` would (cached stages are hits)."""
    from flows import env

    env.configure()
    from flows.study import run_study

    return _brief(run_study(pipeline, overrides or [], file, runner=runner, workers=workers))


@flow(name="roads-scheduled-sweep", log_prints=True)
def scheduled_sweep(sweep: str, overrides: Optional[list[str]] = None, file: str = "pipelines.yaml",
                    runner: Optional[str] = None, workers: Optional[int] = None) -> dict:
    """A sweep of the study file, run as `roads sweep` would."""
    from flows import env

    env.configure()
    from flows.sweep import run_sweep

    return _brief(run_sweep(sweep, overrides or [], file, runner=runner, workers=workers))


def ensure_process_pool(name: str) -> None:
    """Create a work pool of type process named ``name`` unless it exists (of any type: then it is used as is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:
                pass


def deploy(name: str, *, sweep: bool = False, overrides: list[str] = (), file: str = "pipelines.yaml",
           pool: str = DEFAULT_POOL, cron: str | None = None, interval: float | None = None,
           deployment_name: str | None = None, runner: str | None = None, paused: bool = False) -> dict[str, Any]:
    """Register (or update) the deployment of a pipeline or sweep; returns its id and full name."""
    if not os.environ.get("PREFECT_API_URL"):
        raise RoadsError("roads deploy needs a Prefect server: start one (`prefect server start`, `make services`, "
                         "or docker/compose.yaml) and set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api")
    if cron and interval:
        raise RoadsError("give --cron or --interval, not both")
    file_path = Path(file).resolve()
    if sweep:
        from roads.sweep import load_sweep

        load_sweep(file_path, name, list(overrides))  # a bad sweep fails here, before anything is registered
        target, parameters = scheduled_sweep, {"sweep": name}
    else:
        from roads.config import load_study

        load_study(file_path, name, list(overrides))
        target, parameters = scheduled_study, {"pipeline": name}
    parameters.update(overrides=list(overrides), file=str(file_path))
    if runner:
        parameters["runner"] = runner
    ensure_process_pool(pool)
    source = target.from_source(source=str(PROJECT), entrypoint=f"flows/deploy.py:{target.fn.__name__}")
    deployment_name = deployment_name or name
    schedule: dict[str, Any] = {"cron": cron} if cron else {"interval": interval} if interval else {}
    # to_deployment + apply, not Flow.deploy: with this stack (Prefect 3.8.8, fastapi 0.154) deploy()'s check for
    # online workers is refused by the server (422 on workers/filter: limit/offset None)
    deployment = source.to_deployment(name=deployment_name, work_pool_name=pool, parameters=parameters,
                                      paused=paused or None, tags=["roads", "sweep" if sweep else "study"], **schedule)
    deployment_id = deployment.apply(work_pool_name=pool)
    return {"id": str(deployment_id), "name": f"{target.name}/{deployment_name}", "pool": pool,
            "schedule": schedule or None, "parameters": parameters}


def run_now(full_name: str) -> str:
    """Trigger a run of a deployment; returns the flow run's id (a worker of its pool runs it)."""
    from prefect.deployments import run_deployment

    return str(run_deployment(full_name, timeout=0).id)
