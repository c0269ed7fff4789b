"""The Prefect task of stage `q_sft` (see roads/stages/q_sft.py for what it does)."""

from tasks.common import stage_task

q_sft = stage_task("q_sft")
