"""online_rl: continuous on-policy RL from the SFT policy with TRL's RLOO or GRPO (``algorithm``), against a verifier
(``verifier``: the trained reward model, or the task's gold reward), KL-penalised with ``beta`` towards the same
reference as offline DPO — the SFT model.

How it is wired:

* **Prompts**: the prompts of ``pairs_train.jsonl`` (unique, in file order) — the same prompts offline DPO sees —
  keeping those whose tokens (as TRL tokenises them) plus ``max_new_tokens`` fit in ``max_length`` — TRL 1.16's RLOO
  and GRPO have no ``max_length`` and never truncate prompts, so ``max_length`` is used here as that filter — then
  the first ``n_prompts`` if set.
* **Policy and reference**: the policy is loaded from the SFT folder, and TRL (RLOO and GRPO, when β > 0) builds
  its reference by reloading ``model.config._name_or_path`` — that same folder — so the reference is exactly the SFT
  model (TRL has no ``ref_model`` argument for these trainers).
* **Reward**: a plain function ``(prompts, completions, **kw) -> list[float]`` in both cases. With the reward model it
  scores with :func:`roads.generation.reward_scores` (prompt + completion + EOS, the tokenisation the RM was trained
  on; TRL's own reward-model path omits the EOS) and is logged as ``rewards/verifier/mean``; with the gold reward it
  applies the task's r*(x, y) and is logged as ``rewards/gold/mean``.
* **Response vocabulary**: the ids the SFT policy suppresses (``generation_config.suppress_tokens``, see
  :func:`roads.models.restrict_vocab`) reach TRL's sampler as ``generation_kwargs`` — ``suppress_tokens`` for
  transformers' ``generate``, ``allowed_token_ids`` for vLLM — so no sample contains one; the saved policy keeps them.
* **Batch size**: ``batch_size`` counts completions per optimiser step. TRL needs the generation batch to hold whole
  prompt groups, so it is rounded *up* to a multiple of ``num_generations`` (8 with 4 generations → 2 prompts × 4).
  Under ``accelerate launch`` that is the global batch, split evenly over the processes.
* **Determinism**: TRL seeds the global torch generator from the seed (``set_seed`` in ``Trainer``) and samples with it;
  its prompt sampler is seeded too, so the same inputs and seed give the same weights.

Output: the policy (``save_pretrained``) and ``budget.json`` (prompts, completions and tokens generated, optimiser
steps — deterministic counts only).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Callable

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from roads.artifacts import ArtifactRef, StageResult, read_jsonl, write_json
from roads.config import StageSpec
from roads.settings import OnlineRlConfig, TaskConfig
from roads.data import gold_reward_fn, task_of
from roads.errors import ConfigError, DataError, RoadsError
from roads.generation import reward_scores, vllm_problem
from roads.models import load_policy, load_reward_model, suppressed_tokens
from roads.lora import with_lora
from roads.training import (NullTracker, StageCallback, Tracker, check_dropped, length_metrics, per_device_batch,
                            save_trained, train, trainer_args)

VERSION = 1
STAGE = "online_rl"

RewardFunc = Callable[..., list[float]]


def training_prompts(data: Path, tokenizer, cfg: OnlineRlConfig) -> tuple[list[str], int]:
    """(prompts, how many were dropped for length): unique prompts of the training pairs, in file order."""
    prompts = list(dict.fromkeys(r["prompt"] for r in read_jsonl(data / "pairs_train.jsonl")))
    budget = cfg.max_length - cfg.max_new_tokens
    fitting = [p for p in prompts if len(tokenizer(p)["input_ids"]) <= budget]  # TRL tokenises prompts this way
    if not fitting:
        raise DataError(
            f"{data / 'pairs_train.jsonl'}: no prompt fits in online_rl.max_length − max_new_tokens = {budget} "
            "tokens; raise online_rl.max_length"
        )
    return fitting[: cfg.n_prompts] if cfg.n_prompts else fitting, len(prompts) - len(fitting)


def gold_reward_func(task: TaskConfig) -> RewardFunc:
    """The task's gold reward r*(x, y) as a TRL reward function (logged as ``rewards/gold/…``)."""
    gold = gold_reward_fn(task)
    if gold is None:
        raise ConfigError(
            f"online_rl.verifier: task family {task.family!r} has no gold reward; use verifier=reward_model"
        )

    def reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        return [float(gold(p, c)) for p, c in zip(prompts, completions, strict=True)]

    reward.__name__ = "gold"
    return reward


def reward_model_func(path: str | Path, device=None) -> RewardFunc:
    """The trained reward model as a TRL reward function (logged as ``rewards/verifier/…``), tokenising prompt +
    completion + EOS exactly as the reward model was trained."""
    model, tokenizer = load_reward_model(path)
    if device is not None:
        model.to(device)

    def reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        return reward_scores(model, tokenizer, list(prompts), list(completions)).tolist()

    reward.__name__ = "verifier"
    return reward


def counting(func: RewardFunc, counts: dict[str, int]) -> RewardFunc:
    """``func`` that also counts the completions and tokens TRL generated (each completion is scored once)."""

    def reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        counts["completions"] += len(completions)
        counts["tokens_generated"] += sum(len(ids) for ids in completion_ids or ())
        return func(prompts, completions, **kwargs)

    reward.__name__ = func.__name__
    return reward


def group_batch_size(batch_size: int, num_generations: int) -> int:
    """The batch size rounded up to whole prompt groups (TRL requires generation batch % num_generations == 0)."""
    return math.ceil(batch_size / num_generations) * num_generations


def restriction_kwargs(suppressed: list[int], vocab: int, use_vllm: bool) -> dict | None:
    """TRL's ``generation_kwargs`` that keep the policy's response vocabulary (its ``suppress_tokens``): for
    transformers' ``generate`` the ids to suppress, for vLLM's SamplingParams the ids below ``vocab`` it may sample;
    None for an unrestricted policy."""
    if not suppressed:
        return None
    if use_vllm:
        out = set(suppressed)
        return {"allowed_token_ids": [i for i in range(vocab) if i not in out]}
    return {"suppress_tokens": sorted(set(suppressed))}


def rl_config(cfg: OnlineRlConfig, seed: int, output_dir: str, suppressed: list[int] | None = None,
              vocab: int | None = None):
    """TRL's RLOOConfig or GRPOConfig: the shared trainer arguments (less ``max_length``, which neither has) plus β,
    the group size and the sampling settings; with ``suppressed`` (the policy's ``suppress_tokens``) and ``vocab``
    (its tokenizer's length), generation kwargs that keep those ids out of every sample (:func:`restriction_kwargs`;
    transformers' ``generate`` would also read them from the model's generation config, vLLM would not)."""
    args = trainer_args(cfg, seed, output_dir)
    args.pop("max_length")
    args["per_device_train_batch_size"] = per_device_batch(group_batch_size(cfg.batch_size, cfg.num_generations),
                                                           f"{STAGE}.batch_size (in whole prompt groups)")
    args.update(beta=cfg.beta, num_generations=cfg.num_generations, max_completion_length=cfg.max_new_tokens,
                temperature=cfg.temperature)
    if cfg.use_vllm:
        problem = vllm_problem()
        if problem:
            raise RoadsError(f"{STAGE}.use_vllm: {problem}; or set {STAGE}.use_vllm=false")
        args.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    restriction = restriction_kwargs(suppressed or [], vocab or 0, cfg.use_vllm)
    if restriction:
        args["generation_kwargs"] = restriction
    return (RLOOConfig if cfg.algorithm == "rloo" else GRPOConfig)(**args)


def build_trainer(cfg: OnlineRlConfig, args, policy, tokenizer, prompts: list[str], reward: RewardFunc,
                  tracker: Tracker = NullTracker()):
    """The RLOO or GRPO trainer. ``policy`` must have been loaded from disk: its reference is rebuilt from
    ``policy.config._name_or_path``."""
    trainer_class = RLOOTrainer if cfg.algorithm == "rloo" else GRPOTrainer
    return trainer_class(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
        callbacks=[StageCallback(STAGE, tracker, cfg)],
    )


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: OnlineRlConfig = spec.config()
    data = Path(inputs["data"].path)
    policy, tokenizer = load_policy(inputs["reference"].path)  # TRL reloads the reference from this very folder
    prompts, dropped = training_prompts(data, tokenizer, cfg)
    given = len(set(r["prompt"] for r in read_jsonl(data / "pairs_train.jsonl")))  # n_prompts may keep fewer
    lengths = {"examples": given, "examples_trained": len(prompts), "truncated": 0, "dropped_too_long": dropped,
               "dropped_prompt_too_long": 0}
    check_dropped(STAGE, dropped, given, cfg.max_dropped_fraction, cfg.max_length)
    # LoRA: TRL's reference is then a frozen copy of the fresh adapter on this same policy (exactly it, roads.lora)
    policy = with_lora(policy, spec.lora, spec.seed)
    counts = {"completions": 0, "tokens_generated": 0}
    with tempfile.TemporaryDirectory() as scratch:
        args = rl_config(cfg, spec.seed, scratch, suppressed_tokens(policy), len(tokenizer))
        if cfg.verifier == "gold":
            reward = gold_reward_func(task_of(data)[1])
        else:
            reward = reward_model_func(inputs["verifier"].path, device=args.device)
        tracker.progress(
            f"{cfg.algorithm} on {len(prompts)} prompts × {cfg.num_generations} completions, verifier {cfg.verifier}"
            + (f" ({dropped} prompts longer than max_length dropped)" if dropped else "")
        )
        trainer = build_trainer(cfg, args, policy, tokenizer, prompts, counting(reward, counts), tracker)
        train(trainer)
    metrics = save_trained(STAGE, policy, tokenizer, trainer, out_dir)
    write_json(out_dir / "budget.json", {"prompts": len(prompts), "prompts_dropped": dropped,
                                         "steps": trainer.state.global_step, **counts})
    metrics[f"{STAGE}/tokens_generated"] = float(counts["tokens_generated"])
    metrics.update(length_metrics(STAGE, lengths))
    return StageResult(metrics=metrics, files=["budget.json"])
