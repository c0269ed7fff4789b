"""Sweep expansion (pipelines.yaml's sweeps:): the grid's product, seeds as a dimension, per-point validation,
shared nodes across points, Ray resources — and one clear line for every mistake."""

import textwrap
from pathlib import Path

import pytest

from roads.config import SweepConfig, load_study_file
from roads.errors import ConfigError
from roads.sweep import point_plans, expand, load_sweep, plan_keys, resources_for

ROOT = Path(__file__).resolve().parents[2]


def test_grid_expands_to_the_product_in_file_order_with_overrides_that_yaml_reads_back():
    sweep = SweepConfig(pipeline="p", grid={"offline_dpo.beta": [0.1, 0.3], "sft.epochs": [1, 2, 3]})
    points = expand(sweep)
    assert len(points) == 6
    assert [a.values for a in points[:3]] == [{"offline_dpo.beta": 0.1, "sft.epochs": e} for e in (1, 2, 3)]
    assert points[0].name == "offline_dpo.beta=0.1,sft.epochs=1"
    assert points[-1].overrides == ("offline_dpo.beta=0.3", "sft.epochs=3")
    assert len({a.name for a in points}) == 6


def test_seeds_are_a_dimension_of_their_own_and_strings_lists_survive():
    sweep = SweepConfig(pipeline="p", grid={"model.preset": ["tiny", "small"], "measure_gap.verifiers": [["a", "b"]]},
                        seeds=[0, 7])
    points = expand(sweep)
    assert len(points) == 4
    assert points[1].values == {"model.preset": "tiny", "measure_gap.verifiers": ["a", "b"], "seed": 7}
    assert points[1].overrides == ('model.preset="tiny"', 'measure_gap.verifiers=["a", "b"]', "pipeline.seeds=[7]")
    assert points[1].name == 'model.preset=tiny,measure_gap.verifiers=["a", "b"],seed=7'


def test_an_empty_grid_is_one_point_and_repeats_and_bad_resources_are_refused():
    assert [a.name for a in expand(SweepConfig(pipeline="p"))] == ["base"]
    with pytest.raises(ValueError, match="grid.sft.epochs: a value is repeated"):
        SweepConfig(pipeline="p", grid={"sft.epochs": [1, 1]})
    with pytest.raises(ValueError, match="grid.sft.epochs: give at least one value"):
        SweepConfig(pipeline="p", grid={"sft.epochs": []})
    with pytest.raises(ValueError, match="resources.sftt: not a stage"):
        SweepConfig(pipeline="p", resources={"sftt": {"num_cpus": 1}})
    with pytest.raises(ValueError, match="resources.sft.gpus: unknown resource"):
        SweepConfig(pipeline="p", resources={"sft": {"gpus": 1}})


def test_resources_are_the_default_with_the_stage_on_top():
    sweep = SweepConfig(pipeline="p", resources={"default": {"num_cpus": 1}, "sft": {"num_gpus": 1, "num_cpus": 4}})
    assert resources_for(sweep, "sft") == {"num_cpus": 4, "num_gpus": 1}
    assert resources_for(sweep, "evaluate") == {"num_cpus": 1}


def test_the_projects_sweeps_load_and_points_share_the_stages_the_grid_does_not_touch():
    sweep, studies = load_sweep(ROOT / "pipelines.yaml", "sweep-smoke")
    assert [point.name for point, _ in studies] == ["offline_dpo.beta=0.1", "offline_dpo.beta=0.5"]
    assert [s.params("offline_dpo")["beta"] for _, s in studies] == [0.1, 0.5]
    plans = point_plans(studies)
    (_, _, nodes_a, keys_a), (_, _, nodes_b, keys_b) = plans
    shared = {n for n in keys_a if keys_a[n] == keys_b.get(n)}
    assert shared == {"gap/seed0/prepare_data", "gap/seed0/sft", "gap/seed0/evaluate[sft]"}
    assert keys_a["gap/seed0/offline_dpo"] != keys_b["gap/seed0/offline_dpo"]
    # a change upstream changes every key downstream of it
    _, moved = load_sweep(ROOT / "pipelines.yaml", "sweep-smoke", ["sft.epochs=2"])
    keys_c = plan_keys(point_plans(moved)[0][2])
    assert keys_c["gap/seed0/prepare_data"] == keys_a["gap/seed0/prepare_data"]
    assert keys_c["gap/seed0/sft"] != keys_a["gap/seed0/sft"]
    assert keys_c["gap/seed0/offline_dpo"] != keys_a["gap/seed0/offline_dpo"]
    for name in load_study_file(ROOT / "pipelines.yaml").sweeps:
        load_sweep(ROOT / "pipelines.yaml", name)  # every sweep of the project is valid, point by point


def _file(tmp_path: Path, sweeps: str) -> Path:
    text = (ROOT / "pipelines.yaml").read_text().split("\nsweeps:")[0] + "\nsweeps:\n" + textwrap.indent(
        textwrap.dedent(sweeps), "  ")
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("sweeps, message", [
    ("bad: {pipeline: nope}", "sweeps.bad.pipeline: unknown pipeline 'nope'"),
    ("bad: {pipeline: sweep-smoke, grid: {sft.epochz: [1, 2]}}", "sweeps.bad: point sft.epochz=1: --set sft.epochz=1"),
    ("bad: {pipeline: sweep-smoke, grid: {sft.epochs: [1, -1]}}", "sweeps.bad: point sft.epochs=-1"),
    ("bad: {pipeline: sweep-smoke, grid: {offline_dpo.beta: 0.1}}", "sweeps.bad.grid.offline_dpo.beta"),
    ("bad: {pipeline: sweep-smoke, runner: slurm}", "sweeps.bad.runner"),
])
def test_a_bad_sweep_is_one_line_naming_the_sweep_and_point(tmp_path, sweeps, message):
    path = _file(tmp_path, sweeps)
    with pytest.raises(ConfigError) as err:
        load_sweep(path, "bad")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_an_unknown_sweep_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown sweep 'nope'; known: .*sweep-smoke"):
        load_sweep(ROOT / "pipelines.yaml", "nope")
