"""The Prefect task of stage `sft_chosen` (see roads/stages/sft_chosen.py for what it does)."""

from tasks.common import stage_task

sft_chosen = stage_task("sft_chosen")
