"""The Prefect task of stage `prepare_data` (see roads/stages/prepare_data.py for what it does)."""

from tasks.common import stage_task

prepare_data = stage_task("prepare_data")
