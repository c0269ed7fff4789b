"""The sweep flow: every point of a sweep (the grid of pipelines.yaml's ``sweeps:``) as one MLflow run in the
experiment ``sweep/<name>``, with the swept values as params (``sweep.<key>``) and tags; the points' stage tasks run
at the same time on one task runner (Ray by default), and a stage that several points share runs once.

Each point's MLflow run looks like a ``roads run`` of its pipeline (child runs per computed stage, summary, report),
so the MLflow UI compares points by their swept params. A rerun finds every stage in the cache: each point is then a
parent run with its summary and no child runs (the node table names the run that produced each stage).
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows import env
from flows.outcome import policies_by_task, present_metrics, study_failed
from flows.preflight import preflight_sweep
from flows.study import collect, failing_runs, housekeeping, study_tracker, submit_nodes, task_runner
from roads.errors import RoadsError
from tasks.keys import cached_results
from roads.sweep import point_plans, load_sweep, resources_for


def experiment_name(sweep: str) -> str:
    return f"sweep/{sweep}"


@flow(name="roads-sweep", validate_parameters=False)
def sweep_flow(sweep: str, overrides: list[str], file: str, runner: str = "ray") -> dict:
    config, studies = load_sweep(file, sweep, overrides)
    plans = point_plans(studies)
    run_id = str(flow_run.get_id() or "")
    trackers, children, known = {}, {}, {}
    with failing_runs(trackers.values()):
        for point, study, nodes, _ in plans:
            swept = {f"sweep.{key}": value for key, value in point.values.items()}
            trackers[point.name] = tracker = study_tracker(
                study, experiment_name(sweep), point.name, [*overrides, *point.overrides], runner,
                tags={"roads.sweep": sweep, "roads.sweep_point": point.name, "roads.sweep_flow_run_id": run_id,
                      **{k: str(v) for k, v in swept.items()}},
                params={"sweep": sweep, **swept})
            # a stage already cached when the sweep starts gets no child run: its row names the run that produced it
            known[point.name] = cached_results(nodes)
            children[point.name] = {n.id: tracker.start_child(n) for n in nodes if n.id not in known[point.name]}
        store = str(env.artifact_store())
        shared: dict[str, Any] = {}  # plan key -> future: a stage several points share is submitted once
        futures = {}
        for point, _study, nodes, keys in plans:
            futures[point.name] = submit_nodes(
                nodes, children[point.name], store, shared=shared, keys=keys, label=f"{point.name}:",
                known=known[point.name],
                resources=(lambda stage: resources_for(config, stage) or {"num_cpus": 1}) if runner == "ray" else None)
        points, failures = [], {}
        for point, study, nodes, _ in plans:
            outcome, failed = collect(study.pipeline, nodes, futures[point.name], trackers[point.name], children[point.name])
            outcome.update(point=point.name, values=point.values)
            points.append(outcome)
            failures.update({f"{point.name}: {node}": message for node, message in failed.items()})
    result = {"sweep": sweep, "experiment": experiment_name(sweep), "points": points,
              "stages": len(shared), "nodes": sum(len(a["nodes"]) for a in points)}
    if failures:
        raise study_failed("stages of the sweep", failures, result["nodes"], result)
    return result


def run_sweep(sweep: str, overrides: list[str] | tuple[str, ...] = (), file: str = "pipelines.yaml", *,
              runner: str | None = None, workers: int | None = None, ray_address: str | None = None) -> dict:
    """Validate every point (nothing is written if one is bad), then run the sweep flow; returns its outcome."""
    config, points = load_sweep(file, sweep, list(overrides))
    runner = runner or config.runner
    if runner not in ("ray", "process"):
        raise RoadsError(f"unknown runner {runner!r}; use ray or process")
    preflight_sweep(sweep, points)  # every point's files, models and the state folder, before anything is created
    env.configure()
    housekeeping()
    env.ensure_prefect_api()
    flow_ = sweep_flow.with_options(task_runner=task_runner(runner, workers or config.workers, ray_address))
    return flow_(sweep=sweep, overrides=list(overrides), file=str(file), runner=runner)


def sweep_metrics(outcome: dict) -> tuple[str, ...]:
    """The per-policy columns the sweep's tasks have (``present_metrics`` over every point): gold reward and win
    rate for gold-reward tasks; KL, length, finished rate for all; the proxy win rate where a held-out judge scored."""
    return present_metrics([row for point in outcome["points"] for row in point["summary"]])


def sweep_rows(outcome: dict, metrics: tuple[str, ...] | None = None) -> list[dict]:
    """One row per (sweep point, task, evaluated policy): the mean over seeds of each of ``metrics`` (default: the
    columns the tasks have, ``sweep_metrics``), plus cache counts."""
    metrics = metrics or sweep_metrics(outcome)
    rows = []
    for point in outcome["points"]:
        hits = sum(n["cache"] == "hit" for n in point["nodes"])
        for row in policies_by_task(point["summary"], metrics):
            rows.append({"point": point["point"], "task": row["task"], "policy": row["policy"], "seeds": row["seeds"],
                         **{m: row[m] for m in metrics}, "cached": f"{hits}/{len(point['nodes'])}"})
        if not point["summary"]:
            rows.append({"point": point["point"], "cached": f"{hits}/{len(point['nodes'])}"})
    return rows


