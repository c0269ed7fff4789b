"""prepare_data: a task's SFT demonstrations, training and held-out preference pairs, and held-out prompts.

Synthetic tasks are generated from the seed (see ``roads.data.synthetic``); real preference data is loaded from a
file or the hub, shuffled with the seed and split (held-out pairs and evaluation prompts never appear in training).
Output folder: ``task.json``, ``sft.jsonl``, ``sft_val.jsonl`` (held-out demonstrations), ``pairs_train.jsonl``, ``pairs_val.jsonl``, ``pairs_select.jsonl`` (held-out pairs for
choosing hyperparameters, never reported), ``eval_prompts.jsonl``,
and for synthetic tasks ``ceiling.json``: the labels' Bayes ceiling on ``pairs_val`` (the gold reward as a verifier,
:func:`roads.ceiling.bayes_ceiling`) — {"split": "pairs_val", "tau" (the ``bt_temperature`` the labels were drawn
with), "n_pairs", "accuracy", "loglik", "expected_accuracy", "expected_loglik", "tie_fraction"}.
"""

from __future__ import annotations

import random
from pathlib import Path

from roads.artifacts import ArtifactRef, StageResult, write_json, write_jsonl
from roads.config import StageSpec
from roads.settings import PrepareDataConfig, TaskConfig
from roads.data import synthetic_task
from roads.data.synthetic import generate
from roads.errors import DataError
from roads.training import NullTracker, Tracker
from roads.ceiling import bayes_ceiling

VERSION = 2
CEILING_FILE = "ceiling.json"
SPLITS = ("sft", "sft_val", "pairs_train", "pairs_val", "pairs_select", "eval_prompts")


def _real_splits(task: TaskConfig, cfg: PrepareDataConfig, seed: int) -> dict[str, list[dict]]:
    from roads.data.preferences import load_preferences

    rows = load_preferences(task.source, format=task.format, split=task.split, limit=task.limit)
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    prompts = sorted({r["prompt"] for r in rows}, key=lambda p: random.Random(f"{seed}:{p}").random())
    n_held = min(max(1, len(prompts) // 5), cfg.n_val_pairs + cfg.n_eval_prompts)
    if len(prompts) - n_held < 1:
        raise DataError(f"{task.source}: only {len(prompts)} distinct prompts; need at least 2 to hold some out")
    held = set(prompts[:n_held])
    train = [r for r in rows if r["prompt"] not in held]
    held_rows = [r for r in rows if r["prompt"] in held]
    eval_prompts = sorted(held)[: cfg.n_eval_prompts]
    return {
        "sft": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in train[: cfg.n_sft]],
        "pairs_train": train[: cfg.n_pairs],
        "pairs_val": held_rows[: cfg.n_val_pairs],
        "sft_val": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in held_rows[-cfg.n_sft_val:]],
        "pairs_select": held_rows[cfg.n_val_pairs:][: cfg.n_select_pairs],
        "eval_prompts": [{"prompt": p} for p in eval_prompts],
    }


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: PrepareDataConfig = spec.config()
    task = spec.task
    synthetic = synthetic_task(task)
    if synthetic is None:
        splits = _real_splits(task, cfg, spec.seed)
    else:
        splits = generate(
            synthetic,
            seed=spec.seed,
            n_sft=cfg.n_sft,
            n_pairs=cfg.n_pairs,
            n_val_pairs=cfg.n_val_pairs,
            n_eval_prompts=cfg.n_eval_prompts,
            demo_noise=cfg.demo_noise,
            behaviour_noise=cfg.behaviour_noise,
            bt_temperature=cfg.bt_temperature,
            n_sft_val=cfg.n_sft_val,
            n_select_pairs=cfg.n_select_pairs,
        )
    write_json(out_dir / "task.json", {"name": spec.task_name, **task.model_dump()})
    for name in SPLITS:
        write_jsonl(out_dir / f"{name}.jsonl", splits[name])
    metrics = {f"prepare_data/n_{name}": float(len(splits[name])) for name in SPLITS}
    files = [f"{n}.jsonl" for n in SPLITS] + ["task.json"]
    if synthetic is not None:
        val = splits["pairs_val"]
        ceiling = bayes_ceiling([r["chosen_gold"] for r in val], [r["rejected_gold"] for r in val], cfg.bt_temperature)
        write_json(out_dir / CEILING_FILE, {"split": "pairs_val", **ceiling})
        files.append(CEILING_FILE)
        for key in ("accuracy", "loglik", "expected_accuracy", "expected_loglik", "tie_fraction"):
            metrics[f"prepare_data/ceiling_{key}"] = ceiling[key]
        tracker.progress(f"Bayes ceiling on pairs_val (tau {cfg.bt_temperature:g}): accuracy {ceiling['accuracy']:.3f} "
                         f"(expected {ceiling['expected_accuracy']:.3f}), log-likelihood {ceiling['loglik']:.4f} "
                         f"(expected {ceiling['expected_loglik']:.4f}), ties {ceiling['tie_fraction']:.3f}")
        sft = splits["sft"]
        pairs = splits["pairs_train"]
        metrics["prepare_data/sft_gold_mean"] = sum(synthetic.gold_reward(r["prompt"], r["completion"]) for r in sft) / len(sft)
        metrics["prepare_data/pairs_gold_agreement"] = sum(r["chosen_gold"] > r["rejected_gold"] for r in pairs) / len(pairs)
        metrics["prepare_data/pairs_gold_ties"] = sum(r["chosen_gold"] == r["rejected_gold"] for r in pairs) / len(pairs)
    tracker.progress(", ".join(f"{len(splits[n])} {n}" for n in SPLITS))
    return StageResult(metrics=metrics, files=files)
