"""The Prefect task of stage `narrow_data` (see roads/stages/narrow_data.py for what it does)."""

from tasks.common import stage_task

narrow_data = stage_task("narrow_data")
