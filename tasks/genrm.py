"""The Prefect task of stage `genrm` (see roads/stages/genrm.py for what it does)."""

from tasks.common import stage_task

genrm = stage_task("genrm")
