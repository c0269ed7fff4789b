"""The Prefect task of stage `gap` (see roads/stages/gap.py for what it does)."""

from tasks.common import stage_task

gap = stage_task("gap")
