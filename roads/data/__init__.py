"""Data: synthetic gold-reward tasks (``synthetic``) and real preference data (``preferences``)."""

from __future__ import annotations

from typing import Callable, Optional

from roads.settings import TaskConfig
from roads.data.star import StarTask
from roads.data.synthetic import SyntheticTask


def synthetic_task(task: TaskConfig) -> Optional[SyntheticTask]:
    """The gold-reward task behind a task config, or None for real data (no gold reward)."""
    if task.family == "preferences":
        return None
    if task.family == "star":
        return StarTask(alphabet=task.alphabet, degree=task.degree, arm_len=task.arm_len, min_len=task.min_len,
                        max_len=task.max_len, secret=task.secret)
    return SyntheticTask(task.family, task.alphabet, task.min_len, task.max_len, task.secret)


def gold_reward_fn(task: TaskConfig) -> Optional[Callable[[str, str], float]]:
    synthetic = synthetic_task(task)
    return synthetic.gold_reward if synthetic else None


def task_of(data_folder) -> tuple[str, TaskConfig]:
    """The (name, config) of the task a prepare_data output folder was made from (its ``task.json``)."""
    from roads.artifacts import read_json

    info = dict(read_json(f"{data_folder}/task.json"))
    name = info.pop("name")
    return name, TaskConfig(**info)


def gold_of(data_folder) -> tuple[str, Optional[Callable[[str, str], float]]]:
    """(task name, gold reward r*(prompt, response) or None) of a data folder: what the stages that score need."""
    name, task = task_of(data_folder)
    return name, gold_reward_fn(task)
