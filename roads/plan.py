"""The stage graph and the plan: a pipeline expands into one node per (task, seed, stage), evaluate once per arm.

Prefect-free, so the DAG is tested on its own; ``flows/study.py`` submits the nodes in this order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from roads.config import POLICY_STAGES, StageSpec, Study

# input name -> the stage that provides it ("<arm>" means: the policy stage being evaluated)
DEPENDS: dict[str, dict[str, str]] = {
    "prepare_data": {},
    "sft": {"data": "prepare_data"},
    "reward_model": {"data": "prepare_data", "sft": "sft"},
    "offline_dpo": {"data": "prepare_data", "sft": "sft"},
    "evaluate": {"data": "prepare_data", "reference": "sft", "policy": "<arm>"},
}


@dataclass(frozen=True)
class Node:
    id: str  # "gap/seed0/sft", "gap/seed0/evaluate[offline_dpo]"
    spec: StageSpec
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> node id

    @property
    def stage(self) -> str:
        return self.spec.stage


def check_stage_closure(stages: list[str]) -> str | None:
    """None when every stage's dependencies are in the list, else a one-line reason."""
    present = set(stages)
    for stage in stages:
        for provider in DEPENDS[stage].values():
            if provider != "<arm>" and provider not in present:
                return f"stage {stage!r} needs {provider!r}; add it to the list"
    if "evaluate" in present and not present & set(POLICY_STAGES):
        return f"stage 'evaluate' needs a policy stage to score ({', '.join(POLICY_STAGES)})"
    return None


def arms(study: Study) -> list[str]:
    return [s for s in POLICY_STAGES if s in study.spec.stages]


def build_plan(study: Study) -> list[Node]:
    """All nodes in topological order (stages in graph order within each unit)."""
    order = [s for s in DEPENDS if s in study.spec.stages]
    nodes: list[Node] = []
    for task_name in study.spec.tasks:
        for seed in study.spec.seeds:
            unit = f"{task_name}/seed{seed}"
            for stage in order:
                if stage == "evaluate":
                    for arm in arms(study):
                        inputs = {k: f"{unit}/{arm if v == '<arm>' else v}" for k, v in DEPENDS[stage].items()}
                        spec = study.stage_spec(stage, task_name, seed, arm=arm)
                        nodes.append(Node(f"{unit}/evaluate[{arm}]", spec, inputs))
                else:
                    inputs = {k: f"{unit}/{v}" for k, v in DEPENDS[stage].items()}
                    nodes.append(Node(f"{unit}/{stage}", study.stage_spec(stage, task_name, seed), inputs))
    return nodes


def downstream(nodes: list[Node], stage: str) -> set[str]:
    """Ids of the nodes of ``stage`` and of every node that depends on them."""
    out = {n.id for n in nodes if n.stage == stage}
    for node in nodes:  # topological order: one pass suffices
        if any(dep in out for dep in node.inputs.values()):
            out.add(node.id)
    return out


def upstream(nodes: list[Node], stage: str) -> set[str]:
    """Ids of the nodes of ``stage`` and of every node they depend on."""
    by_id = {n.id: n for n in nodes}
    out: set[str] = set()
    todo = [n.id for n in nodes if n.stage == stage]
    while todo:
        node_id = todo.pop()
        if node_id not in out:
            out.add(node_id)
            todo.extend(by_id[node_id].inputs.values())
    return out
