"""Sweeps: a grid over any ``--set`` keys of a pipeline (and seeds), expanded into points (each runs the pipeline once).

Each point is the pipeline with the point's overrides after the user's own. Points that share a stage with the same
settings and inputs share its node (``plan_keys``), so a sweep over ``offline_dpo.beta`` trains the SFT policy once.
Prefect-free, like the planner: ``flows/sweep.py`` runs the points.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roads.config import Study, SweepConfig, load_study, load_study_file
from roads.errors import ConfigError
from roads.plan import Node, build_plan


@dataclass(frozen=True)
class SweepPoint:
    """One point of the grid: its name, the swept values (key -> value; ``seed`` for the seed dimension) and the
    ``--set`` overrides that make it."""

    name: str
    values: dict[str, Any]
    overrides: tuple[str, ...]


def _text(value: Any) -> str:
    """A value as YAML reads it back (JSON is YAML) and as a short label."""
    return value if isinstance(value, str) and value.strip() == value and value else json.dumps(value)


def expand(sweep: SweepConfig) -> list[SweepPoint]:
    """The grid's product in the order the file gives (last key fastest), then seeds."""
    dims = list(sweep.grid.items())
    if sweep.seeds:
        dims.append(("seed", list(sweep.seeds)))
    if not dims:
        return [SweepPoint("base", {}, ())]
    points = []
    for combo in itertools.product(*(values for _, values in dims)):
        values = dict(zip((key for key, _ in dims), combo))
        overrides = tuple(f"pipeline.seeds=[{v}]" if key == "seed" else f"{key}={json.dumps(v)}"
                          for key, v in values.items())
        name = ",".join(f"{key}={_text(v)}" for key, v in values.items())
        points.append(SweepPoint(name, values, overrides))
    return points


def load_sweep(path: str | Path, name: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SweepConfig, list[tuple[SweepPoint, Study]]]:
    """The sweep and each point's validated study (the user's overrides, then the point's). Raises ConfigError naming
    the sweep and point when an point's config is bad."""
    study_file = load_study_file(path)
    if name not in study_file.sweeps:
        known = ", ".join(sorted(study_file.sweeps)) or "none (add a sweeps: section)"
        raise ConfigError(f"{path}: unknown sweep {name!r}; known: {known}")
    sweep = study_file.sweeps[name]
    studies = []
    for point in expand(sweep):
        try:
            studies.append((point, load_study(path, sweep.pipeline, [*overrides, *point.overrides])))
        except ConfigError as err:
            raise ConfigError(f"{path}: sweeps.{name}: point {point.name}: {err}") from None
    return sweep, studies


def plan_keys(nodes: list[Node]) -> dict[str, str]:
    """Node id -> a key of what the node computes (stage, settings fingerprint, and its inputs' keys): equal keys
    across points are one computation, run once."""
    by_id = {n.id: n for n in nodes}
    keys: dict[str, str] = {}

    def key(node_id: str) -> str:
        if node_id not in keys:
            node = by_id[node_id]
            parts = [node.stage, node.spec.fingerprint(), *(f"{k}={key(v)}" for k, v in sorted(node.inputs.items()))]
            keys[node_id] = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
        return keys[node_id]

    for node in nodes:
        key(node.id)
    return keys


def point_plans(studies: list[tuple[SweepPoint, Study]]) -> list[tuple[SweepPoint, Study, list[Node], dict[str, str]]]:
    """Each point's plan and its nodes' keys."""
    out = []
    for point, study in studies:
        nodes = build_plan(study)
        out.append((point, study, nodes, plan_keys(nodes)))
    return out


def resources_for(sweep: SweepConfig, stage: str) -> dict[str, float]:
    """Ray resources of a stage: the sweep's ``default`` with the stage's own on top."""
    return {**sweep.resources.get("default", {}), **sweep.resources.get(stage, {})}
