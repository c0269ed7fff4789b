"""The study flow: a pipeline from pipelines.yaml as a DAG of cached stage tasks, each with an MLflow child run.

``run_study`` (the entry point for the CLI, tests and benchmarks) first decides, without Prefect, which stages are
cache hits (``tasks/keys.py``): a fully cached study is recorded at once — no server, no worker, no flow — and is
as fast as the imports allow. Otherwise only the stages that are not known hits are submitted: independent nodes
(different tasks and seeds, the reward model beside offline DPO, the evaluations) run at the same time in a pool of
worker processes, and a known hit reaches its dependents as its cached result.

MLflow: a parent run per study run, named for what it is (pipeline, overrides or forced stage, time), with the
settings that differ from the study file's defaults as params; a child run per stage that was computed (a hit
points at the run that produced it in the node table, ``nodes.md``). A fully cached rerun that was recorded before
reuses that record instead of cloning it. Each run starts by closing the runs a killed study left RUNNING and by
removing its temporary folders.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from flows import env
from flows.cleanup import remove_orphan_temp_dirs
from flows.outcome import Failure, StudyFailed, budget, node_row, one_line, outcome_of, select, study_failed, summarize
from flows.preflight import check_stages, preflight
from flows.progress import StudyProgress
from flows.warm import discard_warm_pool, start_warm_pool

if TYPE_CHECKING:  # MLflow is imported when a study is recorded: a forced stage's workers start before that import
    from flows.tracking import StudyTracker
from roads.config import Study, load_study
from roads.errors import RoadsError
from roads.plan import Node, build_plan
from roads.artifacts import ArtifactRef
from tasks.keys import cache_key, cached_results, read_record


def _worker_init(threads: int, log_file: str | None = None) -> None:
    import warnings

    import torch

    torch.set_num_threads(threads)
    env.log_to_file(log_file)
    # transformers' deprecation notices (one per trainer per worker) are not the user's to act on
    warnings.filterwarnings("ignore", category=FutureWarning)


def submit_nodes(nodes: list[Node], children: dict[str, str], store: str, *, shared: dict[str, Any] | None = None,
                 keys: dict[str, str] | None = None, resources: Callable[[str], dict] | None = None,
                 label: str = "", known: dict[str, dict] | None = None) -> dict[str, Any]:
    """A sweep's way (the study flow uses ``schedule``): submit every node's stage task at once, inputs as upstream
    futures. A node in ``known`` (a cache hit decided before the flow) is its result, not a task. With
    ``shared``/``keys``, a node whose key was already submitted by another point reuses that future;
    ``resources(stage)`` gives Ray resources."""
    from tasks import stage_task
    from tasks.common import result_storage

    futures: dict[str, Any] = {}
    for node in nodes:
        if known and node.id in known:
            futures[node.id] = known[node.id]
            continue
        key = keys[node.id] if keys else None
        if shared is not None and key in shared:
            futures[node.id] = shared[key]
            continue
        submit = stage_task(node.stage).with_options(task_run_name=f"{label}{node.id}",
                                                     result_storage=result_storage()).submit
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
    """Wait for every node of a sweep point, finish its MLflow child run and the parent run; return the outcome and the
    failures (node id -> one line). A node without a child run was a known hit: its result is in ``futures``."""
    results: dict[str, dict] = {}
    report: list[dict] = []
    failed: dict[str, str] = {}
    for node in nodes:
        if node.id not in children:
            results[node.id] = futures[node.id]
            report.append(node_row(node, "hit", futures[node.id]))
            continue
        try:
            result = futures[node.id].result()
        except Exception as err:  # noqa: BLE001 - reported per node; the caller fails the flow
            broken = [d for d in node.inputs.values() if d in failed]
            failed[node.id] = Failure.of(f"skipped: {broken[0]} failed" if broken else err)
            drop_exception_record(futures[node.id])
            tracker.fail_child(children[node.id], failed[node.id])
            report.append(node_row(node, "failed", error=failed[node.id]))
            continue
        hit = tracker.finish_child(children[node.id], node, result,
                                   {k: results[d] for k, d in node.inputs.items() if d in results})
        results[node.id] = result
        report.append(node_row(node, "hit" if hit else "miss", result))
    return outcome_of(pipeline, nodes, results, report, tracker), failed


def drop_exception_record(future: Any) -> None:
    """Prefect persists a failed task's exception in the results folder under a random key: no cache record (nothing
    reads it back), so it is removed — a failed stage leaves nothing of itself in the store."""
    from tasks.keys import results_dir

    record = getattr(getattr(future, "state", None), "data", None)
    key = getattr(getattr(record, "metadata", None), "storage_key", None)
    if isinstance(key, str) and key:
        (results_dir() / os.path.basename(key)).unlink(missing_ok=True)


@contextmanager
def failing_runs(trackers: Iterable[StudyTracker]):
    """If the flow itself breaks (not a stage: those are recorded per node), mark every MLflow run it left open as
    FAILED with the reason, then let the error through. ``trackers`` is read when that happens (a dict's values()
    view sees trackers added later)."""
    try:
        yield
    except BaseException as err:
        for tracker in trackers:
            tracker.abort(f"the flow failed: {one_line(err)}")
        raise


def study_tracker(study: Study, experiment: str, run_name: str, overrides: list[str], runner: str,
                  tags: dict[str, str] | None = None, params: dict | None = None,
                  flow_run_id: str = "") -> StudyTracker:
    """The parent MLflow run of one pipeline run (a sweep point is one), with the resolved config attached."""
    from flows.tracking import StudyTracker, study_params

    if not flow_run_id:
        from prefect.runtime import flow_run

        flow_run_id = str(flow_run.get_id() or "")
    tracker = StudyTracker(
        experiment,
        env.mlflow_artifact_root(),
        run_name=run_name,
        tags={"roads.prefect_flow_run_id": flow_run_id, "roads.overrides": " ".join(overrides),
              "roads.runner": runner, **env.run_environment(), **(tags or {})},
        params={**study_params(study, overrides), **(params or {})},
        model=study.defaults.model,
    )
    tracker.log_dict(study.resolved(), "resolved_config.json")
    return tracker


def run_name(pipeline: str, overrides: list[str] | tuple[str, ...] = (), force_stage: str | None = None,
             only_stage: str | None = None, cached: bool = False) -> str:
    """``smoke sft.epochs=2 · 12-01 19:40:03``, ``default --force reward_model · …``, ``smoke (cached) · …``."""
    from flows.tracking import redact

    # an override may carry a secret (a token in a description): MLflow and Prefect show the name as it is
    parts = [pipeline, *(f"{k}={redact(v, k)}" if eq else o for o in overrides for k, eq, v in [o.partition("=")])]
    if force_stage:
        parts.append(f"--force {force_stage}")
    elif only_stage:
        parts.append(f"stage {only_stage}")
    if cached:
        parts.append("(cached)")
    return f"{' '.join(parts)[:200]} · {time.strftime('%m-%d %H:%M:%S')}"


def forced(nodes: list[Node], force_stage: str | None) -> set[str]:
    return {n.id for n in nodes if force_stage and n.stage == force_stage}


def schedule(pipeline: str, nodes: list[Node], known: dict[str, dict], force: set[str], tracker: StudyTracker,
             store: str, progress: StudyProgress, resources: Callable[[str], dict] | None = None) -> tuple[dict, dict]:
    """Run the nodes not in ``known`` as their inputs finish: a node whose inputs are all done is looked up in the
    cache first — a hit (its input digests unchanged, e.g. after a forced stage reproduced its output) needs no task
    and no MLflow run — else submitted as a stage task with its own child run. Returns the outcome and the failures.
    Independent nodes run at the same time, as many as the task runner has workers."""
    import queue

    from tasks import stage_task
    from tasks.common import result_storage

    results: dict[str, dict] = dict(known)
    rows: dict[str, dict] = {n.id: node_row(n, "hit", known[n.id]) for n in nodes if n.id in known}
    failed: dict[str, str] = {}
    children: dict[str, str] = {}
    running: dict[str, Any] = {}
    done: queue.Queue = queue.Queue()
    waiting = [n for n in nodes if n.id not in known]
    finished: list[tuple[Node, dict]] = []  # computed, their MLflow child runs not yet finished
    while waiting or running or finished:
        try:
            for node in list(waiting):
                broken = [d for d in node.inputs.values() if d in failed]
                if broken:
                    waiting.remove(node)
                    failed[node.id] = Failure.of(f"skipped: {broken[0]} failed")
                    rows[node.id] = node_row(node, "failed", error=failed[node.id])
                    progress.finished(node.id, "failed")
                    continue
                if not all(d in results for d in node.inputs.values()):
                    continue
                waiting.remove(node)
                if node.id not in force:
                    refs = {name: ArtifactRef.from_json(results[d]["artifact"]) for name, d in node.inputs.items()}
                    hit = read_record(cache_key(node.spec, refs))
                    if hit is not None:
                        results[node.id], rows[node.id] = hit, node_row(node, "hit", hit)
                        progress.finished(node.id, "hit")
                        continue
                children[node.id] = tracker.start_child(node)
                options: dict[str, Any] = {"task_run_name": node.id, "result_storage": result_storage()}
                if node.id in force:
                    options["refresh_cache"] = True
                kwargs = {"spec": node.spec.model_dump(), "inputs": {k: results[d] for k, d in node.inputs.items()},
                          "ctx": {"store": store, "node_id": node.id, "child_run_id": children[node.id],
                                  "progress_dir": progress.folder}}
                submit = stage_task(node.stage).with_options(**options).submit
                if resources and resources(node.stage):
                    from prefect_ray.context import remote_options

                    with remote_options(**resources(node.stage)):
                        future = submit(**kwargs)
                else:
                    future = submit(**kwargs)
                running[node.id] = future
                future.add_done_callback(lambda _, node_id=node.id: done.put(node_id))
        finally:
            # the MLflow side of what finished, after its dependents were submitted: the workers do not wait for it
            for node, result in finished:
                hit = tracker.finish_child(children[node.id], node, result,
                                           {k: results[d] for k, d in node.inputs.items() if d in results})
                rows[node.id] = node_row(node, "hit" if hit else "miss", result)
                progress.finished(node.id, "hit" if hit else "miss", result.get("wall_seconds"))
            finished.clear()
        if not running:
            break
        node_id = done.get()
        node = next(n for n in nodes if n.id == node_id)
        try:
            future = running.pop(node_id)
            result = future.result()
        except Exception as err:  # noqa: BLE001 - reported per node; the caller fails the flow
            failed[node_id] = Failure.of(err)
            drop_exception_record(future)
            tracker.fail_child(children[node_id], failed[node_id])
            rows[node_id] = node_row(node, "failed", error=failed[node_id])
            progress.finished(node_id, "failed")
            continue
        results[node_id] = result
        finished.append((node, result))
    report = [rows[n.id] for n in nodes if n.id in rows]
    return outcome_of(pipeline, nodes, {k: v for k, v in results.items() if k not in failed}, report, tracker), failed


def _study_flow(pipeline: str, overrides: list[str], file: str, force_stage: str | None = None,
                only_stage: str | None = None, runner: str = "process", name: str | None = None,
                progress: Any = None) -> dict:
    study = load_study(file, pipeline, overrides)
    nodes = select(build_plan(study), only_stage)
    force = forced(nodes, force_stage)
    known = cached_results(nodes, force)
    before = {n: r["artifact"]["digest"] for n, r in cached_results(nodes).items() if n in force} if force else {}
    tracker = study_tracker(study, pipeline, name or run_name(pipeline, overrides, force_stage, only_stage),
                            overrides, runner)
    with failing_runs([tracker]):
        with StudyProgress.of(progress, nodes, known, env.state_home()) as bar:
            outcome, failed = schedule(pipeline, nodes, known, force, tracker, str(env.artifact_store()), bar,
                                       resources=(lambda stage: {"num_cpus": 1}) if runner == "ray" else None)
    for row in outcome["nodes"]:
        if row["node"] in before:
            row["digest_before"] = before[row["node"]]
    if failed:
        raise study_failed("stages", failed, len(nodes), outcome)
    return outcome


@lru_cache(maxsize=1)
def study_flow():
    """The Prefect flow ``roads-study`` (built on first use: importing Prefect costs seconds a cached study skips)."""
    from prefect import flow

    return flow(name="roads-study", validate_parameters=False)(_study_flow)


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def worker_initargs(workers: int) -> tuple[int, str]:
    """``_worker_init``'s arguments: each worker's torch threads (its share of the cores) and the log file."""
    return max(1, (os.cpu_count() or 1) // workers), env.log_file()


def warm_up(nodes: list[Node], known: dict[str, dict], workers: int | None) -> None:
    """Spawn the process pool the flow will run on now, each worker importing the heavy libraries and the modules of
    the stages that will run, while this process imports Prefect and starts the flow (``flows/warm.py``)."""
    workers = workers or default_workers()
    stages = sorted({n.stage for n in nodes if n.id not in known})
    start_warm_pool(workers, _worker_init, worker_initargs(workers),
                    preload=("transformers", "trl", "prefect.task_engine", "tasks.common", "tasks.metrics:open_store",
                             *(f"roads.stages.{stage}" for stage in stages)))


def task_runner(kind: str = "process", workers: int | None = None, address: str | None = None):
    """``process``: a local pool of ``workers`` processes (forked from the process's fork server, ``flows/warm.py``),
    one torch thread each share of the cores — one worker too:
    the stages run on a thread of the flow's own process took 27–35% longer than in a one-process pool (``basic``, one
    worker, the two alternated in one session on an idle 2-core machine: 192.7 / 206.5 s against 151.3 / 153.5 s),
    presumably the flow's own threads (Prefect's log and event workers, MLflow) competing for the interpreter. ``ray``: prefect-ray's task runner on the cluster at
    ``address`` (or $RAY_ADDRESS), else on a local cluster of ``workers`` CPUs that lives as long as the flow; Ray sets
    each task's threads from its ``num_cpus``."""
    if kind == "process":
        from flows.warm import make_task_runner

        workers = workers or default_workers()
        return make_task_runner(workers, _worker_init, worker_initargs(workers))
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


def new_sqlite_store() -> bool:
    """Whether the tracking store is a SQLite file not created yet."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists()


def housekeeping() -> dict[str, int]:
    """What a killed study left behind on this store: its RUNNING MLflow runs become KILLED and its temporary
    artifact folders are removed (only those whose writing process is gone)."""
    from mlflow.tracking import MlflowClient

    from flows.tracking import close_orphans

    removed = remove_orphan_temp_dirs(env.artifact_store())
    closed = close_orphans(MlflowClient())
    return {"temp_folders_removed": len(removed), "runs_closed": len(closed)}


def cached_study(study: Study, nodes: list[Node], overrides: list[str] | tuple[str, ...], runner: str = "process",
                 force_stage: str | None = None, known: dict[str, dict] | None = None) -> dict | None:
    """The outcome of a study every node of which is a cache hit, recorded without Prefect; None when some node must
    run. Recorded once: when a finished run of the experiment already holds this outcome (same results, same
    params), it is reused rather than cloned, else one parent run holds the summary (no child runs: each node's row
    in ``nodes.md`` names the run that produced it). ``known``: the hits, when the caller has read them already."""
    if known is None:
        known = cached_results(nodes, forced(nodes, force_stage))
    if len(known) < len(nodes):
        return None
    report = [node_row(n, "hit", known[n.id]) for n in nodes]
    from mlflow.tracking import MlflowClient

    from flows.tracking import outcome_digest, recorded_run, study_params

    params = study_params(study, overrides)

    existing = recorded_run(MlflowClient(), study.pipeline, outcome_digest(known, params))
    if existing:
        rows = summarize(nodes, known)
        return {"pipeline": study.pipeline, "parent_run_id": existing, "recorded_before": True, "nodes": report,
                "summary": rows, "budget": budget(nodes, known),
                "report": known["report"]["artifact"]["path"] if "report" in known else None,
                "report_files": known.get("report", {}).get("files", []),
                "experiment_id": MlflowClient().get_experiment_by_name(study.pipeline).experiment_id}
    tracker = study_tracker(study, study.pipeline, run_name(study.pipeline, overrides, cached=True), list(overrides),
                            runner, tags={"roads.cache": "all hit"}, flow_run_id="none (fully cached)")
    with failing_runs([tracker]):
        return outcome_of(study.pipeline, nodes, known, report, tracker)


def run_study(pipeline: str, overrides: list[str] | tuple[str, ...] = (), file: str = "pipelines.yaml", *,
              force_stage: str | None = None, only_stage: str | None = None, workers: int | None = None,
              runner: str = "process", ray_address: str | None = None, progress: Any = None) -> dict:
    """Validate the config (nothing is written if it is bad), clean up after killed runs, record a fully cached study
    at once, else run the flow. Returns the outcome dict; raises ConfigError for a bad config and StudyFailed when a
    stage failed. ``progress``: "live" (a progress bar), "lines" (a line per finished stage) or None (quiet)."""
    study: Study = load_study(file, pipeline, list(overrides))
    # the stage names, the state folder, every file and model the stages that will run read: one line, exit 2,
    # before anything is created (flows/preflight.py)
    check_stages(study, force_stage, only_stage)
    nodes = select(build_plan(study), only_stage)
    known = cached_results(nodes, forced(nodes, force_stage))  # read-only: a store that does not exist has none
    preflight(study, force_stage=force_stage, only_stage=only_stage, todo=[n for n in nodes if n.id not in known])
    env.configure()
    warm = runner == "process" and len(known) < len(nodes)
    new_store = new_sqlite_store()
    if new_store:  # its tables are created here first: a worker opening it at the same time (``open_store``, at
        housekeeping()  # once from a running fork server) would race to create them ("table ... already exists")
    if warm:  # some stage will run: its workers start importing torch now, beside this process's own start
        warm_up(nodes, known, workers)
    try:
        if not new_store:
            housekeeping()
        outcome = cached_study(study, nodes, overrides, runner, force_stage, known=known)
        if outcome is not None:
            return outcome
        env.ensure_prefect_api()
        env.log_to_file(env.log_file())
        name = run_name(pipeline, overrides, force_stage, only_stage)
        flow_ = study_flow().with_options(task_runner=task_runner(runner, workers, ray_address),
                                          flow_run_name=name.replace("{", "(").replace("}", ")"))
        return flow_(pipeline=pipeline, overrides=list(overrides), file=str(file), force_stage=force_stage,
                     only_stage=only_stage, runner=runner, name=name, progress=progress)
    finally:
        if warm:
            discard_warm_pool()  # the flow's runner claimed it, unless the flow failed before it started
