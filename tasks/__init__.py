"""One thin Prefect task per stage: cache key, artifact check, MLflow child run, then ``roads.stages.<stage>.run``."""

from importlib import import_module


def stage_task(stage: str):
    """The task object of a stage, from its module ``tasks.<stage>``."""
    return getattr(import_module(f"tasks.{stage}"), stage)
