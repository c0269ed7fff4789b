"""One module per stage, each with ``VERSION`` and one public ``run(spec, inputs, out_dir, tracker) -> StageResult``."""

from importlib import import_module

from roads.stage_table import STAGE_NAMES


def stage_module(name: str):
    if name not in STAGE_NAMES:
        raise KeyError(name)
    return import_module(f"roads.stages.{name}")
