"""What a sweep buys over running its points one by one, measured in one session on the same machine.

(a) baseline: every point as its own `roads run` of the sweep's pipeline with the point's overrides, one after another,
    each from an empty store (no stage shared between points), on the process pool;
(b) the sweep on the process pool (`--runner process`): one flow, shared stages run once, points' stages at once;
(c) the sweep on a local Ray cluster (`--runner ray`, the default), including starting and warming the cluster;
(d) the sweep again on the store of (c): every stage a hit.
Ratios are against (a). Each measurement is a fresh `roads` process, as a user runs it.

    python bench/sweep.py [--sweep sweep-smoke] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROADS = str(Path(sys.executable).with_name("roads"))


def timed(args: list[str], home: Path) -> tuple[float, str]:
    env = {**os.environ, "ROADS_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    env.pop("PREFECT_API_URL", None)  # each run starts its own temporary Prefect server, as `roads` does alone
    start = time.perf_counter()
    proc = subprocess.run([ROADS, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default="sweep-smoke")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, str(ROOT))
    from roads.sweep import load_sweep

    sweep, studies = load_sweep(ROOT / "pipelines.yaml", args.sweep)
    scratch = Path(tempfile.mkdtemp(prefix="roads-bench-sweep-"))
    workers = ["--workers", str(args.workers)]

    baseline = 0.0
    for i, (point, _) in enumerate(studies):
        overrides = [x for o in point.overrides for x in ("--set", o)]
        seconds, _ = timed(["run", sweep.pipeline, *overrides, *workers], scratch / f"point{i}")
        print(f"(a) point {point.name}: {seconds:.1f} s", flush=True)
        baseline += seconds
    process, _ = timed(["sweep", args.sweep, "--runner", "process", *workers], scratch / "process")
    ray, out = timed(["sweep", args.sweep, "--runner", "ray", *workers], scratch / "ray")
    rerun, out2 = timed(["sweep", args.sweep, "--runner", "ray", *workers], scratch / "ray")
    counts = re.search(r"\((\d+) stage runs: (\d+) ran, (\d+) hits\)", out2)
    distinct = re.search(r"(\d+) distinct stages", out).group(1)
    print(f"\nsweep {args.sweep}: {len(studies)} points, {distinct} distinct stages, {args.workers} workers")
    print("| what | seconds | ratio to (a) |\n|---|---|---|")
    for name, value in [("(a) the points one by one (roads run each, empty stores)", baseline),
                        ("(b) roads sweep --runner process", process),
                        ("(c) roads sweep --runner ray (cluster start and warm-up included)", ray),
                        (f"(d) (c) again: {counts.group(3)} of {counts.group(1)} stage runs hits", rerun)]:
        print(f"| {name} | {value:.1f} | {value / baseline:.2f} |")


if __name__ == "__main__":
    main()
