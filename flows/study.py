"""The study flow: a pipeline from pipelines.yaml as a DAG of cached stage tasks, each with an MLflow child run.

Independent nodes (different tasks and seeds, the reward model beside offline DPO, the evaluations) run at the
same time in a pool of worker processes. ``run_study`` is the entry point for the CLI, tests and benchmarks.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from statistics import fmean
from typing import Any, Callable, Iterable

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ProcessPoolTaskRunner

from flows import env
from flows.tracking import StudyTracker
from roads.config import Study, load_study
from roads.errors import RoadsError
from roads.plan import Node, build_plan, downstream, upstream
from tasks import stage_task
from tasks.common import result_storage

SUMMARY_METRICS = ("gold_reward_mean", "win_rate", "kl_to_reference", "length_mean")


class StudyFailed(RoadsError):
    """Some stage failed; the outcome (what ran, what was cached, what failed) is attached."""

    def __init__(self, message: str, outcome: dict):
        super().__init__(message)
        self.outcome = outcome


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}" if not isinstance(err, RoadsError) else text[0]


def summarize(nodes: list[Node], results: dict[str, dict]) -> list[dict]:
    """One row per evaluated (task, seed, arm)."""
    rows = []
    for node in nodes:
        if node.stage == "evaluate" and node.id in results:
            metrics = results[node.id]["metrics"]
            row = {"task": node.spec.task_name, "seed": node.spec.seed, "arm": node.spec.arm}
            row.update({k: metrics.get(f"evaluate/{k}") for k in SUMMARY_METRICS})
            rows.append(row)
    return rows


def arms_by_task(rows: list[dict], metrics: tuple[str, ...] = ("gold_reward_mean", "win_rate")) -> list[dict]:
    """Mean over seeds of each metric, one row per (task, arm), in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["arm"]), []).append(row)
    out = []
    for (task, arm), group in groups.items():
        entry: dict[str, Any] = {"task": task, "arm": arm, "seeds": len(group)}
        for m in metrics:
            values = [r[m] for r in group if r.get(m) is not None]
            entry[m] = fmean(values) if values else None
        out.append(entry)
    return out


BUDGET_COLUMNS = ("task", "arm", "seeds", "tokens_trained", "tokens_generated", "wall_seconds")


def budget(nodes: list[Node], results: dict[str, dict]) -> list[dict]:
    """What each evaluated arm cost, counting every stage it stands on (the reward model for online arms, the
    offline-DPO policy for online DPO from DPO, …): tokens trained on, tokens generated, and the wall time of the
    runs that produced the results (a cache hit costs what it cost when it ran). Mean over seeds."""
    by_id = {n.id: n for n in nodes}
    per_arm: dict[tuple[str, str], list[dict]] = {}
    for node in nodes:
        if node.stage != "evaluate" or node.id not in results:
            continue
        todo, seen = [node.inputs["policy"]], set()
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(by_id[current].inputs.values())
        cost = {"tokens_trained": 0.0, "tokens_generated": 0.0, "wall_seconds": 0.0}
        for dep in seen:
            result = results.get(dep, {})
            for key, value in result.get("metrics", {}).items():
                if key.endswith("/num_tokens"):
                    cost["tokens_trained"] += value
                elif key.endswith("/tokens_generated"):
                    cost["tokens_generated"] += value
            cost["wall_seconds"] += float(result.get("wall_seconds", 0.0))
        per_arm.setdefault((node.spec.task_name, node.spec.arm), []).append(cost)
    return [{"task": task, "arm": arm, "seeds": len(costs),
             "tokens_trained": int(fmean(c["tokens_trained"] for c in costs)),
             "tokens_generated": int(fmean(c["tokens_generated"] for c in costs)),
             "wall_seconds": round(fmean(c["wall_seconds"] for c in costs), 1)} for (task, arm), costs in per_arm.items()]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def select(nodes: list[Node], stage: str | None) -> list[Node]:
    """``stage`` None: every node. Otherwise that stage's nodes, what they need and what depends on them."""
    if stage is None:
        return nodes
    keep = downstream(nodes, stage) | upstream(nodes, stage)
    return [n for n in nodes if n.id in keep]


def submit_nodes(nodes: list[Node], children: dict[str, str], store: str, *, force_stage: str | None = None,
                 shared: dict[str, Any] | None = None, keys: dict[str, str] | None = None,
                 resources: Callable[[str], dict] | None = None, label: str = "") -> dict[str, Any]:
    """Submit every node's stage task (inputs are upstream futures). With ``shared``/``keys`` (a sweep), a node whose
    key was already submitted by another arm reuses that future; ``resources(stage)`` gives Ray resources."""
    futures: dict[str, Any] = {}
    for node in nodes:
        key = keys[node.id] if keys else None
        if shared is not None and key in shared:
            futures[node.id] = shared[key]
            continue
        options: dict[str, Any] = {"task_run_name": f"{label}{node.id}", "result_storage": result_storage()}
        if force_stage and node.stage == force_stage:
            options["refresh_cache"] = True
        submit = stage_task(node.stage).with_options(**options).submit
        kwargs = {"spec": node.spec.model_dump(), "inputs": {name: futures[dep] for name, dep in node.inputs.items()},
                  "ctx": {"store": store, "node_id": node.id, "child_run_id": children[node.id]}}
        wanted = resources(node.stage) if resources else {}
        if wanted:
            from prefect_ray.context import remote_options

            with remote_options(**wanted):
                futures[node.id] = submit(**kwargs)
        else:
            futures[node.id] = submit(**kwargs)
        if shared is not None:
            shared[key] = futures[node.id]
    return futures


def collect(pipeline: str, nodes: list[Node], futures: dict[str, Any], tracker: StudyTracker,
            children: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """Wait for every node, finish its MLflow child run and the parent run; return the outcome and the failures
    (node id -> one line)."""
    results: dict[str, dict] = {}
    report: list[dict] = []
    failed: dict[str, str] = {}
    for node in nodes:
        try:
            result = futures[node.id].result()
        except Exception as err:  # noqa: BLE001 - reported per node; the caller fails the flow
            broken = [d for d in node.inputs.values() if d in failed]
            message = f"skipped: {broken[0]} failed" if broken else _one_line(err)
            failed[node.id] = message
            tracker.fail_child(children[node.id], message)
            report.append({"node": node.id, "cache": "failed", "seconds": None, "error": message})
            continue
        hit = tracker.finish_child(children[node.id], node, result)
        results[node.id] = result
        report.append({"node": node.id, "cache": "hit" if hit else "miss",
                       "seconds": None if hit else result.get("wall_seconds"), "error": ""})
    rows = summarize(nodes, results)
    spent = budget(nodes, results)
    outcome = {"pipeline": pipeline, "parent_run_id": tracker.parent_id, "experiment_id": tracker.experiment_id,
               "nodes": report, "summary": rows, "budget": spent,
               "report": results["report"]["artifact"]["path"] if "report" in results else None,
               "report_files": results.get("report", {}).get("files", [])}
    table = markdown_table(arms_by_task(rows), ["task", "arm", "seeds", "gold_reward_mean", "win_rate"])
    files = {"summary.md": table + "\n", "nodes.md": markdown_table(report, ["node", "cache", "seconds", "error"]) + "\n",
             "budget.md": markdown_table(spent, list(BUDGET_COLUMNS)) + "\n"}
    tracker.finish("FAILED" if failed else "FINISHED", rows, files, budget_rows=spent,
                   report_folder=outcome["report"], report_files=results.get("report", {}).get("files", []),
                   report_metrics=results.get("report", {}).get("metrics"))
    return outcome, failed


@contextmanager
def failing_runs(trackers: Iterable[StudyTracker]):
    """If the flow itself breaks (not a stage: those are recorded per node), mark every MLflow run it left open as
    FAILED with the reason, then let the error through. ``trackers`` is read when that happens (a dict's values()
    view sees trackers added later)."""
    try:
        yield
    except BaseException as err:
        for tracker in trackers:
            tracker.abort(f"the flow failed: {_one_line(err)}")
        raise


def study_tracker(study: Study, experiment: str, run_name: str, overrides: list[str], runner: str,
                  tags: dict[str, str] | None = None, params: dict | None = None) -> StudyTracker:
    """The parent MLflow run of one pipeline run (a sweep arm is one), with the resolved config attached."""
    tracker = StudyTracker(
        experiment,
        env.mlflow_artifact_root(),
        run_name=run_name,
        tags={"roads.prefect_flow_run_id": str(flow_run.get_id() or ""), "roads.overrides": " ".join(overrides),
              "roads.runner": runner, **env.run_environment(), **(tags or {})},
        params={"pipeline": study.pipeline, "overrides": " ".join(overrides) or "-",
                **study.spec.model_dump(exclude={"set"}), **(params or {})},
    )
    tracker.log_dict(study.resolved(), "resolved_config.json")
    return tracker


@flow(name="roads-study", validate_parameters=False)
def study_flow(pipeline: str, overrides: list[str], file: str, force_stage: str | None = None,
               only_stage: str | None = None, runner: str = "process") -> dict:
    study = load_study(file, pipeline, overrides)
    nodes = select(build_plan(study), only_stage)
    tracker = study_tracker(study, pipeline, f"{pipeline}-{flow_run.get_name() or 'run'}", overrides, runner)
    with failing_runs([tracker]):
        children = {n.id: tracker.start_child(n) for n in nodes}
        futures = submit_nodes(nodes, children, str(env.artifact_store()), force_stage=force_stage,
                               resources=(lambda stage: {"num_cpus": 1}) if runner == "ray" else None)
        outcome, failed = collect(pipeline, nodes, futures, tracker, children)
    if failed:
        first = next(iter(failed.items()))
        raise StudyFailed(f"{len(failed)} of {len(nodes)} stages failed; first: {first[0]}: {first[1]}", outcome)
    return outcome


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def task_runner(kind: str = "process", workers: int | None = None, address: str | None = None):
    """``process``: a local pool of ``workers`` processes, one torch thread each share of the cores. ``ray``:
    prefect-ray's task runner on the cluster at ``address`` (or $RAY_ADDRESS), else on a local cluster of
    ``workers`` CPUs that lives as long as the flow; Ray sets each task's threads from its ``num_cpus``."""
    if kind == "process":
        workers = workers or default_workers()
        threads = max(1, (os.cpu_count() or 1) // workers)
        return ProcessPoolTaskRunner(max_workers=workers, initializer=_worker_init, initargs=(threads,))
    if kind != "ray":
        raise RoadsError(f"unknown runner {kind!r}; use process or ray")
    try:
        from flows.ray_runner import WarmRayTaskRunner
    except ImportError:
        raise RoadsError("the ray runner needs prefect-ray: pip install 'roads[ray]' (or use --runner process)") from None
    address = address or os.environ.get("RAY_ADDRESS") or None
    forward = {k: os.environ[k] for k in env.FORWARDED if k in os.environ}
    init: dict[str, Any] = {"runtime_env": {"env_vars": forward,
                                            "worker_process_setup_hook": "flows.env.ray_worker_setup"}}
    if not address:
        init.update(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False)
    return WarmRayTaskRunner(address=address, init_kwargs=init)


def run_study(pipeline: str, overrides: list[str] | tuple[str, ...] = (), file: str = "pipelines.yaml", *,
              force_stage: str | None = None, only_stage: str | None = None, workers: int | None = None,
              runner: str = "process", ray_address: str | None = None) -> dict:
    """Validate the config (nothing is written if it is bad), then run the flow. Returns the outcome dict; raises
    ConfigError for a bad config and StudyFailed when a stage failed."""
    study: Study = load_study(file, pipeline, list(overrides))
    for stage in (force_stage, only_stage):
        if stage and stage not in study.spec.stages:
            raise RoadsError(f"pipeline {pipeline!r} has no stage {stage!r}; its stages: {', '.join(study.spec.stages)}")
    env.configure()
    env.ensure_prefect_api()
    flow_ = study_flow.with_options(task_runner=task_runner(runner, workers, ray_address))
    return flow_(pipeline=pipeline, overrides=list(overrides), file=str(file), force_stage=force_stage,
                 only_stage=only_stage, runner=runner)
