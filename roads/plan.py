"""The stage graph and the plan: a pipeline expands into one node per (task, seed, stage or variant), one evaluation
per policy, and one report over everything.

Prefect-free, so the DAG is tested on its own; ``flows/study.py`` submits the nodes in this order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from roads.config import StageSpec, Study, VariantConfig
from roads.stage_table import STAGES, stage_inputs


@dataclass(frozen=True)
class Node:
    id: str  # "gap/seed0/sft", "gap/seed0/offline_dpo_2x", "gap/seed0/evaluate[offline_dpo]", "report"
    spec: StageSpec
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> node id

    @property
    def stage(self) -> str:
        return self.spec.stage

    @property
    def name(self) -> str:
        """The stage or variant this node runs."""
        return self.spec.variant or self.spec.stage


def is_policy(entry: str, variants: dict[str, VariantConfig]) -> bool:
    return "policy" in STAGES[variants[entry].stage if entry in variants else entry].roles


def _order(entries: list[str], study: Study) -> list[str]:
    """Entries in dependency order (stable: the listed order wherever the graph allows)."""
    remaining = [e for e in entries if STAGES[study.stage_of(e)].kind != "report" and not per_policy(study, e)]
    remaining = list(dict.fromkeys(remaining))
    done: list[str] = []
    while remaining:
        for entry in remaining:
            needs = stage_inputs(study.stage_of(entry), study.params(entry)).values()
            if all(n in done for n in needs):
                done.append(entry)
                remaining.remove(entry)
                break
        else:
            return done + remaining  # a cycle cannot be built from the config; keep the listed order
    return done


def per_policy(study: Study, entry: str) -> bool:
    return STAGES[study.stage_of(entry)].per_policy


def policies(study: Study) -> list[str]:
    """The policies `evaluate` scores: every listed stage or variant whose output is a policy."""
    return [e for e in _order(study.spec.stages, study) if is_policy(e, study.variants)]


def build_plan(study: Study) -> list[Node]:
    """All nodes in topological order: per (task, seed) unit, each entry in dependency order, then each per-policy
    entry (``evaluate``) once per policy; last the report over every measurement (the ``measure`` stages' nodes)."""
    entries = _order(study.spec.stages, study)
    listed = list(dict.fromkeys(study.spec.stages))
    nodes: list[Node] = []
    reported: list[str] = []  # evaluations and gap measurements: the report's inputs
    for task_name in study.spec.tasks:
        for seed in study.spec.seeds:
            unit = f"{task_name}/seed{seed}"

            def add(node_id: str, spec: StageSpec, inputs: dict[str, str]) -> None:
                nodes.append(Node(f"{unit}/{node_id}", spec, {k: f"{unit}/{v}" for k, v in inputs.items()}))
                if STAGES[spec.stage].kind in ("measure", "select"):
                    reported.append(nodes[-1].id)

            for entry in entries:
                spec = study.stage_spec(entry, task_name, seed)
                add(entry, spec, stage_inputs(spec.stage, spec.params))
            for entry in (e for e in listed if per_policy(study, e)):
                for policy in policies(study):
                    spec = study.stage_spec(entry, task_name, seed, policy=policy)
                    add(f"{entry}[{policy}]", spec, {**stage_inputs(spec.stage, spec.params), "policy": policy})
    for entry in (e for e in listed if STAGES[study.stage_of(e)].kind == "report"):
        nodes.append(Node(entry, report_spec(study, entry), {node_id: node_id for node_id in reported}))
    return nodes


def report_spec(study: Study, entry: str) -> StageSpec:
    """The report's spec, with what the pipeline declares filled in where its settings leave it open: the policies
    in the order of ``stages``, the variants' learning-curve ``series``."""
    spec = study.stage_spec(entry, "", study.spec.seeds[0])
    listed = list(dict.fromkeys(study.spec.stages))
    declared = {e: study.variants[e].series for e in listed if e in study.variants and study.variants[e].series}
    params = {**spec.params, "policies": spec.params["policies"] or [e for e in listed if is_policy(e, study.variants)],
              "series": {**declared, **spec.params["series"]}}
    return spec.model_copy(update={"params": params})


def _matches(node: Node, name: str) -> bool:
    return node.stage == name or node.name == name


def downstream(nodes: list[Node], name: str) -> set[str]:
    """Ids of the nodes of stage or variant ``name`` and of every node that depends on them."""
    out = {n.id for n in nodes if _matches(n, name)}
    for node in nodes:  # topological order: one pass suffices
        if any(dep in out for dep in node.inputs.values()):
            out.add(node.id)
    return out


def upstream(nodes: list[Node], name: str) -> set[str]:
    """Ids of the nodes of stage or variant ``name`` and of every node they depend on."""
    by_id = {n.id: n for n in nodes}
    out: set[str] = set()
    todo = [n.id for n in nodes if _matches(n, name)]
    while todo:
        node_id = todo.pop()
        if node_id not in out:
            out.add(node_id)
            todo.extend(by_id[node_id].inputs.values())
    return out
