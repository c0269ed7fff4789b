"""The Prefect task of stage `offline_dpo` (see roads/stages/offline_dpo.py for what it does)."""

from tasks.common import stage_task

offline_dpo = stage_task("offline_dpo")
