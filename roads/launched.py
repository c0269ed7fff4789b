"""What every process of a launched stage runs: ``python -m roads.launched JOB.json`` under ``accelerate launch``
(started by ``roads.launch.launch``; see its docstring). A plain process of a torch distributed group.

Every rank runs the stage's ``run(spec, inputs, out, tracker)`` — the Trainer's collectives (DDP gradients, FSDP
and DeepSpeed gathers, ``save_model``) need all of them. Rank 0 writes into the stage's temporary output folder,
logs per-step metrics through the sink the caller named in the job (``rank_metrics``, built from ``run_id``; none:
metrics are dropped) and prints progress lines for the parent; the other ranks write into scratch folders that are
deleted. Then the ranks exchange what they ran on and rank 0 writes ``launch.json`` and the result (metrics,
files) for the parent. A rank that raises a RoadsError writes its type and message to ``error-rank<R>.json`` so the
parent raises the same error.
"""

from __future__ import annotations

import os
import pkgutil
import shutil
import sys
import tempfile
from pathlib import Path

from roads.artifacts import ArtifactRef, read_json, write_json
from roads.config import StageSpec, global_batch
from roads.errors import RoadsError
from roads.stages import stage_module
from roads.training import NullTracker, quiet_libraries

LAUNCH_FILE = "launch.json"  # in the stage's output: backend, world size, each rank's device


def metrics_sink(rank_metrics: str | None, run_id: str | None):
    """What logs rank 0's per-step metrics: the callable ``rank_metrics`` names (``"package.module:name"``, the
    caller's choice; the library names no tracking system) called with ``run_id``; a NullTracker without one."""
    if not rank_metrics:
        return NullTracker()
    return pkgutil.resolve_name(rank_metrics)(run_id)


class RankZeroTracker:
    """Rank 0's tracker: per-step metrics into ``metrics`` (``metrics_sink``), progress lines to stdout, which the
    parent streams into the stage's progress log."""

    def __init__(self, metrics):
        self.metrics = metrics

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.log_metrics(metrics, step)

    def progress(self, message: str) -> None:
        print(message, flush=True)


def _gather(info: dict) -> list[dict]:
    """Every rank's ``info``, in rank order (a collective: all ranks call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [info]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, info)
    return everyone


def main(argv: list[str]) -> int:
    job = read_json(argv[0])
    spec = StageSpec(**job["spec"])
    inputs = {name: ArtifactRef.from_json(ref) for name, ref in job["inputs"].items()}
    rank = int(os.environ.get("RANK", "0"))
    quiet_libraries()
    out = Path(job["out_dir"]) if rank == 0 else Path(tempfile.mkdtemp(prefix=f"roads-{spec.stage}-rank{rank}-"))
    tracker = RankZeroTracker(metrics_sink(job.get("rank_metrics"), job.get("run_id"))) if rank == 0 else NullTracker()
    try:
        result = stage_module(spec.stage).run(spec, inputs, out, tracker)
        from accelerate import PartialState

        state = PartialState()  # the state the stage's Trainer set up (shared)
        ranks = _gather({"rank": state.process_index, "device": str(state.device)})
        if rank == 0:
            batch = global_batch(spec.stage, spec.params)
            world = len(ranks)
            write_json(out / LAUNCH_FILE, {
                "backend": spec.launch.backend,
                "num_processes": spec.launch.num_processes,
                "world_size": world,
                "distributed_type": str(state.distributed_type).split(".")[-1],
                "mixed_precision": spec.launch.mixed_precision,
                "global_batch_size": batch,
                "per_device_batch_size": batch // world,
                "ranks": ranks,
            })
            metrics = {**result.metrics, "launch/world_size": float(world)}
            write_json(job["result"], {"metrics": metrics, "files": [*result.files, LAUNCH_FILE]})
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except RoadsError as err:
        write_json(Path(job["errors"]) / f"error-rank{rank}.json", {"type": type(err).__name__, "message": str(err)})
        print(f"rank {rank}: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if rank != 0:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
