"""The sweep flow: every arm of a sweep (a grid point of pipelines.yaml's ``sweeps:``) as one MLflow run in the
experiment ``sweep/<name>``, with the swept values as params (``sweep.<key>``) and tags; the arms' stage tasks run
at the same time on one task runner (Ray by default), and a stage that several arms share runs once.

Each arm's MLflow run looks like a ``roads run`` of its pipeline (child runs per stage, summary, report), so the
MLflow UI compares arms by their swept params. A rerun finds every stage in the cache.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows import env
from flows.outcome import StudyFailed, arms_by_task
from flows.study import collect, failing_runs, housekeeping, study_tracker, submit_nodes, task_runner
from roads.errors import RoadsError
from roads.sweep import arm_plans, load_sweep, resources_for
from roads.stage_table import GOLD_METRICS


def experiment_name(sweep: str) -> str:
    return f"sweep/{sweep}"


@flow(name="roads-sweep", validate_parameters=False)
def sweep_flow(sweep: str, overrides: list[str], file: str, runner: str = "ray") -> dict:
    config, studies = load_sweep(file, sweep, overrides)
    plans = arm_plans(studies)
    run_id = str(flow_run.get_id() or "")
    trackers, children = {}, {}
    with failing_runs(trackers.values()):
        for arm, study, nodes, _ in plans:
            swept = {f"sweep.{key}": value for key, value in arm.values.items()}
            trackers[arm.name] = tracker = study_tracker(
                study, experiment_name(sweep), arm.name, [*overrides, *arm.overrides], runner,
                tags={"roads.sweep": sweep, "roads.sweep_arm": arm.name, "roads.sweep_flow_run_id": run_id,
                      **{k: str(v) for k, v in swept.items()}},
                params={"sweep": sweep, **swept})
            children[arm.name] = {n.id: tracker.start_child(n) for n in nodes}
        store = str(env.artifact_store())
        shared: dict[str, Any] = {}  # plan key -> future: a stage several arms share is submitted once
        futures = {}
        for arm, _study, nodes, keys in plans:
            futures[arm.name] = submit_nodes(
                nodes, children[arm.name], store, shared=shared, keys=keys, label=f"{arm.name}:",
                resources=(lambda stage: resources_for(config, stage) or {"num_cpus": 1}) if runner == "ray" else None)
        arms, failures = [], {}
        for arm, study, nodes, _ in plans:
            outcome, failed = collect(study.pipeline, nodes, futures[arm.name], trackers[arm.name], children[arm.name])
            outcome.update(arm=arm.name, values=arm.values)
            arms.append(outcome)
            failures.update({f"{arm.name}: {node}": message for node, message in failed.items()})
    result = {"sweep": sweep, "experiment": experiment_name(sweep), "arms": arms,
              "stages": len(shared), "nodes": sum(len(a["nodes"]) for a in arms)}
    if failures:
        first = next(iter(failures.items()))
        raise StudyFailed(f"{len(failures)} stages of the sweep failed; first: {first[0]}: {first[1]}", result)
    return result


def run_sweep(sweep: str, overrides: list[str] | tuple[str, ...] = (), file: str = "pipelines.yaml", *,
              runner: str | None = None, workers: int | None = None, ray_address: str | None = None) -> dict:
    """Validate every arm (nothing is written if one is bad), then run the sweep flow; returns its outcome."""
    config, _ = load_sweep(file, sweep, list(overrides))
    runner = runner or config.runner
    if runner not in ("ray", "process"):
        raise RoadsError(f"unknown runner {runner!r}; use ray or process")
    env.configure()
    housekeeping()
    env.ensure_prefect_api()
    flow_ = sweep_flow.with_options(task_runner=task_runner(runner, workers or config.workers, ray_address))
    return flow_(sweep=sweep, overrides=list(overrides), file=str(file), runner=runner)


def sweep_rows(outcome: dict) -> list[dict]:
    """One row per (sweep arm, task, evaluated policy): mean gold reward and win rate over seeds, plus cache counts."""
    rows = []
    for arm in outcome["arms"]:
        hits = sum(n["cache"] == "hit" for n in arm["nodes"])
        for row in arms_by_task(arm["summary"]):
            rows.append({"sweep_arm": arm["arm"], "task": row["task"], "policy": row["arm"], "seeds": row["seeds"],
                         **{m: row[m] for m in GOLD_METRICS}, "cached": f"{hits}/{len(arm['nodes'])}"})
        if not arm["summary"]:
            rows.append({"sweep_arm": arm["arm"], "cached": f"{hits}/{len(arm['nodes'])}"})
    return rows


