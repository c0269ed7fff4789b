"""The Prefect task of stage `evaluate` (see roads/stages/evaluate.py for what it does)."""

from tasks.common import stage_task

evaluate = stage_task("evaluate")
