"""The Prefect task of stage `sft` (see roads/stages/sft.py for what it does)."""

from tasks.common import stage_task

sft = stage_task("sft")
