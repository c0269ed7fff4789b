"""The Prefect task of stage `report` (see roads/stages/report.py for what it does)."""

from tasks.common import stage_task

report = stage_task("report")
