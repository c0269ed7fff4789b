"""The Prefect task of stage `online_rl` (see roads/stages/online_rl.py for what it does)."""

from tasks.common import stage_task

online_rl = stage_task("online_rl")
