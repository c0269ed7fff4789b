"""Run one stage into the artifact store: a temporary folder that becomes ``<store>/<stage>/<digest>`` only when
the stage finished, so a failure or a kill leaves nothing that looks complete. A stage whose spec has ``launch``
set runs on several processes through ``accelerate launch`` (roads.launch) instead of in this process."""

from __future__ import annotations

import shutil
from pathlib import Path

from roads.artifacts import ArtifactRef, StageResult, commit_dir, new_temp_dir
from roads.config import StageSpec
from roads.stages import stage_module
from roads.training import NullTracker, Tracker, quiet_libraries


def execute(spec: StageSpec, inputs: dict[str, ArtifactRef], store: str | Path,
            tracker: Tracker = NullTracker()) -> StageResult:
    for name, ref in inputs.items():
        if not ref.exists():
            raise FileNotFoundError(f"{spec.stage}: input {name!r} is missing at {ref.path}; rerun its stage")
    quiet_libraries()
    tmp = new_temp_dir(store, spec.stage)
    try:
        if spec.launch is not None:
            from roads.launch import launch

            result = launch(spec, inputs, tmp, getattr(tracker, "run_id", None), tracker)
        else:
            result = stage_module(spec.stage).run(spec, inputs, tmp, tracker)
        result.artifact = commit_dir(tmp, store, spec.stage)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
