"""Data: synthetic gold-reward tasks (``synthetic``) and real preference data (``preferences``)."""

from __future__ import annotations

from typing import Callable, Optional

from roads.config import TaskConfig
from roads.data.synthetic import SyntheticTask


def synthetic_task(task: TaskConfig) -> Optional[SyntheticTask]:
    """The gold-reward task behind a task config, or None for real data (no gold reward)."""
    if task.family == "preferences":
        return None
    return SyntheticTask(task.family, task.alphabet, task.min_len, task.max_len, task.secret)


def gold_reward_fn(task: TaskConfig) -> Optional[Callable[[str, str], float]]:
    synthetic = synthetic_task(task)
    return synthetic.gold_reward if synthetic else None
