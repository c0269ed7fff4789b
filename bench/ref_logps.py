"""What computing the reference's log-probs once saves (roads/reference.py), on one (task, seed) unit of a pipeline:
offline DPO and its compute control (offline_dpo_2x: one more epoch, the same pairs and reference) with the
reference's log-probs

  off      computed in every training step, as TRL does by default (offline_dpo.precompute_ref=false),
  once     computed once per run before training, into a fresh store (the first DPO run on these pairs),
  shared   read from the store the first run wrote (every later DPO run on the same pairs and reference).

The stage functions are called directly, one after another, in this process; prepare_data and SFT once, first.

    python bench/ref_logps.py [--pipeline default] [--task gap] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="default")
    parser.add_argument("--task", default="gap")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.chdir(ROOT)
    scratch = Path(tempfile.mkdtemp(prefix="roads-bench-ref-"))
    os.environ.update(HF_HUB_OFFLINE="1", ROADS_HOME=str(scratch / "home-once"))
    import torch

    from roads.config import load_study
    from roads.runner import execute

    torch.set_num_threads(args.threads)
    study = load_study("pipelines.yaml", args.pipeline)
    seed = study.spec.seeds[0]
    store = scratch / "store"
    data = execute(study.stage_spec("prepare_data", args.task, seed), {}, store).artifact
    sft = execute(study.stage_spec("sft", args.task, seed), {"data": data}, store).artifact
    entries = ("offline_dpo", "offline_dpo_2x")

    def run(entry: str, precompute: bool) -> float:
        spec = study.stage_spec(entry, args.task, seed)
        spec = spec.model_copy(update={"params": {**spec.params, "precompute_ref": precompute}})
        start = time.perf_counter()
        execute(spec, {"data": data, "sft": sft}, store)
        return time.perf_counter() - start

    off = {e: run(e, False) for e in entries}
    once = {e: run(e, True) for e in entries}  # offline_dpo computes them, offline_dpo_2x already shares them
    shared = {"offline_dpo": run("offline_dpo", True)}  # and a rerun of offline_dpo (another lr, β, …) shares too
    print(f"pipeline {args.pipeline!r}, task {args.task!r}, seed {seed}; {args.threads} torch threads; seconds per stage")
    print(f"  offline_dpo     off {off['offline_dpo']:6.2f}   once {once['offline_dpo']:6.2f}   shared "
          f"{shared['offline_dpo']:6.2f}")
    print(f"  offline_dpo_2x  off {off['offline_dpo_2x']:6.2f}   shared {once['offline_dpo_2x']:6.2f}")
    saved = sum(off.values()) - sum(once.values())
    units = len(study.spec.tasks) * len(study.spec.seeds)
    print(f"  both stages: {sum(off.values()):.2f} s -> {sum(once.values()):.2f} s, {saved:.2f} s saved per unit "
          f"({saved / sum(off.values()):.0%}); x {units} units of {args.pipeline!r} = {saved * units:.0f} s of compute")


if __name__ == "__main__":
    main()
