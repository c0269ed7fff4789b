"""online_dpo: the two-stage road as the paper runs it (not TRL's OnlineDPOTrainer).

From a start policy (SFT, or the offline-DPO policy) sample ``k`` completions per training prompt, score them with a
verifier (the reward model by default; any verifier — a local reward model, a DPO policy's implicit reward (H1: the
offline data's own fit) — or the gold reward as an oracle), keep the best and the worst as a new (chosen,
rejected) pair, and train with the *same* DPO loss, β and reference (the SFT model, loaded from disk) as offline DPO.
``rounds`` > 1 repeats sample → label → train from the latest policy (iterative online DPO). ``prompt_multiplier``
> 1 adds prompts resampled from the SFT data (the paper's augmentation, H3).

Output: the policy, ``pairs.jsonl`` (every constructed pair with its scores, the sample table) and ``budget.json``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from roads.artifacts import ArtifactRef, StageResult, read_jsonl, write_json, write_jsonl
from roads.config import StageSpec
from roads.settings import OnlineDpoConfig
from roads.data import gold_of
from roads.dpo_trainer import train_dpo
from roads.selection import selected_settings
from roads.errors import RoadsError, TrainingError
from roads.generation import sample, sample_vllm
from roads.models import load_policy
from roads.training import NullTracker, Tracker, first_fraction
from roads.verifiers import load_verifier

VERSION = 1


def best_worst_pairs(prompts: list[str], completions: list[list[str]], scores: list[list[float]]) -> list[dict]:
    """For each prompt, the completion the verifier scores highest as chosen and lowest as rejected (the first one
    on ties). A prompt whose best and worst scores are equal gives no pair: the verifier cannot tell them apart.
    A text sampled more than once keeps the score of its first copy, so copies are exact ties (the same text scored
    in two batches differs in the last bits) and a prompt whose samples are all one text gives no pair."""
    pairs = []
    for prompt, group, raw in zip(prompts, completions, scores, strict=True):
        first: dict[str, float] = {}
        group_scores = [first.setdefault(text, score) for text, score in zip(group, raw, strict=True)]
        best = max(range(len(group)), key=lambda i: group_scores[i])
        worst = min(range(len(group)), key=lambda i: group_scores[i])
        if group_scores[best] > group_scores[worst]:
            pairs.append({"prompt": prompt, "chosen": group[best], "rejected": group[worst],
                          "chosen_score": float(group_scores[best]), "rejected_score": float(group_scores[worst])})
    return pairs


def online_prompts(data: Path, multiplier: int, pair_fraction: float = 1.0) -> list[str]:
    """The training prompts (those of the offline pairs — their first ``pair_fraction`` — in order), plus
    (multiplier − 1)× as many drawn in order from the SFT prompts that are not among them (the paper's augmentation)."""
    pairs = first_fraction(read_jsonl(data / "pairs_train.jsonl"), pair_fraction)
    prompts = list(dict.fromkeys(r["prompt"] for r in pairs))
    if multiplier > 1:
        taken = set(prompts)
        extra = [p for p in dict.fromkeys(r["prompt"] for r in read_jsonl(data / "sft.jsonl")) if p not in taken]
        prompts += extra[: (multiplier - 1) * len(prompts)]
    return prompts


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: OnlineDpoConfig = spec.config()
    if "selection" in inputs:  # β, loss and lr chosen by the select_dpo rule (the same for both roads)
        cfg = cfg.model_copy(update=selected_settings(inputs["selection"].path))
        tracker.progress(f"DPO settings chosen by {cfg.select}: beta {cfg.beta:g}, loss {cfg.loss_type}, lr {cfg.lr:g}")
    data = Path(inputs["data"].path)
    task_name, gold = gold_of(data)
    prompts = online_prompts(data, cfg.prompt_multiplier, cfg.pair_fraction)
    if cfg.verifier == "gold":
        if gold is None:
            raise RoadsError(f"online_dpo.verifier: 'gold' needs a task with a gold reward; {task_name!r} has none")

        def verify(flat_prompts: list[str], flat_completions: list[str]) -> list[float]:
            return [gold(p, c) for p, c in zip(flat_prompts, flat_completions)]
    else:
        verifier = load_verifier(cfg.verifier, inputs["verifier"].path, reference=inputs["reference"].path,
                                 batch_size=cfg.generation_batch_size)

        def verify(flat_prompts: list[str], flat_completions: list[str]) -> list[float]:
            return verifier.score(flat_prompts, flat_completions).tolist()

    policy_path = inputs["start"].path
    all_pairs: list[dict] = []
    tokens_generated = 0
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(cfg.rounds):
            tracker.progress(f"round {round_index + 1}/{cfg.rounds}: sampling {len(prompts)} x {cfg.k}"
                             f"{' with vLLM' if cfg.engine == 'vllm' else ''}")
            if cfg.engine == "vllm":
                groups = sample_vllm(policy_path, prompts, n=cfg.k, max_new_tokens=cfg.max_new_tokens,
                                     temperature=cfg.temperature, seed=spec.seed * 1000 + round_index,
                                     gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
            else:
                model, tokenizer = load_policy(policy_path)
                groups = sample(model, tokenizer, prompts, n=cfg.k, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, seed=spec.seed * 1000 + round_index,
                                batch_size=cfg.generation_batch_size)
            tokens_generated += sum(len(c.ids) for group in groups for c in group)
            texts = [[c.text for c in group] for group in groups]
            flat_scores = verify([p for p, g in zip(prompts, texts) for _ in g], [c for g in texts for c in g])
            scores = [flat_scores[i * cfg.k:(i + 1) * cfg.k] for i in range(len(prompts))]
            pairs = best_worst_pairs(prompts, texts, scores)
            if not pairs:
                raise TrainingError("online_dpo: the verifier scored all k samples of every prompt the same, so there "
                                    "are no pairs; raise online_dpo.k or online_dpo.temperature")
            for pair in pairs:
                pair["round"] = round_index
                if gold is not None:
                    pair["chosen_gold"] = gold(pair["prompt"], pair["chosen"])
                    pair["rejected_gold"] = gold(pair["prompt"], pair["rejected"])
            all_pairs += pairs
            last = round_index == cfg.rounds - 1
            round_dir = out_dir if last else Path(scratch) / f"round{round_index}"
            metrics.update(train_dpo("online_dpo", cfg, spec.seed, policy_path, pairs, round_dir, tracker,
                                     beta=cfg.beta, loss_type=cfg.loss_type, rpo_alpha=cfg.rpo_alpha,
                                     precompute_ref=cfg.precompute_ref,
                                     reference=inputs["reference"].path, lora=spec.lora))
            policy_path = str(round_dir)
            tracker.log_metrics({"online_dpo/pairs": float(len(pairs))}, step=round_index)
    budget = {"prompts": len(prompts), "samples": len(prompts) * cfg.k * cfg.rounds, "pairs": len(all_pairs),
              "tokens_generated": tokens_generated}
    write_json(out_dir / "budget.json", budget)
    write_jsonl(out_dir / "pairs.jsonl", all_pairs)
    metrics.update({f"online_dpo/{k}": float(v) for k, v in budget.items()})
    if gold is not None:
        agree = sum(p["chosen_gold"] > p["rejected_gold"] for p in all_pairs) / len(all_pairs)
        metrics["online_dpo/pairs_gold_agreement"] = agree
    return StageResult(metrics=metrics, files=["pairs.jsonl", "budget.json"])
