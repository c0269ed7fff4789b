"""Orchestration overhead and cached-rerun time, measured in one run.

(a) The pipeline's stage functions called directly, one after another in this process (``roads.runner.execute``),
    against the same pipeline through Prefect (process pool, cache keys, result records) and MLflow (parent and
    child runs, per-step metrics, artifacts): the ratio flow / direct. Run with --workers 1 for the like-for-like
    ratio (both sequential); the default (min(2, cores)) also shows what running independent stages at once buys.
(b) A fully cached rerun: the same call again (every stage a hit: decided and recorded without Prefect), and the
    whole `roads run` command in a fresh process, which is what a user waits for (bench/rerun.py measures that
    against its floor on the default study).

The flow runs its stages in a pool of worker processes (one with --workers 1); the local Prefect server is started
once, first, and stopped at the end.

    python bench/overhead.py [--pipeline basic] [--workers 1] [--repeat 3]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="basic")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeat", type=int, default=1, help="direct and flow runs, alternated (median)")
    args = parser.parse_args()
    os.chdir(ROOT)
    scratch = Path(tempfile.mkdtemp(prefix="roads-bench-"))
    os.environ["ROADS_HOME"] = str(scratch / "flow-home")
    for key, value in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}.items():
        os.environ.setdefault(key, value)

    from flows import env

    env.configure()
    import torch

    from flows.study import default_workers, run_study
    from roads.config import load_study
    from roads.plan import build_plan
    from roads.runner import execute

    workers = args.workers or default_workers()
    study = load_study("pipelines.yaml", args.pipeline, args.overrides)
    nodes = build_plan(study)

    start = time.perf_counter()
    env.ensure_prefect_api()
    server = time.perf_counter() - start

    # (a) direct: the same stage functions, sequential, no Prefect, no MLflow (same torch threads as one worker),
    # and the flow, cold, in a fresh state folder — alternated --repeat times, since a shared machine drifts
    directs, colds = [], []
    for i in range(args.repeat):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        store = scratch / f"direct-store-{i}"
        results = {}
        start = time.perf_counter()
        for node in nodes:
            results[node.id] = execute(node.spec, {k: results[v].artifact for k, v in node.inputs.items()}, store)
        directs.append(time.perf_counter() - start)
        torch.set_num_threads(os.cpu_count() or 1)

        os.environ["ROADS_HOME"] = str(scratch / f"flow-home-{i}")
        start = time.perf_counter()
        outcome = run_study(args.pipeline, args.overrides, workers=workers)
        colds.append(time.perf_counter() - start)
        assert all(n["cache"] == "miss" for n in outcome["nodes"]), "the cold flow run found cached stages"
    direct, cold = statistics.median(directs), statistics.median(colds)
    ratios = [c / d for c, d in zip(colds, directs)]

    start = time.perf_counter()
    outcome = run_study(args.pipeline, args.overrides, workers=workers)
    cached = time.perf_counter() - start
    assert all(n["cache"] == "hit" for n in outcome["nodes"]), "the rerun was not fully cached"

    command = [str(Path(sys.executable).parent / "roads"), "run", args.pipeline, "--workers", str(workers)]
    command += [x for item in args.overrides for x in ("--set", item)]
    child_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # a user's fresh shell (the server
    # it would reuse is the one started above)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=child_env, check=True, capture_output=True, text=True)
    cli_cached = time.perf_counter() - start
    counts = next((line for line in proc.stdout.splitlines() if " stages: " in line), "?")

    print(f"pipeline {args.pipeline!r}: {len(nodes)} stage nodes, {workers} worker(s), {os.cpu_count()} cores")
    print(f"  direct stage functions (sequential)      {direct:8.1f} s   (median of {', '.join(f'{d:.1f}' for d in directs)})")
    print(f"  through Prefect + MLflow, cold           {cold:8.1f} s   (median of {', '.join(f'{c:.1f}' for c in colds)})")
    print(f"  ratio flow/direct, each pair             {', '.join(f'{r:.2f}' for r in ratios)}; median "
          f"{statistics.median(ratios):.2f}")
    print(f"  local Prefect server start (once)        {server:8.1f} s   (not in the flow time; later runs reuse it)")
    print(f"  fully cached rerun, same process         {cached:8.1f} s")
    print(f"  fully cached rerun, `roads run` process  {cli_cached:8.1f} s   (imports + cache check + MLflow: {counts})")
    env.stop_server()


if __name__ == "__main__":
    main()
