"""The Prefect task of stage `ivl` (see roads/stages/ivl.py for what it does)."""

from tasks.common import stage_task

ivl = stage_task("ivl")
