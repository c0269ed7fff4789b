"""flows/outcome.py: which nodes `roads stage NAME` runs (no Prefect needed)."""

from pathlib import Path

from flows.outcome import select
from roads.config import load_study
from roads.plan import build_plan

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines.yaml"


def test_a_stage_selection_is_closed_under_inputs():
    nodes = build_plan(load_study(PIPELINES, "default"))
    chosen = select(nodes, "reward_model")
    ids = {n.id for n in chosen}
    assert all(dep in ids for n in chosen for dep in n.inputs.values())  # every input is there to feed it
    # online DPO from offline DPO depends on the reward model, and needs the offline-DPO policy as its start
    assert "shuffle/seed0/online_dpo_dpo" in ids and "shuffle/seed0/offline_dpo" in ids
    assert "report" in ids  # it follows from the online policies' evaluations, and needs every evaluation
    smoke = {n.id for n in select(build_plan(load_study(PIPELINES, "smoke")), "reward_model")}
    assert "gap/seed0/reward_model" in smoke and "gap/seed0/offline_dpo" not in smoke  # nothing there needs it
    assert [n.id for n in chosen] == [n.id for n in nodes if n.id in ids]  # topological order kept
    assert select(nodes, None) == nodes
