"""The Prefect task of stage `reward_model` (see roads/stages/reward_model.py for what it does)."""

from tasks.common import stage_task

reward_model = stage_task("reward_model")
