"""The Prefect task of stage `online_dpo` (see roads/stages/online_dpo.py for what it does)."""

from tasks.common import stage_task

online_dpo = stage_task("online_dpo")
