"""Run one stage into the artifact store: a temporary folder that becomes ``<store>/<stage>/<digest>`` only when
the stage finished, so a failure or a kill leaves nothing that looks complete. A stage whose spec has ``launch``
with a backend runs on several processes through ``accelerate launch`` (roads.launch); any other runs in this
process, under the spec's mixed precision (``launch.mixed_precision`` with backend none; float32 without it)."""

from __future__ import annotations

import shutil
from pathlib import Path

from roads.artifacts import ArtifactRef, StageResult, commit_dir, new_temp_dir
from roads.config import StageSpec
from roads.stages import stage_module
from roads.training import NullTracker, Tracker, mixed_precision, quiet_libraries


def execute(spec: StageSpec, inputs: dict[str, ArtifactRef], store: str | Path,
            tracker: Tracker = NullTracker()) -> StageResult:
    """Run ``spec`` on ``inputs`` into ``store``; the stage reports to ``tracker``. For a launched stage the tracker
    may also carry ``rank_metrics`` and ``run_id``: what the launched rank 0 logs its per-step metrics through, in a
    process of its own (``roads.launch.launch``); without them those metrics are dropped (progress still comes)."""
    for name, ref in inputs.items():
        if not ref.exists():
            raise FileNotFoundError(f"{spec.stage}: input {name!r} is missing at {ref.path}; rerun its stage")
    quiet_libraries()
    tmp = new_temp_dir(store, spec.stage)
    try:
        if spec.launched:
            from roads.launch import launch

            result = launch(spec, inputs, tmp, tracker, rank_metrics=getattr(tracker, "rank_metrics", None),
                            run_id=getattr(tracker, "run_id", None))
        else:
            with mixed_precision(spec.launch.mixed_precision if spec.launch else "no"):
                result = stage_module(spec.stage).run(spec, inputs, tmp, tracker)
        result.artifact = commit_dir(tmp, store, spec.stage)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        try:  # the stage's folder too, when this failure was its first output: a failed stage leaves no trace
            tmp.parent.rmdir()
        except OSError:  # it holds other outputs (or another writer's folder)
            pass
        raise
    return result
