"""The stage graph and the plan: a pipeline expands into one node per (task, seed, stage or arm), one evaluation
per policy, and one report over everything.

Prefect-free, so the DAG is tested on its own; ``flows/study.py`` submits the nodes in this order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from roads.config import DATA_STAGES, POLICY_STAGES, VERIFIER_STAGES, ArmConfig, Defaults, StageSpec, Study, resolve_params

# input name -> the entry that provides it by default; a stage's `data`, `start` and `verifier` settings rename them
DEPENDS: dict[str, dict[str, str]] = {
    "prepare_data": {},
    "narrow_data": {"data": "prepare_data", "sft": "sft"},
    "sft": {"data": "prepare_data"},
    "sft_chosen": {"data": "prepare_data", "sft": "sft"},
    "reward_model": {"data": "prepare_data", "sft": "sft"},
    "local_rm": {"data": "prepare_data", "sft": "sft"},
    "genrm": {"data": "prepare_data", "sft": "sft"},
    "q_sft": {"data": "prepare_data", "sft": "sft"},  # + "verifier" when its returns come from a reward model
    "ivl": {"data": "prepare_data", "base": "sft", "target": "sft"},
    "offline_dpo": {"data": "prepare_data", "sft": "sft"},
    "online_dpo": {"data": "prepare_data", "reference": "sft", "start": "sft"},  # + "verifier" unless gold
    "online_rl": {"data": "prepare_data", "reference": "sft"},  # + "verifier" unless gold
    "gap": {"data": "prepare_data", "reference": "sft"},  # + "verifier.<entry>", "policy.<entry>"
    "evaluate": {"data": "prepare_data", "reference": "sft"},  # + "policy": the arm scored
}
# what kind of entry an input must name (checked when a pipeline is loaded)
COMPOSED_STAGES = ("q_sft", "ivl")  # policies made of several models: evaluated and sampled, not trained further
INPUT_KINDS = {"data": DATA_STAGES, "start": tuple(s for s in POLICY_STAGES if s not in COMPOSED_STAGES),
               "sft": ("sft",), "verifier": VERIFIER_STAGES, "policy": POLICY_STAGES, "base": ("sft",), "target": ("sft",)}


def stage_inputs(stage: str, params: dict[str, Any]) -> dict[str, str]:
    """Input name -> the entry (stage or arm) that provides it."""
    inputs = dict(DEPENDS[stage])
    if "data" in params:
        inputs["data"] = params["data"]
    if stage in ("reward_model", "local_rm", "genrm", "sft_chosen", "q_sft"):
        inputs["sft"] = params["start"]
    if stage == "ivl":
        inputs["base"], inputs["target"] = params["base"], params["target"]
    if stage == "q_sft" and params["reward"] == "reward_model":
        inputs["verifier"] = "reward_model"
    if stage == "online_dpo":
        inputs["start"] = params["start"]
    if stage in ("online_dpo", "online_rl") and params["verifier"] != "gold":
        inputs["verifier"] = params["verifier"]
    if stage == "gap":
        inputs.update({f"verifier.{v}": v for v in params["verifiers"]})
        inputs.update({f"policy.{p}": p for p in params["policies"]})
    return inputs


def input_kind(name: str) -> str:
    """'verifier.reward_model' -> 'verifier'."""
    return name.split(".", 1)[0]


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
        """The stage or arm this node runs."""
        return self.spec.variant or self.spec.stage


def is_policy(entry: str, arms: dict[str, ArmConfig]) -> bool:
    return (arms[entry].stage if entry in arms else entry) in POLICY_STAGES


def check_stage_closure(entries: list[str], arms: dict[str, ArmConfig] | None = None,
                        defaults: Defaults | None = None) -> str | None:
    """None when every entry's inputs are provided by entries of the list, else a one-line reason."""
    arms, defaults = arms or {}, defaults or Defaults()
    present = set(entries)
    for entry in entries:
        stage, params = resolve_params(entry, arms, defaults)
        if stage == "report":
            if "evaluate" not in present and not any(resolve_params(e, arms, defaults)[0] == "gap" for e in present):
                return "stage 'report' needs 'evaluate' or 'gap'; add one to the list"
            continue
        for name, provider in stage_inputs(stage, params).items():
            if provider not in present:
                return f"{entry!r} needs {provider!r} (its input {name!r}); add it to the list"
            kinds = INPUT_KINDS.get(input_kind(name))
            provider_stage = arms[provider].stage if provider in arms else provider
            if kinds and provider_stage not in kinds:
                return (f"{entry!r} takes its input {name!r} from {provider!r}, a {provider_stage} entry; "
                        f"it must be one of: {', '.join(kinds)}")
            if provider == entry:
                return f"{entry!r} cannot take its own output as its input {name!r}"
    return None


def _order(entries: list[str], study: Study) -> list[str]:
    """Entries in dependency order (stable: the listed order wherever the graph allows)."""
    remaining = [e for e in entries if study.stage_of(e) not in ("evaluate", "report")]
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


def arms(study: Study) -> list[str]:
    """The policies `evaluate` scores: every listed stage or arm whose output is a policy."""
    return [e for e in _order(study.spec.stages, study) if is_policy(e, study.arms)]


def build_plan(study: Study) -> list[Node]:
    """All nodes in topological order."""
    entries = _order(study.spec.stages, study)
    nodes: list[Node] = []
    reported: list[str] = []  # evaluations and gap measurements: the report's inputs
    for task_name in study.spec.tasks:
        for seed in study.spec.seeds:
            unit = f"{task_name}/seed{seed}"
            for entry in entries:
                spec = study.stage_spec(entry, task_name, seed)
                inputs = {k: f"{unit}/{v}" for k, v in stage_inputs(spec.stage, spec.params).items()}
                nodes.append(Node(f"{unit}/{entry}", spec, inputs))
                if spec.stage == "gap":
                    reported.append(nodes[-1].id)
            if "evaluate" in study.spec.stages:
                for arm in arms(study):
                    inputs = {k: f"{unit}/{v}" for k, v in DEPENDS["evaluate"].items()}
                    inputs["policy"] = f"{unit}/{arm}"
                    node_id = f"{unit}/evaluate[{arm}]"
                    nodes.append(Node(node_id, study.stage_spec("evaluate", task_name, seed, arm=arm), inputs))
                    reported.append(node_id)
    if "report" in study.spec.stages:
        seed = study.spec.seeds[0]
        nodes.append(Node("report", study.stage_spec("report", "", seed), {node_id: node_id for node_id in reported}))
    return nodes


def _matches(node: Node, name: str) -> bool:
    return node.stage == name or node.name == name


def downstream(nodes: list[Node], name: str) -> set[str]:
    """Ids of the nodes of stage or arm ``name`` and of every node that depends on them."""
    out = {n.id for n in nodes if _matches(n, name)}
    for node in nodes:  # topological order: one pass suffices
        if any(dep in out for dep in node.inputs.values()):
            out.add(node.id)
    return out


def upstream(nodes: list[Node], name: str) -> set[str]:
    """Ids of the nodes of stage or arm ``name`` and of every node they depend on."""
    by_id = {n.id: n for n in nodes}
    out: set[str] = set()
    todo = [n.id for n in nodes if _matches(n, name)]
    while todo:
        node_id = todo.pop()
        if node_id not in out:
            out.add(node_id)
            todo.extend(by_id[node_id].inputs.values())
    return out
