"""Orchestration overhead and cached-rerun time, measured in one run.

(a) The pipeline's stage functions called directly, one after another (``roads.runner.execute``), against the same
    pipeline through Prefect (process pool, cache keys, result records) and MLflow (parent and child runs, per-step
    metrics, artifacts): the ratio flow / direct, each pair alternated --repeat times (a shared machine drifts). Run
    with --workers 1 for the like-for-like ratio (both sequential); the default (min(2, cores)) also shows what
    running independent stages at once buys. Every run, direct or flow, starts from an empty state folder of its own
    (the reference log-prob store in it included).

    The default: each side with its imports done before its clock starts. The direct side runs in a process of its
    own (``--direct-only``: it imports torch and the stages, then times the calls; in this process, beside the
    flow's idle Prefect and MLflow threads, the same calls ran up to 7% slower), the flow in this process as a study
    after the process's first, as a sweep's points, a notebook's or a test session's studies run. What a process
    pays once is done first and timed apart: the local Prefect server (later runs reuse it), and a first study of a
    small pipeline (``--warm-up``), which starts the workers' fork server (torch, transformers, TRL, Prefect and
    MLflow imported once: flows/warm.py) and imports the flow's own code paths.

    --fresh: each side a fresh process, as from a shell, each paying its own imports: ``python bench/overhead.py
    --direct-only`` (imports torch and the stages, calls them) against ``roads run`` (imports Prefect and MLflow,
    starts the fork server beside them, runs the flow) on the already started Prefect server.
(b) A fully cached rerun: the same call again (every stage a hit: decided and recorded without Prefect), and the
    whole `roads run` command in a fresh process, which is what a user waits for (bench/rerun.py measures that
    against its floor on the default study).

    python bench/overhead.py [--pipeline basic] [--workers 1] [--repeat 3] [--fresh]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def run_direct(pipeline: str, overrides: list[str], workers: int) -> float:
    """The stage functions called one after another in this process, with as many torch threads as one of the
    flow's ``workers`` has; returns the seconds they took."""
    import torch

    from roads.config import load_study
    from roads.plan import build_plan
    from roads.runner import execute

    nodes = build_plan(load_study("pipelines.yaml", pipeline, overrides))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    store = Path(os.environ["ROADS_HOME"]) / "direct-store"
    results = {}
    start = time.perf_counter()
    for node in nodes:
        results[node.id] = execute(node.spec, {k: results[v].artifact for k, v in node.inputs.items()}, store)
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="basic")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeat", type=int, default=1, help="direct and flow runs, alternated (median)")
    parser.add_argument("--fresh", action="store_true",
                        help="each side a fresh process (a script calling the stages against `roads run`)")
    parser.add_argument("--warm-up", default="smoke", help="the pipeline of the process's first study (default smoke)")
    parser.add_argument("--direct-only", action="store_true", help=argparse.SUPPRESS)  # --fresh's direct side
    args = parser.parse_args()
    os.chdir(ROOT)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if args.direct_only:
        print(f"direct-seconds {run_direct(args.pipeline, args.overrides, args.workers or 1):.3f}")
        return
    scratch = Path(tempfile.mkdtemp(prefix="roads-bench-"))
    os.environ["ROADS_HOME"] = str(scratch / "server-home")

    from flows import env

    env.configure()
    from flows.study import default_workers, run_study
    from roads.config import load_study
    from roads.plan import build_plan

    workers = args.workers or default_workers()
    nodes = build_plan(load_study("pipelines.yaml", args.pipeline, args.overrides))

    start = time.perf_counter()
    env.ensure_prefect_api()
    server = time.perf_counter() - start
    sets = [x for item in args.overrides for x in ("--set", item)]

    warm_up = None
    if not args.fresh:
        os.environ["ROADS_HOME"] = str(scratch / "warm-up-home")
        start = time.perf_counter()
        run_study(args.warm_up, [], workers=workers)
        warm_up = time.perf_counter() - start

    def home(name: str) -> dict[str, str]:
        """A new state folder (artifacts, results, the reference log-prob store); the MLflow store and Prefect home
        stay those of the first (configure() set them), as for a user's next study."""
        os.environ["ROADS_HOME"] = str(scratch / name)
        return dict(os.environ)

    directs, flows_ = [], []
    for i in range(args.repeat):
        child_env = home(f"direct-home-{i}")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--direct-only", "--pipeline", args.pipeline, "--workers",
                               str(workers), *sets], cwd=ROOT, env=child_env, check=True, capture_output=True,
                              text=True)
        inside = float(next(x for x in proc.stdout.splitlines() if x.startswith("direct-seconds")).split()[1])
        directs.append(time.perf_counter() - start if args.fresh else inside)

        child_env = home(f"flow-home-{i}")
        start = time.perf_counter()
        if args.fresh:
            subprocess.run([str(Path(sys.executable).parent / "roads"), "run", args.pipeline, "--workers",
                            str(workers), *sets], cwd=ROOT, env=child_env, check=True, capture_output=True)
            outcome_cold = all(row["cache"] == "miss" for row in _nodes_of(scratch / f"flow-home-{i}", nodes))
        else:
            outcome = run_study(args.pipeline, args.overrides, workers=workers)
            outcome_cold = all(n["cache"] == "miss" for n in outcome["nodes"])
        flows_.append(time.perf_counter() - start)
        assert outcome_cold, "the flow run found cached stages"
    direct, flow = statistics.median(directs), statistics.median(flows_)
    ratios = [f / d for f, d in zip(flows_, directs)]

    start = time.perf_counter()
    outcome = run_study(args.pipeline, args.overrides, workers=workers)
    cached = time.perf_counter() - start
    assert all(n["cache"] == "hit" for n in outcome["nodes"]), "the rerun was not fully cached"

    command = [str(Path(sys.executable).parent / "roads"), "run", args.pipeline, "--workers", str(workers), *sets]
    child_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # a user's fresh shell (the server
    # it would reuse is the one started above)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=child_env, check=True, capture_output=True, text=True)
    cli_cached = time.perf_counter() - start
    counts = next((line for line in proc.stdout.splitlines() if " stages: " in line), "?")

    where = "each a fresh process, imports included (--fresh)" if args.fresh else "imports done before the clock"
    print(f"pipeline {args.pipeline!r}: {len(nodes)} stage nodes, {workers} worker(s), {os.cpu_count()} cores; {where}")
    print(f"  direct stage functions (sequential)      {direct:8.1f} s   (median of {', '.join(f'{d:.1f}' for d in directs)})")
    print(f"  through Prefect + MLflow, cold           {flow:8.1f} s   (median of {', '.join(f'{c:.1f}' for c in flows_)})")
    print(f"  ratio flow/direct, each pair             {', '.join(f'{r:.2f}' for r in ratios)}; median "
          f"{statistics.median(ratios):.2f}")
    print(f"  local Prefect server start (once)        {server:8.1f} s   (not in the flow time; later runs reuse it)")
    if warm_up is not None:
        print(f"  the process's first study ({args.warm_up:>6s})    {warm_up:8.1f} s   (not in the flow time: the fork "
              f"server's and the flow's imports, once per process; --fresh: in it)")
    print(f"  fully cached rerun, same process         {cached:8.1f} s")
    print(f"  fully cached rerun, `roads run` process  {cli_cached:8.1f} s   (imports + cache check + MLflow: {counts})")
    env.stop_server()


def _nodes_of(home: Path, nodes) -> list[dict]:
    """The cache status of each node as a fresh `roads run` recorded it: every node's result made by this run."""
    from tasks.keys import cached_results

    os.environ["ROADS_HOME"] = str(home)
    known = cached_results(nodes)
    return [{"cache": "miss" if n.id in known else "absent"} for n in nodes]


if __name__ == "__main__":
    main()
