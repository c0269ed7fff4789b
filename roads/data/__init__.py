"""Data: synthetic gold-reward tasks (``synthetic``) and real preference data (``preferences``)."""

from __future__ import annotations

from typing import Callable, Optional

from roads.settings import TaskConfig
from roads.data.family import TaskFamily, build


def synthetic_task(task: TaskConfig) -> Optional[TaskFamily]:
    """The gold-reward task family behind a task config (built-in or the user's, :mod:`roads.data.family`), or None
    for real data (no gold reward)."""
    if task.family == "preferences":
        return None
    return build(task)


def gold_reward_fn(task: TaskConfig) -> Optional[Callable[[str, str], float]]:
    synthetic = synthetic_task(task)
    return synthetic.gold_reward if synthetic else None


def task_of(data_folder) -> tuple[str, TaskConfig]:
    """The (name, config) of the task a prepare_data output folder was made from (its ``task.json``)."""
    from roads.artifacts import read_json

    info = dict(read_json(f"{data_folder}/task.json"))
    name = info.pop("name")
    info.pop("family_source", None)  # a user family's source digest (prepare_data): part of the data, not a setting
    return name, TaskConfig(**info)


def gold_of(data_folder) -> tuple[str, Optional[Callable[[str, str], float]]]:
    """(task name, gold reward r*(prompt, response) or None) of a data folder: what the stages that score need."""
    name, task = task_of(data_folder)
    return name, gold_reward_fn(task)
