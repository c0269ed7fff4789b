"""Strict, frozen pydantic models of ``pipelines.yaml``: load, merge overrides, resolve one config per stage, fingerprint.

The file has five sections::

    defaults:   seed, model, launch (multi-process training), and one section per stage (see STAGE_NAMES)
    tasks:      named tasks (a synthetic family with its sizes, or real preference data by path or hub name)
    arms:       named variants of a stage (its settings with ``set`` on top); each is a node of its own
    pipelines:  named recipes: which tasks, seeds and stages or arms, plus ``set`` overrides of the defaults
    sweeps:     named grids over any override keys (and seeds) of a pipeline, expanded by ``roads.sweep``

A stage's ``data``, ``start``, ``verifier`` (and ivl's ``base``/``target``, gap's ``verifiers``/``policies``)
settings name the entries its inputs come from (see ``roads.plan.stage_inputs``). An override is ``KEY=VALUE`` with
KEY a dotted path: ``sft.epochs=2``, ``model.preset=small``, ``seed=3``, ``tasks.gap.alphabet=10``,
``arms.online_dpo_sft.set={start: sft}``, ``pipeline.seeds=[0,1,2]``. VALUE is parsed as YAML. Every mistake (unknown key, wrong
type, unknown stage, task or pipeline) raises :class:`ConfigError` with one line naming the file or override and
the key path.
"""

from __future__ import annotations

import copy
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from roads.errors import ConfigError

STAGE_NAMES = ("prepare_data", "narrow_data", "sft", "sft_chosen", "reward_model", "local_rm", "genrm", "offline_dpo",
               "online_dpo", "online_rl", "q_sft", "ivl", "gap", "evaluate", "report")
POLICY_STAGES = ("sft", "sft_chosen", "offline_dpo", "online_dpo", "online_rl", "q_sft", "ivl")  # what `evaluate` scores
DATA_STAGES = ("prepare_data", "narrow_data")  # what a stage's `data` may name
# global, local, generative, DPO implicit reward
VERIFIER_STAGES = ("reward_model", "local_rm", "genrm", "offline_dpo", "online_dpo")
BASIC_STAGES = ("prepare_data", "sft", "reward_model", "offline_dpo", "evaluate")
# the stages whose training is one TRL/transformers Trainer, so the whole stage can run under `accelerate launch`
# (see roads.launch); the others train with roads.training.train_loop (local_rm, q_sft, ivl), generate between
# trainings (online_dpo, genrm), or do not train, and always run in one process
LAUNCH_STAGES = ("sft", "sft_chosen", "reward_model", "offline_dpo", "online_rl")


def no_fingerprint(default: Any, description: str) -> Any:
    """A field that does not change results (logging, batch size for inference, …): left out of the fingerprint."""
    return Field(default, description=description, json_schema_extra={"fingerprint": False})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- sections ----------------------------------------------------------------------------------------------------
class ModelConfig(Strict):
    """The policy architecture. ``pretrained`` (a local path or hub name) wins over ``preset``."""

    preset: Literal["tiny", "small", "base"] = Field("tiny", description="tiny ≈0.1M, small ≈0.8M, base ≈5M params")
    pretrained: Optional[str] = Field(None, description="local directory or hub name of a causal LM and tokenizer")
    vocab_size: int = Field(384, gt=16, description="byte-level BPE vocabulary trained on the task text (presets)")


class TaskConfig(Strict):
    """One task: a synthetic gold-reward family, or real preference data (no gold reward)."""

    family: Literal["gap", "short", "hidden", "preferences"]
    alphabet: int = Field(8, ge=2, le=26, description="number of symbols (synthetic)")
    min_len: int = Field(4, ge=2, description="shortest prompt, in symbols (synthetic)")
    max_len: int = Field(8, ge=2, description="longest prompt, in symbols (synthetic)")
    secret: int = Field(1234, description="seed of the hidden substitution (family 'hidden')")
    source: Optional[str] = Field(None, description="preferences: a local .jsonl/.jsonl.gz/.json/.parquet or a hub name")
    format: Literal["auto", "standard", "hh-rlhf", "tldr"] = Field("auto", description="preferences: record layout")
    split: str = Field("train", description="preferences: hub split")
    limit: Optional[int] = Field(None, gt=0, description="preferences: keep the first N records")

    @model_validator(mode="after")
    def _check(self) -> "TaskConfig":
        if self.family == "preferences" and not self.source:
            raise ValueError("family 'preferences' needs 'source' (a local file or a hub dataset name)")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) is larger than max_len ({self.max_len})")
        return self


class PrepareDataConfig(Strict):
    n_sft: int = Field(2000, gt=0, description="SFT demonstrations")
    n_pairs: int = Field(2000, gt=0, description="training preference pairs")
    n_val_pairs: int = Field(200, gt=0, description="held-out preference pairs (on held-out prompts)")
    n_eval_prompts: int = Field(200, gt=0, description="held-out prompts for evaluate")
    demo_noise: float = Field(0.3, ge=0, le=1, description="per-symbol edit probability of the SFT demonstrator")
    behaviour_noise: float = Field(0.5, ge=0, le=1, description="per-symbol edit probability of the behaviour policy")
    bt_temperature: float = Field(0.1, ge=0, description="τ in P(y1≻y2) = σ((r*(y1)−r*(y2))/τ); 0 = noiseless")


class TrainConfig(Strict):
    """Fields every training stage shares."""

    epochs: float = Field(2, gt=0, description="passes over the training data")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW, linear decay)")
    batch_size: int = Field(32, gt=0, description="examples (or pairs) per optimiser step")
    max_length: int = Field(64, gt=4, description="longest prompt + response, in tokens")
    logging_steps: int = no_fingerprint(10, "log training metrics every N steps")


class SftConfig(TrainConfig):
    epochs: float = Field(3, gt=0, description="passes over the training data")
    preset: Optional[Literal["tiny", "small", "base"]] = Field(
        None, description="model preset of this SFT (default: model.preset); arms of other sizes serve the scale study")


def data_field() -> Any:
    return Field("prepare_data", description="the entry whose data folder this stage trains on: prepare_data, or a "
                                             "narrow_data entry (H4)")


class NarrowDataConfig(Strict):
    """Narrow preference data (H4): for each training prompt, two samples of the SFT policy labelled by the gold
    reward with Bradley–Terry noise. Everything else (demonstrations, held-out pairs, evaluation prompts) is copied."""

    bt_temperature: float = Field(0.1, ge=0, description="τ in P(y1≻y2) = σ((r*(y1)−r*(y2))/τ); 0 = noiseless")
    max_new_tokens: int = Field(16, gt=0, description="generation limit")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    generation_batch_size: int = no_fingerprint(256, "sequences per generation batch")


class RewardModelConfig(TrainConfig):
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW, linear decay)")
    data: str = data_field()
    start: str = Field("sft", description="the SFT entry the reward model starts from (an SFT arm of another size "
                                          "gives a reward model of that size)")
    pair_fraction: float = Field(1.0, gt=0, le=1, description="train on the first fraction of the pairs (learning curves)")
    val_batch_size: int = no_fingerprint(64, "batch size when scoring held-out pairs")


class LocalRmConfig(RewardModelConfig):
    """The local verifier: the SFT language model trained with the Bradley–Terry loss on β·Σ_t log π(y_t|x, y<t),
    its own summed log-probabilities (no value head, no reference)."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW, linear decay)")
    beta: float = Field(1.0, gt=0, description="scale of the summed log-probabilities in the Bradley–Terry loss")


class OfflineDpoConfig(TrainConfig):
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW, linear decay)")
    data: str = data_field()
    pair_fraction: float = Field(1.0, gt=0, le=1, description="train on the first fraction of the pairs (learning curves)")
    beta: float = Field(0.1, gt=0, description="DPO β (the same β is used online)")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="TRL DPO loss")
    precompute_ref: bool = Field(True, description="compute the reference's log-probs once before training (TRL's "
                                 "precompute_ref_log_probs), shared by DPO runs on the same pairs and reference; "
                                 "false: once per step, as TRL does by default")


class SftChosenConfig(TrainConfig):
    """SFT on the chosen responses of the preference pairs, continuing from the SFT policy: the simplest offline
    likelihood baseline (and, from another SFT entry, the 'fine-tuned directly' control of inverse value learning)."""

    epochs: float = Field(2, gt=0, description="passes over the training data")
    data: str = data_field()
    start: str = Field("sft", description="the SFT entry it continues from")


class QSftConfig(TrainConfig):
    """Q-SFT (Hong et al.): offline value-based RL by weighted cross-entropy. A behaviour policy π_β (SFT on every
    response of the pairs, from ``start``), a likelihood model p_θ whose token probabilities are Q-values (trained
    with the Bellman-target-weighted cross-entropy, a Polyak-averaged target copy), and the extracted policy
    π ∝ π_β·exp(β·p_θ)."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW, linear decay)")
    epochs: float = Field(2, gt=0, description="passes over the training data")
    data: str = data_field()
    start: str = Field("sft", description="the SFT entry that behaviour policy and likelihood model start from")
    behaviour_epochs: float = Field(1, gt=0, description="SFT epochs of the behaviour policy on every response")
    gamma: float = Field(1.0, ge=0, le=1, description="discount γ of the Bellman target")
    beta: float = Field(1.0, ge=0, description="extraction: π ∝ π_β·exp(β·p_θ); 0 gives the behaviour policy alone")
    polyak: float = Field(0.05, gt=0, le=1, description="target update θ̄ ← (1−α)θ̄ + αθ, once per step")
    min_behaviour_prob: float = Field(1e-4, ge=0, lt=1,
                                      description="next tokens with π_β below this are left out of the max")
    rest_mass: Literal["dummy", "spread"] = Field("dummy", description="where 1 − w goes: a dummy token, or spread "
                                                                        "evenly over the other tokens")
    reward: Literal["preferences", "reward_model"] = Field(
        "preferences", description="returns: chosen 1 / rejected 0, or σ(reward model score) of each response")


class GenRmConfig(TrainConfig):
    """A generative verifier (Mahan et al.): the LM reads (prompt, response A, response B) and writes a verdict token.
    ``genrm``: SFT on the labels; ``star_sft`` / ``star_dpo``: rationales sampled by the model, kept (SFT) or paired
    correct-vs-wrong (DPO) by whether their verdict matches the label. Scored in both orders (antisymmetric)."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW, linear decay)")
    epochs: float = Field(2, gt=0, description="passes over the training data")
    data: str = data_field()
    start: str = Field("sft", description="the SFT entry it starts from")
    method: Literal["genrm", "star_sft", "star_dpo"] = Field("genrm", description="how it is trained")
    star_iterations: int = Field(1, ge=1, description="STaR rounds of sample → filter → train")
    star_samples: int = Field(4, ge=1, description="rationales sampled per training pair per round")
    rationale_tokens: int = Field(16, gt=0, description="longest rationale")
    votes: int = Field(1, ge=1, description="verdict samples for a majority vote at scoring; 1 = the verdict-token "
                                            "probabilities")
    beta: float = Field(1.0, gt=0, description="STaR-DPO β")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of rationales and votes")
    val_batch_size: int = no_fingerprint(64, "batch size when scoring")


class IvlConfig(TrainConfig):
    """Inverse value learning (Lu et al.): a small value network whose logits are added to a frozen base model's
    logits (residual connection), trained with next-token cross-entropy plus an L1 penalty on its logits, then added
    to a *different* base model with the same vocabulary."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW, linear decay)")
    epochs: float = Field(3, gt=0, description="passes over the training data")
    data: str = data_field()
    base: str = Field("sft", description="the frozen base (an SFT entry) the value network is trained on")
    target: str = Field("sft", description="the base (an SFT entry) it is added to at inference: a larger preset or "
                                          "another seed")
    value_preset: Literal["tiny", "small", "base"] = Field("tiny", description="size of the value network")
    train_on: Literal["chosen", "demonstrations"] = Field("chosen", description="the chosen responses of the pairs, "
                                                                                "or the SFT demonstrations")
    l1: float = Field(1.0, ge=0, description="coefficient of mean_t ‖g(x<t)‖₁/|V|")

class OnlineDpoConfig(OfflineDpoConfig):
    """The paper's online DPO. DPO settings (β, lr, epochs, batch size, loss) not set here are taken from
    ``offline_dpo``, so both roads share β and reference unless told otherwise."""

    start: str = Field("sft", description="the policy sampled from and trained: sft, offline_dpo or another arm")
    verifier: str = Field("reward_model", description="who scores the K samples: 'gold' (oracle), or the entry of a "
                                                     "verifier: a reward_model or local_rm entry, or a DPO policy (its "
                                                     "implicit reward β·log π/π_ref)")
    k: int = Field(25, ge=2, description="completions sampled per prompt; best and worst become a pair")
    rounds: int = Field(1, ge=1, description="rounds of sample → label → train (>1: iterative online DPO)")
    prompt_multiplier: int = Field(1, ge=1, description="online prompts = this × the training prompts (H3)")
    max_new_tokens: int = Field(16, gt=0, description="generation limit")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    engine: Literal["roads", "vllm"] = Field("roads", description="who samples the k completions: roads' own "
                                             "seeded sampler, or vLLM (a GPU with vllm installed)")
    generation_batch_size: int = no_fingerprint(256, "sequences per generation batch")
    vllm_gpu_memory_utilization: float = no_fingerprint(0.5, "engine vllm: the share of GPU memory vLLM may take")


class OnlineRlConfig(TrainConfig):
    """Continuous on-policy RL from the SFT policy with TRL's RLOO or GRPO, KL-penalised towards the SFT reference."""

    lr: float = Field(5e-5, gt=0, description="peak learning rate (AdamW, linear decay)")
    epochs: float = Field(1, gt=0, description="passes over the training data")
    algorithm: Literal["rloo", "grpo"] = Field("rloo", description="TRL trainer")
    verifier: Literal["reward_model", "gold"] = Field("reward_model", description="the reward")
    beta: float = Field(0.1, ge=0, description="KL coefficient towards the reference")
    num_generations: int = Field(4, ge=2, description="completions per prompt per step")
    max_new_tokens: int = Field(16, gt=0, description="generation limit")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    n_prompts: Optional[int] = Field(None, gt=0, description="training prompts (default: all)")
    use_vllm: bool = Field(False, description="generate with vLLM colocated with training (TRL's vllm_mode "
                                              "colocate; a GPU with vllm installed)")
    vllm_gpu_memory_utilization: float = no_fingerprint(0.3, "use_vllm: the share of GPU memory vLLM may take")


class GapConfig(Strict):
    """The generation–verification gap of one (task, seed): each verifier's held-out preference accuracy and
    log-likelihood, and best-of-N curves (the gold reward of the sample each verifier picks among N) on samples of
    each policy, with the gold reward itself as the upper bound."""

    data: str = data_field()
    verifiers: list[str] = Field(["reward_model", "local_rm", "offline_dpo"], min_length=1,
                                 description="entries whose outputs are verifiers (reward_model, local_rm, DPO policies)")
    policies: list[str] = Field(["sft", "offline_dpo"], description="policies sampled for the best-of-N curves")
    max_n: int = Field(64, ge=1, description="largest N; N runs over the powers of two up to it (samples per prompt)")
    n_prompts: int = Field(100, gt=0, description="evaluation prompts used for best-of-N (the first ones)")
    max_new_tokens: int = Field(16, gt=0, description="generation limit")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    batch_size: int = no_fingerprint(256, "sequences per generation or scoring batch")


class ReportConfig(Strict):
    """The study table: every arm × task × seed with bootstrap intervals, and paired online − offline differences."""

    n_bootstrap: int = Field(2000, ge=100, description="bootstrap resamples (seeds, then prompts within a seed)")
    confidence: float = Field(0.95, gt=0, lt=1, description="interval coverage")
    baseline: str = Field("offline_dpo", description="the offline arm that online arms are compared with")
    bootstrap_seed: int = Field(0, description="seed of the bootstrap")
    equivalence_margin: float = Field(0.02, ge=0, description="hypotheses predicting no difference are supported when "
                                                              "the whole interval lies within ± this")


class EvaluateConfig(Strict):
    samples_per_prompt: int = Field(2, gt=0, description="completions sampled per held-out prompt")
    max_new_tokens: int = Field(16, gt=0, description="generation limit")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    batch_size: int = no_fingerprint(64, "prompts per generation batch")
    table_rows: int = no_fingerprint(50, "rows of the sample table logged as an artifact")


class LaunchConfig(Strict):
    """Multi-process training of the Trainer-based stages (LAUNCH_STAGES) through ``accelerate launch`` on one
    machine. ``batch_size`` stays the *global* batch: each of the ``num_processes`` processes takes
    ``batch_size / num_processes`` examples per optimiser step, so results are comparable with one process."""

    backend: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none", description="none: train in the stage's own process; ddp: DistributedDataParallel; fsdp: FSDP2 "
                            "(FullyShardedDataParallel); deepspeed: DeepSpeed ZeRO (needs `pip install deepspeed` "
                            "where it runs)")
    num_processes: int = Field(1, ge=1, description="processes, one per GPU (ddp needs at least 2)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate's mixed precision")
    deepspeed_stage: Literal[2, 3] = Field(2, description="deepspeed: ZeRO stage (2: optimizer states and "
                                                          "gradients sharded; 3: parameters too)")
    fsdp_auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = Field(
        "TRANSFORMER_BASED_WRAP", description="fsdp: accelerate's fsdp_auto_wrap_policy (TRANSFORMER_BASED_WRAP "
                                              "shards each decoder layer, from the model's _no_split_modules)")
    fsdp_reshard_after_forward: bool = Field(
        True, description="fsdp: accelerate's fsdp_reshard_after_forward (true = FULL_SHARD: free the gathered "
                          "parameters after forward; false = SHARD_GRAD_OP: keep them until backward)")
    cpu: bool = Field(False, description="run the processes on CPU over gloo (tests, CPU clusters); ddp only")

    def problem(self) -> Optional[str]:
        """What is wrong with this combination of fields, or None. Checked when a study is loaded (after all
        overrides: ``--set launch.backend=ddp --set launch.num_processes=2`` passes through an invalid state)."""
        if self.backend == "none" and self.num_processes > 1:
            return (f"num_processes: {self.num_processes} processes need a backend (ddp, fsdp or deepspeed); backend "
                    "is 'none'")
        if self.backend == "ddp" and self.num_processes < 2:
            return "num_processes: ddp needs at least 2 processes (fsdp and deepspeed may use 1)"
        if self.cpu and self.backend in ("fsdp", "deepspeed"):
            return (f"cpu: accelerate runs {self.backend} on GPUs only (with cpu it falls back to plain data "
                    "parallel); use backend ddp with cpu: true")
        if self.cpu and self.mixed_precision == "fp16":
            return "mixed_precision: fp16 needs GPUs; use bf16 or no with cpu: true"
        return None


class Defaults(Strict):
    seed: int = Field(0, description="the study seed; each pipeline's `seeds` replaces it")
    model: ModelConfig = ModelConfig()
    launch: LaunchConfig = LaunchConfig()
    prepare_data: PrepareDataConfig = PrepareDataConfig()
    narrow_data: NarrowDataConfig = NarrowDataConfig()
    sft: SftConfig = SftConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    local_rm: LocalRmConfig = LocalRmConfig()
    genrm: GenRmConfig = GenRmConfig()
    offline_dpo: OfflineDpoConfig = OfflineDpoConfig()
    sft_chosen: SftChosenConfig = SftChosenConfig()
    online_dpo: OnlineDpoConfig = OnlineDpoConfig()
    online_rl: OnlineRlConfig = OnlineRlConfig()
    q_sft: QSftConfig = QSftConfig()
    ivl: IvlConfig = IvlConfig()
    gap: GapConfig = GapConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()


class ArmConfig(Strict):
    """A named variant of a stage: the stage's settings with ``set`` on top. It is a node of its own."""

    stage: Literal[STAGE_NAMES]  # type: ignore[valid-type]
    set: dict[str, Any] = Field({}, description="overrides of the stage's settings")
    description: str = ""


class PipelineConfig(Strict):
    description: str = ""
    tasks: list[str] = Field(min_length=1)
    seeds: Optional[list[int]] = Field(None, min_length=1, description="seeds to run; default: [defaults.seed]")
    stages: list[str] = Field(list(BASIC_STAGES), min_length=1, description="stages and arms to run")
    set: dict[str, Any] = Field({}, description="overrides of defaults, as in --set")


RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")


class SweepConfig(Strict):
    """A grid over any ``--set`` keys (and seeds) of one pipeline; each point of the grid is an arm of the sweep."""

    description: str = ""
    pipeline: str = Field(description="the pipeline every arm runs")
    grid: dict[str, list[Any]] = Field({}, description="KEY (as in --set) -> the values it takes; arms = the product")
    seeds: Optional[list[int]] = Field(None, min_length=1, description="each seed an arm of its own (a grid "
                                       "dimension); default: every arm runs the pipeline's seeds")
    runner: Literal["ray", "process"] = Field("ray", description="ray: prefect-ray's task runner (a local cluster, "
                                              "or --ray-address / RAY_ADDRESS); process: a local process pool")
    workers: Optional[int] = Field(None, gt=0, description="CPUs of a local Ray cluster / processes of the pool "
                                   "(default: the machine's cores)")
    resources: dict[str, dict[str, float]] = Field({}, description="Ray resources per stage, or 'default' for "
                                                   "every stage: num_cpus, num_gpus, memory (bytes)")

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key}: give at least one value")
            if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
                raise ValueError(f"grid.{key}: a value is repeated")
        if self.seeds and len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: a seed is repeated")
        for stage, res in self.resources.items():
            if stage != "default" and stage not in STAGE_NAMES:
                raise ValueError(f"resources.{stage}: not a stage; use a stage name or 'default'")
            for key, value in res.items():
                if key not in RESOURCE_KEYS:
                    raise ValueError(f"resources.{stage}.{key}: unknown resource; known: {', '.join(RESOURCE_KEYS)}")
                if value < 0:
                    raise ValueError(f"resources.{stage}.{key}: must be >= 0")
        return self


class StudyFile(Strict):
    defaults: Defaults = Defaults()
    tasks: dict[str, TaskConfig]
    arms: dict[str, ArmConfig] = {}
    pipelines: dict[str, PipelineConfig]
    sweeps: dict[str, SweepConfig] = {}


STAGE_CONFIGS: dict[str, type[Strict]] = {
    "prepare_data": PrepareDataConfig,
    "narrow_data": NarrowDataConfig,
    "sft": SftConfig,
    "sft_chosen": SftChosenConfig,
    "reward_model": RewardModelConfig,
    "local_rm": LocalRmConfig,
    "genrm": GenRmConfig,
    "offline_dpo": OfflineDpoConfig,
    "online_dpo": OnlineDpoConfig,
    "online_rl": OnlineRlConfig,
    "q_sft": QSftConfig,
    "ivl": IvlConfig,
    "gap": GapConfig,
    "evaluate": EvaluateConfig,
    "report": ReportConfig,
}


class StageSpec(Strict):
    """Everything one stage of one (task, seed) unit needs. Its fingerprint is half its cache key."""

    stage: str
    params: dict[str, Any]
    seed: int
    variant: str = no_fingerprint("", "the stage or arm name this node runs (a label)")
    task_name: str = no_fingerprint("", "the task this unit belongs to (a label; the data reaches stages as an input)")
    model: Optional[ModelConfig] = None  # stages that build or load a policy from scratch
    task: Optional[TaskConfig] = None  # prepare_data only; later stages see the data through its artifact
    arm: Optional[str] = None  # evaluate: which policy stage or arm is scored
    launch: Optional[LaunchConfig] = None  # LAUNCH_STAGES under accelerate launch; None: in-process (not fingerprinted)

    def config(self) -> Strict:
        """The typed stage config (``SftConfig`` …)."""
        return STAGE_CONFIGS[self.stage](**self.params)

    def fingerprint(self) -> str:
        return fingerprint(self)


def resolve_params(entry: str, arms: dict[str, ArmConfig], defaults: Defaults) -> tuple[str, dict[str, Any]]:
    """(stage, settings) of a stage or arm: the stage's defaults, then — for online_dpo — the DPO settings it does
    not set itself taken from offline_dpo, then the arm's overrides."""
    stage = arms[entry].stage if entry in arms else entry
    section = getattr(defaults, stage)
    params = section.model_dump()
    if stage == "online_dpo":
        params = {**params, **defaults.offline_dpo.model_dump(), **section.model_dump(include=section.model_fields_set)}
    if entry in arms:
        params.update(arms[entry].set)
    return stage, STAGE_CONFIGS[stage](**params).model_dump()


class Study(Strict):
    """A resolved pipeline: the study file with all overrides applied, ready to plan."""

    pipeline: str
    path: str
    defaults: Defaults
    tasks: dict[str, TaskConfig]
    arms: dict[str, ArmConfig] = {}
    spec: PipelineConfig

    def stage_of(self, entry: str) -> str:
        """The stage module an entry of ``stages`` runs (an arm names its stage)."""
        return self.arms[entry].stage if entry in self.arms else entry

    def params(self, entry: str) -> dict[str, Any]:
        return resolve_params(entry, self.arms, self.defaults)[1]

    def stage_spec(self, entry: str, task_name: str, seed: int, arm: str | None = None) -> StageSpec:
        stage = self.stage_of(entry)
        return StageSpec(
            stage=stage,
            variant=entry,
            params=self.params(entry),
            seed=seed,
            task_name=task_name,
            model=self.defaults.model if stage == "sft" else None,
            task=self.tasks[task_name] if stage == "prepare_data" else None,
            arm=arm,
            launch=self.defaults.launch if stage in LAUNCH_STAGES and self.defaults.launch.backend != "none" else None,
        )

    def resolved(self) -> dict:
        """The fully resolved config, as ``roads show`` prints it."""
        return {
            "pipeline": self.pipeline,
            "file": self.path,
            **self.spec.model_dump(exclude={"set"}),
            "tasks": {name: self.tasks[name].model_dump() for name in self.spec.tasks},
            "arms": {name: arm.model_dump() for name, arm in self.arms.items() if name in self.spec.stages},
            "defaults": self.defaults.model_dump(),
        }


# --- fingerprint -------------------------------------------------------------------------------------------------
def _result_fields(model: BaseModel) -> dict:
    out = {}
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("fingerprint") is False:
            continue
        value = getattr(model, name)
        out[name] = _result_fields(value) if isinstance(value, BaseModel) else value
    return out


def fingerprint(spec: StageSpec) -> str:
    """sha256 of the canonical JSON of every field that changes results (seed included, logging excluded)."""
    data = _result_fields(spec)
    data["params"] = _result_fields(spec.config())
    if data.get("launch") is None:  # in-process: the key is left out, so fingerprints from before `launch` hold
        data.pop("launch", None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- loading and overrides -----------------------------------------------------------------------------------------
def _format_error(err: ValidationError, where: str, prefix: tuple = ()) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (*prefix, *first["loc"]))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {loc}: {msg}{more}"


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, for example sft.epochs=2")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: empty key path")
    return key, _parse_value(value)


def _apply(raw: dict, pipeline: str, key: str, value: Any, where: str) -> None:
    """Set a dotted KEY in the raw study dict: `pipeline.X`, `tasks.NAME.X`, or a path inside `defaults`."""
    parts = key.split(".")
    if parts[0] == "pipeline":
        target, path = raw["pipelines"][pipeline], parts[1:]
    elif parts[0] == "arms":
        if len(parts) < 3 or parts[1] not in raw.get("arms", {}):
            known = ", ".join(sorted(raw.get("arms", {})))
            raise ConfigError(f"{where}: {key}: unknown arm {parts[1] if len(parts) > 1 else ''!r}; known: {known}")
        target, path = raw["arms"][parts[1]], parts[2:]
    elif parts[0] == "tasks":
        if len(parts) < 3 or parts[1] not in raw.get("tasks", {}):
            known = ", ".join(sorted(raw.get("tasks", {})))
            raise ConfigError(f"{where}: {key}: unknown task {parts[1] if len(parts) > 1 else ''!r}; known: {known}")
        target, path = raw["tasks"][parts[1]], parts[2:]
    else:
        if parts[0] not in Defaults.model_fields:
            known = ", ".join(["pipeline.*", "tasks.*", "arms.*", *Defaults.model_fields])
            raise ConfigError(f"{where}: {key}: unknown key {parts[0]!r}; known: {known}")
        raw.setdefault("defaults", {})
        target, path = raw["defaults"], parts
    if not path:
        raise ConfigError(f"{where}: {key}: name a field, for example {key}.epochs")
    for part in path[:-1]:
        nxt = target.get(part) if isinstance(target, dict) else None
        if nxt is None:
            target[part] = nxt = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where}: {key}: {part!r} is not a section")
        target = nxt
    target[path[-1]] = value


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster on pipelines.yaml


def read_study_file(path: str | Path) -> dict:
    """The file as a dict (a fresh copy each call: callers apply overrides to it). Parsed once per content."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass --file PATH or run from the project folder")
    return copy.deepcopy(_parse_study_file(str(path), path.read_bytes()))


@lru_cache(maxsize=8)
def _parse_study_file(path: str, content: bytes) -> dict:
    try:
        raw = yaml.load(content, Loader=_LOADER)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with defaults, tasks and pipelines")
    return raw


def load_study_file(path: str | Path) -> StudyFile:
    """The file, validated as written, and every pipeline checked with its own ``set`` applied."""
    raw = read_study_file(path)
    try:
        study = StudyFile(**raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, str(path))) from None
    _check_arms(study, str(path))
    if study.defaults.launch.problem():
        raise ConfigError(f"{path}: defaults.launch.{study.defaults.launch.problem()}")
    for name in study.pipelines:
        with_set = _with_pipeline_set(copy.deepcopy(raw), study, name, str(path))
        _check_pipeline(with_set, name, with_set.pipelines[name], str(path))
    for name, sweep in study.sweeps.items():
        if sweep.pipeline not in study.pipelines:
            raise ConfigError(f"{path}: sweeps.{name}.pipeline: unknown pipeline {sweep.pipeline!r}; known: "
                              f"{', '.join(sorted(study.pipelines))}")
    return study


def _with_pipeline_set(raw: dict, study: StudyFile, pipeline: str, path: str) -> StudyFile:
    """Apply a pipeline's ``set`` to the raw file (in place) and validate the result."""
    where = f"{path}: pipelines.{pipeline}.set"
    if raw["pipelines"][pipeline].get("set") is None:
        raw["pipelines"][pipeline]["set"] = {}
    for key, value in study.pipelines[pipeline].set.items():
        _apply(raw, pipeline, key, value, where)
    return _validate(raw, where)


def _looks_local(source: str) -> bool:
    """A path rather than a hub dataset name: starts with . / ~, or ends with a data-file suffix."""
    return source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".parquet", ".gz"))


def _check_arms(study: StudyFile, where: str) -> None:
    for name, arm in study.arms.items():
        if name in STAGE_NAMES:
            raise ConfigError(f"{where}: arms.{name}: an arm cannot take a stage's name; rename it")
        base = getattr(study.defaults, arm.stage, None)
        if base is None:
            raise ConfigError(f"{where}: arms.{name}.stage: {arm.stage!r} has no settings to vary")
        try:
            STAGE_CONFIGS[arm.stage](**{**base.model_dump(), **arm.set})
        except ValidationError as err:
            raise ConfigError(_format_error(err, where, ("arms", name, "set"))) from None


def _check_pipeline(study: StudyFile, name: str, pipe: PipelineConfig, where: str) -> None:
    for i, entry in enumerate(pipe.stages):
        if entry not in STAGE_NAMES and entry not in study.arms:
            known = ", ".join([*STAGE_NAMES, *study.arms])
            raise ConfigError(f"{where}: pipelines.{name}.stages.{i}: unknown stage or arm {entry!r}; known: {known}")
    for task in pipe.tasks:
        if task not in study.tasks:
            raise ConfigError(
                f"{where}: pipelines.{name}.tasks: unknown task {task!r}; known: {', '.join(sorted(study.tasks))}"
            )

    from roads.plan import check_stage_closure  # the stage graph lives beside the planner

    problem = check_stage_closure(pipe.stages, study.arms, study.defaults)
    if problem:
        raise ConfigError(f"{where}: pipelines.{name}.stages: {problem}")
    problem = _launch_problem(study, pipe)
    if problem:
        raise ConfigError(f"{where}: pipelines.{name}: {problem}")


def global_batch(stage: str, params: dict[str, Any]) -> int:
    """Examples (completions, for online_rl) per optimiser step: ``batch_size``, which online_rl rounds up to whole
    prompt groups of ``num_generations``."""
    batch = params["batch_size"]
    if stage == "online_rl":
        group = params["num_generations"]
        batch = -(-batch // group) * group
    return batch


def _launch_problem(study: StudyFile, pipe: PipelineConfig) -> str | None:
    """The launch section's own problem, then: every launched stage's global batch must split evenly over the
    processes."""
    launch = study.defaults.launch
    if launch.problem():
        return f"launch.{launch.problem()}"
    if launch.backend == "none":
        return None
    for entry in pipe.stages:
        stage = study.arms[entry].stage if entry in study.arms else entry
        if stage not in LAUNCH_STAGES:
            continue
        batch = global_batch(stage, resolve_params(entry, study.arms, study.defaults)[1])
        if batch % launch.num_processes:
            key = f"{stage}.batch_size" if entry == stage else f"arms.{entry} ({stage}) batch_size"
            return (f"{key} {batch} is not a multiple of launch.num_processes ({launch.num_processes}): the global "
                    "batch is split evenly over the processes; change one of them")
    return None


def _validate(raw: dict, where: str) -> StudyFile:
    try:
        return StudyFile(**raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, where)) from None


def load_study(path: str | Path, pipeline: str, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Load the file, pick a pipeline, apply its `set` overrides then the CLI overrides, validate everything."""
    base = load_study_file(path)  # validates the file as written
    if pipeline not in base.pipelines:
        raise ConfigError(f"{path}: unknown pipeline {pipeline!r}; known: {', '.join(sorted(base.pipelines))}")
    raw = read_study_file(path)
    study = _with_pipeline_set(raw, base, pipeline, str(path))
    for item in overrides:  # validated one at a time, so an error names the override that caused it
        key, value = parse_override(item)
        _apply(raw, pipeline, key, value, f"--set {item}")
        study = _validate(raw, f"--set {item}")
    spec = study.pipelines[pipeline]
    if spec.seeds is None:
        spec = spec.model_copy(update={"seeds": [study.defaults.seed]})
    _check_arms(study, f"{path} (after overrides)")
    _check_pipeline(study, pipeline, spec, f"{path} (after overrides)")
    for task in spec.tasks:  # only the tasks this run uses: a file another pipeline needs may be absent here
        source = study.tasks[task].source
        if source and _looks_local(source) and not Path(source).expanduser().exists():
            raise ConfigError(f"{path}: tasks.{task}.source: no file at {source!r} (relative paths start from "
                              f"{Path.cwd()}); fix the path, or give a hub dataset name")
    return Study(pipeline=pipeline, path=str(path), defaults=study.defaults, tasks=study.tasks, arms=study.arms,
                 spec=spec)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params."""
    if isinstance(data, BaseModel):
        data = data.model_dump()
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, (dict, BaseModel)) else {name: value})
    return out
