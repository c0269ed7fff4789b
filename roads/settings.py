"""The settings of each stage and of the study's shared sections (model, task, launch): strict, frozen pydantic
models, one per ``defaults`` section of ``pipelines.yaml``. A field made with :func:`no_fingerprint` does not change
results (logging, inference batch sizes) and stays out of the cache key.

The stage table (``roads/stage_table.py``) names each stage's config class; ``roads/config.py`` builds the study file's
``defaults`` from it. Adding a stage's settings is a class here (or in any module the table imports).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

def no_fingerprint(default: Any, description: str, **bounds: Any) -> Any:
    """A field that does not change results (logging, batch size for inference, …): left out of the fingerprint.
    ``bounds`` are pydantic's (``gt=0`` …)."""
    return Field(default, description=description, json_schema_extra={"fingerprint": False}, **bounds)


def new_setting(default: Any, description: str, **bounds: Any) -> Any:
    """A field added after caches existed whose default is what the code did before it: left out of the fingerprint
    while it has its default (so the cache keys from before it hold), counted as soon as it is set otherwise."""
    return Field(default, description=description, json_schema_extra={"fingerprint": "unless_default"}, **bounds)


class Strict(BaseModel):
    """Unknown keys are errors, values are frozen, and numbers are what they say: pydantic's strict mode (no
    ``true`` for a number, no ``2.0`` or ``"2"`` for an integer; an integer is a float) and no NaN or infinity for
    any float. The study file's YAML reads ``1e-3`` as a number (``roads.config``), so strict floats take it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


PositiveFloat = Annotated[float, Field(gt=0)]
SEED_BOUNDS = dict(ge=0, lt=2**32)  # what numpy's (and so Trainer's) seeding accepts
Seed = Annotated[int, Field(**SEED_BOUNDS)]


# --- sections ----------------------------------------------------------------------------------------------------
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # Llama's linear layers


class LoraConfig(Strict):
    """LoRA (peft) for the stages that train a policy or the reward model (``roads.lora.LORA_STAGES``): the base
    weights stay frozen, rank-``rank`` adapters on ``target_modules`` train (the reward model's scalar head trains
    in full). Each stage saves its adapter (``adapter/``) and the merged weights, which the next stage loads, so every
    later stage starts from — and DPO and online RL are regularised towards — exactly the policy before it."""

    rank: int = Field(8, gt=0, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling α (the update is α/r · B·A)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] = Field(LORA_TARGETS, min_length=1, description="names of the linear layers that get "
                                      "adapters (peft's target_modules; 'all-linear' for every linear layer)")


class ModelConfig(Strict):
    """The policy architecture. ``pretrained`` (a local path or hub name) wins over ``preset``."""

    preset: Literal["tiny", "small", "base"] = Field("tiny", description="tiny ≈0.1M, small ≈0.8M, base ≈5M params")
    pretrained: Optional[str] = Field(None, description="local directory or hub name of a causal LM and tokenizer")
    vocab_size: int = Field(384, gt=16, description="byte-level BPE vocabulary trained on the task text (presets)")
    lora: Optional[LoraConfig] = new_setting(None, "LoRA for sft, reward_model, offline_dpo, online_dpo, select_dpo "
                                                   "and online_rl (off: full fine-tuning)")


BUILTIN_FAMILIES = ("shuffle", "gap", "short", "hidden", "star", "constraints", "rouge")  # roads.data.family.builtin()
TASK_FIELDS_OF_ANY_FAMILY = ("family", "response_vocab", "settings")  # what a user family's task keeps besides settings


class TaskConfig(Strict):
    """One task: a synthetic gold-reward family (built-in by name, or the user's own class by path — every key
    besides ``family`` and ``response_vocab`` is then one of its ``Settings``: ``roads.data.family``), or real
    preference data (no gold reward)."""

    family: str = Field(description="a built-in family (shuffle, gap, short, hidden, star; constraints, rouge on English "
                                    "text: roads.data.text), preferences (real data), "
                                    "or your own TaskFamily class as 'package.module:Class'")
    settings: dict[str, Any] = new_setting({}, "a user family's settings (validated by its Settings; written as "
                                               "keys of the task beside family)")
    alphabet: int = Field(8, ge=2, le=26, description="number of symbols (synthetic)")
    min_len: int = Field(4, ge=2, description="shortest prompt, in symbols (synthetic)")
    max_len: int = Field(8, ge=2, description="longest prompt, in symbols (synthetic)")
    secret: int = Field(1234, description="seed of the hidden substitution (family 'hidden')")
    degree: int = Field(3, ge=2, description="star: arms leaving the centre of the graph")
    arm_len: int = Field(2, ge=1, description="star: nodes on each arm after the centre")
    response_vocab: Literal["task", "all"] = Field(
        "task", description="synthetic: 'task' samples only tokens made of the task's response symbols (and EOS); "
                            "'all' lets the policy sample any token of its vocabulary (the old families' results)")
    source: Optional[str] = Field(None, description="preferences: a local .jsonl/.jsonl.gz/.json/.parquet or a hub name")
    format: Literal["auto", "standard", "hh-rlhf", "tldr"] = Field("auto", description="preferences: record layout")
    split: str = Field("train", description="preferences: hub split")
    limit: Optional[int] = Field(None, gt=0, description="preferences: keep the first N records")
    chat_template: Literal["auto", "plain"] = Field(
        "auto", description="preferences: auto renders the conversations (HH-RLHF turns, chat-message columns) with "
                            "model.pretrained's tokenizer chat template when it has one; plain keeps the "
                            "'\\n\\nHuman: ... \\n\\nAssistant:' text (synthetic tasks are always plain)")

    @model_validator(mode="before")
    @classmethod
    def _user_family(cls, data: Any) -> Any:
        """A user family: load its class (unimportable, or not a TaskFamily: an error naming it), and gather every key
        besides family and response_vocab into ``settings``, validated (and completed) by its ``Settings``."""
        from roads.data.family import is_path, validate_settings

        if not (isinstance(data, dict) and is_path(data.get("family"))):
            return data
        from roads.errors import ConfigError

        values = {**(data.get("settings") or {}),
                  **{k: v for k, v in data.items() if k not in TASK_FIELDS_OF_ANY_FAMILY}}
        try:
            settings = validate_settings(data["family"], values)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return {**{k: data[k] for k in ("family", "response_vocab") if k in data}, "settings": settings}

    def __hash__(self) -> int:  # a user family's settings are a dict (pydantic's frozen hash would refuse it)
        import json

        return hash(json.dumps(self.model_dump(), sort_keys=True, default=str))

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        """A user family's task as written: family, response_vocab and its settings (the built-ins' fields mean nothing
        to it); a built-in's without the empty ``settings`` (its dump as before user families)."""
        data = handler(self)
        if ":" in self.family:
            return {k: data[k] for k in TASK_FIELDS_OF_ANY_FAMILY if k in data}
        if not data.get("settings"):
            data.pop("settings", None)
        return data

    @field_validator("family")
    @classmethod
    def _family(cls, family: str) -> str:
        from roads.data.family import is_path

        if family in (*BUILTIN_FAMILIES, "preferences") or is_path(family):
            return family
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(BUILTIN_FAMILIES)}, preferences, or "
                         "give your own class as 'package.module:Class'")

    @model_validator(mode="after")
    def _check(self) -> "TaskConfig":
        if ":" not in self.family and self.settings:
            raise ValueError("settings: only a user family ('package.module:Class') has settings of its own")
        if self.family == "preferences" and not self.source:
            raise ValueError("family 'preferences' needs 'source' (a local file or a hub dataset name)")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) is larger than max_len ({self.max_len})")
        return self


class PrepareDataConfig(Strict):
    n_sft: int = Field(2000, gt=0, description="SFT demonstrations")
    n_pairs: int = Field(2000, gt=0, description="training preference pairs")
    n_val_pairs: int = Field(200, gt=0, description="held-out preference pairs (on held-out prompts)")
    n_sft_val: int = Field(200, gt=0, description="held-out demonstrations (on held-out prompts): SFT's held-out NLL")
    n_select_pairs: int = Field(200, ge=0, description="held-out pairs (on held-out prompts) for choosing "
                                "hyperparameters (select_dpo); never reported")
    n_eval_prompts: int = Field(200, gt=0, description="held-out prompts for evaluate")
    demo_noise: float = Field(0.3, ge=0, le=1, description="per-symbol edit probability of the SFT demonstrator")
    behaviour_noise: float = Field(0.5, ge=0, le=1, description="per-symbol edit probability of the behaviour policy")
    bt_temperature: float = Field(0.1, ge=0, description="τ in P(y1≻y2) = σ((r*(y1)−r*(y2))/τ); 0 = noiseless")
    n_judge_pairs: int = new_setting(
        0, "real data: pairs set aside for a held-out judge (pairs_judge.jsonl), on prompts of their own: no policy "
           "trains on them and none is evaluated on them (a reward_model with pairs: pairs_judge judges "
           "evaluate's proxy win rate); 0: none", ge=0)


class TrainConfig(Strict):
    """Fields every training stage shares."""

    epochs: float = Field(2, gt=0, description="passes over the training data")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW, linear decay)")
    batch_size: int = Field(32, gt=0, description="examples (or pairs) per optimiser step")
    max_length: int = Field(64, gt=4, description="longest prompt + response, in tokens")
    logging_steps: int = no_fingerprint(10, "log training metrics every N steps", gt=0)
    divergence_factor: float = no_fingerprint(
        100.0, "the stage fails (nothing cached) when one step's training loss exceeds this many times "
               "max(|its first step's loss|, 1): it diverged (roads.training.LossGuard). A guard, not a result: "
               "a run it lets through is the same run whatever its value", gt=1)
    too_long: Literal["truncate", "drop"] = new_setting(
        "truncate", "an example longer than max_length tokens: 'truncate' cuts it to max_length (one whose prompt "
                    "alone fills max_length is dropped: nothing of its response is left), 'drop' leaves it out; the "
                    "counts are the stage's metrics <stage>/examples, examples_trained, truncated, dropped_too_long, "
                    "dropped_prompt_too_long")
    max_dropped_fraction: float = no_fingerprint(
        0.5, "the stage fails when it drops more than this fraction of its examples for length (raise max_length, "
             "or this)", ge=0, le=1)


class SftConfig(TrainConfig):
    epochs: float = Field(3, gt=0, description="passes over the training data (with select=val_nll: the most)")
    select: Literal["val_nll", "last"] = Field(
        "val_nll", description="val_nll: keep the epoch with the lowest held-out NLL on sft_val.jsonl (the curve and "
                               "the choice in selection.json); last: keep the last epoch")
    patience: int = Field(3, ge=0, description="select=val_nll: stop after this many epochs without a lower held-out "
                                               "NLL (0: train every epoch)")
    preset: Optional[Literal["tiny", "small", "base"]] = Field(
        None, description="model preset of this SFT (default: model.preset); variants of other sizes serve the scale study")


def data_field() -> Any:
    return Field("prepare_data", description="the entry whose data folder this stage trains on: prepare_data, or a "
                                             "narrow_data entry (H4)")


class NarrowDataConfig(Strict):
    """Narrow preference data (H4): for each training prompt, two samples of the SFT policy labelled by the gold
    reward with Bradley–Terry noise. Everything else (demonstrations, held-out pairs, evaluation prompts) is copied."""

    bt_temperature: float = Field(0.1, ge=0, description="τ in P(y1≻y2) = σ((r*(y1)−r*(y2))/τ); 0 = noiseless")
    max_new_tokens: int = Field(16, gt=0, description="generation limit")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    generation_batch_size: int = no_fingerprint(256, "sequences per generation batch", gt=0)


class RewardModelConfig(TrainConfig):
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW, linear decay)")
    too_long: Literal["truncate", "drop"] = new_setting(
        "drop", "a pair whose chosen or rejected sequence is longer than max_length tokens: 'drop' leaves it out "
                "(TRL's RewardTrainer's rule), 'truncate' cuts each to max_length (the score is read at the cut); "
                "counted in <stage>/examples, examples_trained, truncated, dropped_too_long")
    data: str = data_field()
    pairs: Literal["pairs_train", "pairs_judge"] = new_setting(
        "pairs_train", "the pairs it trains on: pairs_train (the pairs the policies train on), or pairs_judge (real "
                       "data: pairs no policy trains on, prepare_data.n_judge_pairs): a held-out judge for "
                       "evaluate.judge")
    start: str = Field("sft", description="the SFT entry the reward model starts from (an SFT variant of another size "
                                          "gives a reward model of that size)")
    pair_fraction: float = Field(1.0, gt=0, le=1, description="train on the first fraction of the pairs (learning curves)")
    val_batch_size: int = no_fingerprint(64, "batch size when scoring held-out pairs", gt=0)
    lrs: list[PositiveFloat] = Field([], description="candidate learning rates: one reward model each, the best held-out "
                                             "accuracy on pairs_select kept (empty: lr)")


class LocalRmConfig(RewardModelConfig):
    """The local verifier: the SFT language model trained with the Bradley–Terry loss on β·Σ_t log π(y_t|x, y<t),
    its own summed log-probabilities (no value head, no reference)."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW, linear decay)")
    beta: float = Field(1.0, gt=0, description="scale of the summed log-probabilities in the Bradley–Terry loss")
    too_long: Literal["truncate"] = new_setting(
        "truncate", "an example longer than max_length tokens is cut to max_length (this stage's own loop only "
                    "truncates); counted in <stage>/examples, examples_trained, truncated")
    lrs: list[PositiveFloat] = Field([], max_length=0, description="not used by local_rm (its lr is lr)")
    pairs: Literal["pairs_train"] = new_setting("pairs_train", "local_rm trains on pairs_train")


# the DPO losses both roads can use: TRL's, and 'rpo' (TRL's ['sigmoid', 'sft'])
DpoLoss = Literal["sigmoid", "rpo", "ipo", "hinge", "apo_zero", "sigmoid_norm"]


class DpoConfig(TrainConfig):
    """The DPO objective (β, loss) and its optimisation, defined once for both DPO roads. ``online_dpo`` takes those
    of ``DPO_SHARED`` it does not set in its own section from ``offline_dpo``'s (the stage table's ``shares``), so
    both roads use the same β, loss and optimiser unless told otherwise; nothing else (data, pair_fraction,
    max_length, logging) passes from one road to the other."""

    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW, linear decay)")
    beta: float = Field(0.1, gt=0, description="DPO β (the same β is used online)")
    loss_type: DpoLoss = Field(
        "sigmoid", description="TRL DPO loss; 'rpo' is DPO plus the chosen response's NLL (RPO: TRL's loss_type "
                               "['sigmoid', 'sft'], weights [1, rpo_alpha])")
    rpo_alpha: float = Field(1.0, gt=0, description="rpo: the weight of the chosen response's NLL term")
    select: str = Field("", description="a select_dpo entry: take β, loss and lr from the choice of its rule (the "
                                        "same for both roads); empty: the settings here")
    precompute_ref: bool = Field(True, description="compute the reference's log-probs once before training (TRL's "
                                 "precompute_ref_log_probs), shared by DPO runs on the same pairs and reference; "
                                 "false: once per step, as TRL does by default")


# the DpoConfig fields online_dpo takes from offline_dpo when it does not set them (the test says which)
DPO_SHARED = ("beta", "loss_type", "rpo_alpha", "lr", "epochs", "batch_size", "precompute_ref", "select")


class OfflineDpoConfig(DpoConfig):
    data: str = data_field()
    pair_fraction: float = Field(1.0, gt=0, le=1, description="train on the first fraction of the pairs (learning curves)")
    labels: Literal["data", "gold"] = Field(
        "data", description="data: the pairs' own (noisy) labels; gold: the same pairs ordered by the gold reward "
                            "without noise, ties left out (the offline road's positive control)")


class SelectDpoConfig(TrainConfig):
    """The rule that chooses the DPO settings both roads share (``roads/stages/select_dpo.py``): every candidate of
    ``betas × losses × lrs`` trained as offline DPO, the best held-out implicit-reward log-likelihood on
    ``pairs_select`` among those passing the guards. Epochs, batch size, rpo_alpha and precompute_ref come from
    ``offline_dpo`` unless set here."""

    data: str = data_field()
    pair_fraction: float = Field(1.0, gt=0, le=1, description="train on the first fraction of the pairs")
    betas: list[PositiveFloat] = Field([0.1], min_length=1, description="candidate DPO β")
    losses: list[DpoLoss] = Field(
        ["sigmoid", "rpo"], min_length=1, description="candidate DPO losses")
    lrs: list[PositiveFloat] = Field([5e-5, 5e-4], min_length=1, description="candidate learning rates")
    rpo_alpha: float = Field(1.0, gt=0, description="rpo: the weight of the chosen response's NLL term")
    precompute_ref: bool = Field(True, description="compute the reference's log-probs once (shared between "
                                                   "candidates)")
    max_chosen_logp_fall: float = Field(0.0, ge=0, description="guard: nats the held-out chosen log-likelihood "
                                                               "may fall")
    max_kl: float = Field(2.0, gt=0, description="guard: the most KL(π‖π_SFT) on the selection prompts, in nats")
    kl_prompts: int = Field(100, gt=0, description="selection prompts sampled for the KL guard")
    kl_samples: int = Field(2, gt=0, description="samples per prompt for the KL guard")
    max_new_tokens: int = Field(16, gt=0, description="generation limit of the KL samples")


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

    too_long: Literal["truncate"] = new_setting(
        "truncate", "an example longer than max_length tokens is cut to max_length (this stage's own loop only "
                    "truncates); counted in <stage>/examples, examples_trained, truncated")
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
    val_batch_size: int = no_fingerprint(64, "batch size when scoring", gt=0)


class IvlConfig(TrainConfig):
    """Inverse value learning (Lu et al.): a small value network whose logits are added to a frozen base model's
    logits (residual connection), trained with next-token cross-entropy plus an L1 penalty on its logits, then added
    to a *different* base model with the same vocabulary."""

    too_long: Literal["truncate"] = new_setting(
        "truncate", "an example longer than max_length tokens is cut to max_length (this stage's own loop only "
                    "truncates); counted in <stage>/examples, examples_trained, truncated")
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

class OnlineDpoConfig(DpoConfig):
    """The paper's online DPO. The DPO settings (``DpoConfig``: β, loss, lr, epochs, batch size, …) not set here are
    taken from ``offline_dpo``, so both roads share β and reference unless told otherwise."""

    data: str = data_field()
    pair_fraction: float = Field(1.0, gt=0, le=1, description="sample on the prompts of the first fraction of the "
                                                              "pairs (learning curves)")

    start: str = Field("sft", description="the policy sampled from and trained: sft, offline_dpo or a variant of a policy stage")
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
    generation_batch_size: int = no_fingerprint(256, "sequences per generation batch", gt=0)
    vllm_gpu_memory_utilization: float = no_fingerprint(0.5, "engine vllm: the share of GPU memory vLLM may take",
                                                        gt=0, le=1)


class OnlineRlConfig(TrainConfig):
    """Continuous on-policy RL from the SFT policy with TRL's RLOO or GRPO, KL-penalised towards the SFT reference."""

    lr: float = Field(5e-5, gt=0, description="peak learning rate (AdamW, linear decay)")
    epochs: float = Field(1, gt=0, description="passes over the training data")
    too_long: Literal["drop"] = new_setting(
        "drop", "a prompt whose tokens and max_new_tokens do not fit in max_length is left out (TRL's RLOO and GRPO "
                "never truncate prompts); counted in online_rl/examples, examples_trained, dropped_too_long")
    algorithm: Literal["rloo", "grpo"] = Field("rloo", description="TRL trainer")
    verifier: Literal["reward_model", "gold"] = Field("reward_model", description="the reward")
    beta: float = Field(0.1, ge=0, description="KL coefficient towards the reference")
    num_generations: int = Field(4, ge=2, description="completions per prompt per step")
    max_new_tokens: int = Field(16, gt=0, description="generation limit")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    n_prompts: Optional[int] = Field(None, gt=0, description="training prompts (default: all)")
    use_vllm: bool = Field(False, description="generate with vLLM colocated with training (TRL's vllm_mode "
                                              "colocate; a GPU with vllm installed)")
    vllm_gpu_memory_utilization: float = no_fingerprint(0.3, "use_vllm: the share of GPU memory vLLM may take",
                                                        gt=0, le=1)


class MeasureGapConfig(Strict):
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
    batch_size: int = no_fingerprint(256, "sequences per generation or scoring batch", gt=0)


class ValidityConfig(Strict):
    """The validity checks' thresholds (``roads/validity.py``), pre-registered: the same for every policy and road,
    set before the run, never tuned to its outcome."""

    reference: str = Field("sft", description="the policy the positive controls must beat")
    controls: list[str] = Field(["online_dpo_gold", "offline_dpo_gold"], description="positive controls: the "
                                "gold-oracle arms of both roads; each must beat the reference")
    min_control_effect: float = Field(0.0, description="a control passes when its paired interval's lower end "
                                                       "exceeds this (gold reward)")
    displacement: list[str] = Field(["offline_dpo", "online_dpo_sft"], description="policies whose held-out "
                                    "chosen log-likelihood must not fall")
    max_chosen_logp_fall: float = Field(0.0, ge=0, description="nats the held-out chosen log-likelihood may fall")
    max_half_width: float = Field(0.02, gt=0, description="the primary contrast's interval half-width at most")
    min_ceiling_headroom: float = Field(0.05, ge=0, description="the labels' Bayes ceiling accuracy above 0.5")
    verifier: str = Field("reward_model", description="the global verifier whose headroom fraction is checked")
    min_verifier_headroom: float = Field(0.25, ge=0, le=1, description="its held-out accuracy as a fraction of "
                                         "chance-to-ceiling, at least (gap-class tasks)")
    max_likelihood_spearman: float = Field(0.5, ge=-1, le=1, description="Spearman(log π_SFT, r*) at most (gap-class tasks)")
    max_greedy_gold: float = Field(0.95, description="greedy SFT's gold reward at most (gap-class tasks)")
    sft_min_improvement: float = Field(0.005, ge=0, description="SFT converged: the held-out NLL turned up, or its "
                                       "last epoch improved it by less than this fraction")


class ReportConfig(Strict):
    """The study table: every policy × task × seed with bootstrap intervals, and paired online − offline differences.
    ``policies`` and ``series`` default to what the pipeline declares (its ``stages`` order, its variants' ``series``):
    the report reads them from its settings, never from the names of the entries."""

    policies: list[str] = Field([], description="the evaluated policies in the order the report lists them; empty: "
                                                "the order of the pipeline's stages")
    series: dict[str, str] = Field({}, description="learning-curve series: entry -> the curve it is a point of "
                                                   "(default: each variant's `series`); other entries are their own")
    contrast: str = Field("online_dpo_sft", description="the online policy whose paired difference from `baseline` the "
                                                        "gap summary sets beside each task's gap")
    n_bootstrap: int = Field(2000, ge=100, description="bootstrap resamples (seeds, then prompts within a seed)")
    confidence: float = Field(0.95, gt=0, lt=1, description="interval coverage")
    baseline: str = Field("offline_dpo", description="the offline policy that the other policies are compared with")
    bootstrap_seed: int = Field(0, **SEED_BOUNDS, description="seed of the bootstrap")
    equivalence_margin: float = Field(0.02, ge=0, description="hypotheses predicting no difference are supported when "
                                                              "the whole interval lies within ± this")
    validity: ValidityConfig = Field(ValidityConfig(), description="the validity checks' pre-registered thresholds")


class EvaluateConfig(Strict):
    samples_per_prompt: int = Field(2, gt=0, description="completions sampled per held-out prompt")
    judge: str = new_setting("", "a verifier entry (for real data: a reward_model trained on pairs_judge) that judges "
                                 "each policy sample against the SFT sample of the same prompt: proxy_win_rate, with "
                                 "the judge's own held-out accuracy on pairs_val; empty: no judge")
    max_new_tokens: int = Field(16, gt=0, description="generation limit")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    batch_size: int = no_fingerprint(64, "prompts per generation batch", gt=0)
    table_rows: int = no_fingerprint(50, "rows of the sample table logged as an artifact", ge=0)


class LaunchConfig(Strict):
    """Multi-process training of the Trainer-based stages (LAUNCH_STAGES) through ``accelerate launch`` on one
    machine. ``batch_size`` stays the *global* batch: each of the ``num_processes`` processes takes
    ``batch_size / num_processes`` examples per optimiser step, so results are comparable with one process.
    ``mixed_precision`` applies with backend none too: the Trainer stages then autocast in their own process."""

    backend: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none", description="none: train in the stage's own process; ddp: DistributedDataParallel; fsdp: FSDP2 "
                            "(FullyShardedDataParallel); deepspeed: DeepSpeed ZeRO (needs `pip install deepspeed` "
                            "where it runs)")
    num_processes: int = Field(1, ge=1, description="processes, one per GPU (ddp needs at least 2)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="accelerate's mixed precision of the Trainer stages, launched or (backend none) in their "
                          "own process: autocast, the weights stay float32; fp16 needs a GPU, bf16 runs on CPUs too "
                          "(fast where they have AMX or AVX-512 BF16)")
    deepspeed_stage: Literal[2, 3] = Field(2, description="deepspeed: ZeRO stage (2: optimizer states and "
                                                          "gradients sharded; 3: parameters too)")
    fsdp_auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = Field(
        "TRANSFORMER_BASED_WRAP", description="fsdp: accelerate's fsdp_auto_wrap_policy (TRANSFORMER_BASED_WRAP "
                                              "shards each decoder layer, from the model's _no_split_modules)")
    fsdp_reshard_after_forward: bool = Field(
        True, description="fsdp: accelerate's fsdp_reshard_after_forward (true = FULL_SHARD: free the gathered "
                          "parameters after forward; false = SHARD_GRAD_OP: keep them until backward)")
    cpu: bool = Field(False, description="run the processes on CPU over gloo (tests, CPU clusters); ddp only")

    def in_use(self) -> bool:
        """Whether the Trainer stages read this section (and their fingerprints hold it): launched, or in-process
        with mixed precision."""
        return self.backend != "none" or self.mixed_precision != "no"

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
