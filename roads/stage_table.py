"""The stage table: what the code knows about each stage, in one row — its settings class, its kind, what its output
can serve as, its inputs (input name → the setting that names the entry providing it, and what that entry must be),
and whether it can run on several processes. ``roads/config.py`` (the study file, its checks) and ``roads/plan.py``
(the DAG) read it; nothing else lists stages.

Adding a stage is its settings class (``roads/settings.py``), its module (``roads/stages/<name>.py`` with ``VERSION``
and ``run``) and one row below. The Prefect task, the ``defaults`` section of ``pipelines.yaml``, the checks of a
pipeline's inputs, the evaluation of a policy and its place in the report follow from the row.

Roles (what an entry's output can serve as, matched against an input's ``accepts``):

- ``data``: a data folder (prompts, demonstrations, pairs) — a stage's ``data`` input;
- ``base``: a language model built or loaded from scratch (``sft``) — what the verifiers and composed policies
  start from, and the reference of every DPO/RL road;
- ``policy``: a policy ``evaluate`` scores (every policy is evaluated once per unit);
- ``trainable``: a policy that can be trained further (``online_dpo.start``); composed policies are not;
- ``verifier``: something that scores responses (``verifier.json`` in its output);
- ``selection``: settings chosen by a rule (``select_dpo``), read by the stages that name it in ``select``.

Kinds: ``data``, ``policy``, ``verifier``, ``select`` (chooses settings by a rule; the report shows the choice),
``measure`` (reads policies and verifiers: ``evaluate``, ``measure_gap``; the
report's inputs) and ``report``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from roads.settings import (DPO_SHARED, EvaluateConfig, GenRmConfig, IvlConfig, LocalRmConfig, MeasureGapConfig,
                            NarrowDataConfig, OfflineDpoConfig, OnlineDpoConfig, OnlineRlConfig, PrepareDataConfig,
                            QSftConfig, ReportConfig, RewardModelConfig, SelectDpoConfig, SftChosenConfig, SftConfig,
                            Strict)

KINDS = ("data", "policy", "verifier", "select", "measure", "report")
ROLES = ("data", "base", "policy", "trainable", "verifier", "selection")


@dataclass(frozen=True)
class Input:
    """One input of a stage. Its provider is the entry named by the stage's setting ``setting`` (or ``default`` when
    there is no setting); a setting value in ``absent`` means "no input" (``verifier: gold``). With ``each``, the
    setting is a list and every entry in it is an input of its own, named ``<input>.<entry>``."""

    accepts: str  # the role the provider must have (ROLES)
    setting: str | None = None
    default: str = ""
    absent: tuple[str, ...] = ()
    each: bool = False


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[Strict]
    kind: str  # KINDS
    roles: tuple[str, ...] = ()  # what the output can serve as (ROLES)
    inputs: dict[str, Input] = field(default_factory=dict)
    launchable: bool = False  # its training is one TRL/transformers Trainer: can run under `accelerate launch`
    reads: tuple[str, ...] = ()  # the study sections it reads itself: "model" (built from scratch), "task"
    shares: tuple[str, tuple[str, ...]] | None = None  # (stage, fields): those of the fields it does not set itself
    # come from that stage's section
    per_policy: bool = False  # one node per evaluated policy (input "policy"), not one per entry


DATA = Input("data", setting="data", default="prepare_data")
FIRST_DATA = Input("data", default="prepare_data")  # stages without a `data` setting read the task's own data
START = Input("base", setting="start", default="sft")
REFERENCE = Input("base", default="sft")
SELECTION = Input("selection", setting="select", absent=("",))  # the DPO settings chosen by a select_dpo entry

# The order is the one `roads show` and `--help` list; a study's own order is its pipeline's `stages`.
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare_data", PrepareDataConfig, "data", roles=("data",), reads=("task",)),
    Stage("narrow_data", NarrowDataConfig, "data", roles=("data",), inputs={"data": FIRST_DATA, "sft": REFERENCE}),
    Stage("sft", SftConfig, "policy", roles=("base", "policy", "trainable"), inputs={"data": FIRST_DATA},
          launchable=True, reads=("model",)),
    Stage("sft_chosen", SftChosenConfig, "policy", roles=("policy", "trainable"),
          inputs={"data": DATA, "sft": START}, launchable=True),
    Stage("reward_model", RewardModelConfig, "verifier", roles=("verifier",), inputs={"data": DATA, "sft": START},
          launchable=True),
    Stage("local_rm", LocalRmConfig, "verifier", roles=("verifier",), inputs={"data": DATA, "sft": START}),
    Stage("genrm", GenRmConfig, "verifier", roles=("verifier",), inputs={"data": DATA, "sft": START}),
    Stage("select_dpo", SelectDpoConfig, "select", roles=("selection",), inputs={"data": DATA, "sft": REFERENCE},
          shares=("offline_dpo", ("epochs", "batch_size", "rpo_alpha", "precompute_ref"))),
    Stage("offline_dpo", OfflineDpoConfig, "policy", roles=("policy", "trainable", "verifier"),
          inputs={"data": DATA, "sft": REFERENCE, "selection": SELECTION}, launchable=True),
    Stage("online_dpo", OnlineDpoConfig, "policy", roles=("policy", "trainable", "verifier"),
          inputs={"data": DATA, "reference": REFERENCE, "start": Input("trainable", setting="start", default="sft"),
                  "verifier": Input("verifier", setting="verifier", absent=("gold",)), "selection": SELECTION},
          shares=("offline_dpo", DPO_SHARED)),
    Stage("online_rl", OnlineRlConfig, "policy", roles=("policy", "trainable"),
          inputs={"data": FIRST_DATA, "reference": REFERENCE,
                  "verifier": Input("verifier", setting="verifier", absent=("gold",))}, launchable=True),
    Stage("q_sft", QSftConfig, "policy", roles=("policy",),
          inputs={"data": DATA, "sft": START, "verifier": Input("verifier", setting="reward", absent=("preferences",))}),
    Stage("ivl", IvlConfig, "policy", roles=("policy",),
          inputs={"data": DATA, "base": Input("base", setting="base"), "target": Input("base", setting="target")}),
    Stage("measure_gap", MeasureGapConfig, "measure",
          inputs={"data": DATA, "reference": REFERENCE, "verifier": Input("verifier", setting="verifiers", each=True),
                  "policy": Input("policy", setting="policies", each=True)}),
    Stage("evaluate", EvaluateConfig, "measure", inputs={"data": FIRST_DATA, "reference": REFERENCE,
                                                         "judge": Input("verifier", setting="judge", absent=("",))},
          per_policy=True),
    Stage("report", ReportConfig, "report"),
)}

STAGE_NAMES = tuple(STAGES)
# what a per-policy measurement (`evaluate`) reports of each policy, one column each in the study summary, the
# parent run's metrics and the report; the first two need a gold reward
POLICY_METRICS = ("gold_reward_mean", "win_rate", "kl_to_reference", "length_mean", "finished_rate", "proxy_win_rate")
GOLD_METRICS = POLICY_METRICS[:2]
# the win rate against SFT judged by a held-out verifier (evaluate.judge): the proxy where there is no gold reward
PROXY_METRICS = ("proxy_win_rate",)
LAUNCH_STAGES = tuple(s.name for s in STAGES.values() if s.launchable)
# the stages that train with LoRA when model.lora is set (their StageSpec carries it, so it is in their cache key)
LORA_STAGES = ("sft", "reward_model", "offline_dpo", "online_dpo", "select_dpo", "online_rl")


def with_role(role: str) -> tuple[str, ...]:
    """The stages whose output can serve as ``role``."""
    return tuple(s.name for s in STAGES.values() if role in s.roles)


def stage_inputs(stage: str, params: dict[str, Any]) -> dict[str, str]:
    """Input name -> the entry (stage or variant) that provides it, for a stage with resolved settings ``params``."""
    out: dict[str, str] = {}
    for name, spec in STAGES[stage].inputs.items():
        value = params.get(spec.setting, spec.default) if spec.setting else spec.default
        if spec.each:
            out.update({f"{name}.{entry}": entry for entry in value})
        elif value not in spec.absent:
            out[name] = value
    return out


def accepts(stage: str, input_name: str) -> str:
    """The role an input (``verifier.reward_model`` → ``verifier``) must be provided by; ``policy`` for the
    evaluated policy of a per-policy stage."""
    base = input_name.split(".", 1)[0]
    spec = STAGES[stage].inputs.get(base)
    return spec.accepts if spec else "policy"
