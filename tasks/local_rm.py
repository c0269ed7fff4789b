"""The Prefect task of stage `local_rm` (see roads/stages/local_rm.py for what it does)."""

from tasks.common import stage_task

local_rm = stage_task("local_rm")
