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


def test_a_sweep_table_shows_the_columns_its_tasks_have():
    """`roads sweep` printed only gold reward and win rate, empty for real data; it now shows what `roads run` does:
    the columns some policy has (KL, length, finished rate, the proxy win rate for real data)."""
    from flows.sweep import sweep_metrics, sweep_rows

    node = {"cache": "miss"}
    real = {"task": "hh", "seed": 0, "gold_reward_mean": None, "win_rate": None, "kl_to_reference": 0.5,
            "length_mean": 20.0, "finished_rate": 1.0, "proxy_win_rate": 0.6}
    outcome = {"points": [{"point": "lr=1", "nodes": [node], "summary": [{**real, "policy": "sft"}]},
                          {"point": "lr=2", "nodes": [node, node], "summary": [{**real, "policy": "offline_dpo",
                                                                                  "proxy_win_rate": 0.7}]}]}
    shown = sweep_metrics(outcome)
    assert shown == ("kl_to_reference", "length_mean", "finished_rate", "proxy_win_rate")
    rows = sweep_rows(outcome)
    assert [(r["point"], r["policy"], r["proxy_win_rate"], r["cached"]) for r in rows] == [
        ("lr=1", "sft", 0.6, "0/1"), ("lr=2", "offline_dpo", 0.7, "0/2")]
    assert "gold_reward_mean" not in rows[0]
    gold = {"points": [{"point": "p", "nodes": [node], "summary": [{"task": "gap", "seed": 0, "policy": "sft",
                                                                    "gold_reward_mean": 0.3, "win_rate": 0.5}]}]}
    assert sweep_metrics(gold) == ("gold_reward_mean", "win_rate")
