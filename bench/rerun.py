"""Rerun costs, measured in one run, each command in a fresh process as a user types it:

(a) a fully cached `roads run PIPELINE` (the no-op rerun) against `roads show PIPELINE` and against the floor — the
    imports and store opening a no-op rerun cannot avoid (roads' config, MLflow's client on the tracking store);
(b) `roads stage STAGE --force --pipeline PIPELINE` against the stage's own compute (the sum of the recomputed
    nodes' wall seconds as the tasks measured them, with one worker so they run one after another) and against the
    import floor of any process that trains (Prefect, MLflow, torch, transformers, TRL).

The store must hold a finished run of the pipeline (`make run` for default); if it does not, it is run first.
Run on an idle machine (`ps` first): the numbers are wall clock.

    python bench/rerun.py [--pipeline default] [--stage reward_model] [--repeat 3] [--home .roads]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROADS = str(Path(sys.executable).parent / "roads")
FLOOR = ("from roads.config import load_study; from mlflow.tracking import MlflowClient; "
         "load_study('pipelines.yaml', {pipeline!r}); MlflowClient().search_experiments(max_results=1)")
# what any process that trains a stage imports before it can start (roads run's workers, roads stage --workers 1)
STAGE_FLOOR = "import prefect, mlflow.tracking, torch, transformers, trl, datasets; from trl import DPOTrainer, RewardTrainer"


def timed(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return took, proc.stdout


def best(command: list[str], env: dict, repeat: int) -> float:
    return min(timed(command, env)[0] for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="default")
    parser.add_argument("--stage", default="reward_model")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per command; the fastest counts")
    parser.add_argument("--home", default=None, help="the state folder (default: $ROADS_HOME or .roads)")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if args.home:
        env["ROADS_HOME"] = str(Path(args.home).resolve())
    env.pop("PREFECT_API_URL", None)
    home = Path(env.get("ROADS_HOME") or ROOT / ".roads")
    env["MLFLOW_TRACKING_URI"] = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"

    took, out = timed([ROADS, "run", args.pipeline, "--progress", "none"], env)  # fills the cache if it must
    ran = int(re.search(r"(\d+) ran", out)[1])
    if ran:
        print(f"(the store lacked {ran} stages: computed them in {took:.0f} s first)")
    nodes = int(re.search(r"^(\d+) stages:", out, re.M)[1])

    show = best([ROADS, "show", args.pipeline], env, args.repeat)
    floor = best([sys.executable, "-c", FLOOR.format(pipeline=args.pipeline)], env, args.repeat)
    noop = best([ROADS, "run", args.pipeline, "--progress", "none"], env, args.repeat)
    stage_floor = best([sys.executable, "-c", STAGE_FLOOR], env, args.repeat)

    # (b) one stage forced, one worker: its nodes one after another, so their summed seconds are its own compute
    stage = [ROADS, "stage", args.stage, "--force", "--pipeline", args.pipeline, "--workers", "1", "--progress", "none"]
    timed(stage, env)  # the persistent Prefect server is started by the first such command, then reused
    walls, own = [], []
    for _ in range(args.repeat):
        took, out = timed(stage, env)
        seconds = [float(m[1]) for m in re.finditer(rf"^\S+/{re.escape(args.stage)}: recomputed in ([\d.]+) s", out, re.M)]
        walls.append(took)
        own.append(sum(seconds))
    i = min(range(len(walls)), key=lambda k: walls[k] - own[k])

    print(f"pipeline {args.pipeline!r}: {nodes} stage nodes; {os.cpu_count()} cores; fastest of {args.repeat} "
          "fresh processes each")
    print(f"  roads show {args.pipeline:<28} {show:7.2f} s")
    print(f"  floor: roads config + MLflow store open   {floor:7.2f} s")
    print(f"  no-op rerun: roads run {args.pipeline:<16} {noop:7.2f} s   ratio to show {noop / show:.2f}, "
          f"to the floor {noop / floor:.2f}")
    print(f"  roads stage {args.stage} --force (1 worker) {walls[i]:7.2f} s   its own compute {own[i]:.2f} s, "
          f"overhead {walls[i] - own[i]:.2f} s (median {statistics.median(w - o for w, o in zip(walls, own)):.2f} s)")
    print(f"  import floor of a training process        {stage_floor:7.2f} s   overhead beyond it "
          f"{walls[i] - own[i] - stage_floor:.2f} s")


if __name__ == "__main__":
    main()
