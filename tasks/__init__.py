"""One Prefect task per stage of the stage table (``roads/stage_table.py``), all alike: cache key, artifact check,
MLflow child run, then ``roads.stages.<stage>.run`` (``tasks/common.py``). They are made from the table, not written
out one file each: a stage's task is its name and that body, nothing of its own."""

from functools import lru_cache


@lru_cache(maxsize=None)
def stage_task(stage: str):
    """The task of ``stage`` (made once per process)."""
    from roads.stage_table import STAGES
    from tasks.common import stage_task as make_task

    if stage not in STAGES:
        raise KeyError(f"{stage!r} is not a stage of the stage table")
    return make_task(stage)
