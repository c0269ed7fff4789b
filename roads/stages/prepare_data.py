"""prepare_data: a task's SFT demonstrations, training and held-out preference pairs, and held-out prompts.

Synthetic tasks are generated from the seed (see ``roads.data.synthetic``; a user family by path, ``roads.data.family``,
the same way, and its ``task.json`` holds its source's digest, ``family_source``, so every stage reading the data
reruns when the family's code changes); real preference data is loaded from a
file or the hub, shuffled with the seed and split (held-out pairs and evaluation prompts never appear in training).
Output folder: ``task.json``, ``sft.jsonl``, ``sft_val.jsonl`` (held-out demonstrations), ``pairs_train.jsonl``, ``pairs_val.jsonl``, ``pairs_select.jsonl`` (held-out pairs for
choosing hyperparameters, never reported), ``eval_prompts.jsonl``, for real data with ``n_judge_pairs`` also
``pairs_judge.jsonl`` (the held-out judge's pairs, on prompts of their own: out of every training split and of the
evaluation prompts),
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
from roads.data.chat import chat_templated, hh_messages  # noqa: F401  (hh_messages: re-exported)
from roads.data.family import is_path, source_digest
from roads.data.synthetic import generate
from roads.errors import DataError
from roads.training import NullTracker, Tracker
from roads.ceiling import bayes_ceiling

VERSION = 2
CEILING_FILE = "ceiling.json"
SPLITS = ("sft", "sft_val", "pairs_train", "pairs_val", "pairs_select", "eval_prompts")
JUDGE_SPLIT = "pairs_judge"  # real data with n_judge_pairs: the held-out judge's pairs (no policy trains on them)


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
    judge = _judge_prompts(rows, prompts[n_held:], cfg.n_judge_pairs)
    if judge and len(prompts) - n_held - len(judge) < 1:
        raise DataError(f"{task.source}: prepare_data.n_judge_pairs {cfg.n_judge_pairs} takes every training prompt "
                        f"({len(prompts) - n_held} after {n_held} held out); lower it, or raise tasks.<name>.limit")
    train = [r for r in rows if r["prompt"] not in held and r["prompt"] not in judge]
    held_rows = [r for r in rows if r["prompt"] in held]
    eval_prompts = sorted(held)[: cfg.n_eval_prompts]
    extra = {"pairs_judge": [r for r in rows if r["prompt"] in judge]} if cfg.n_judge_pairs else {}
    return {
        **extra,
        "sft": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in train[: cfg.n_sft]],
        "pairs_train": train[: cfg.n_pairs],
        "pairs_val": held_rows[: cfg.n_val_pairs],
        "sft_val": [{"prompt": r["prompt"], "completion": r["chosen"]} for r in held_rows[-cfg.n_sft_val:]],
        "pairs_select": held_rows[cfg.n_val_pairs:][: cfg.n_select_pairs],
        "eval_prompts": [{"prompt": p} for p in eval_prompts],
    }


def _judge_prompts(rows: list[dict], candidates: list[str], n_pairs: int) -> set[str]:
    """The prompts of the held-out judge's pairs: the first of ``candidates`` (the training prompts, in the seeded
    order) until they hold ``n_pairs`` pairs. Their pairs leave the training data: no policy trains on them, and they
    are not the evaluation prompts."""
    if n_pairs <= 0:
        return set()
    count: dict[str, int] = {}
    for r in rows:
        count[r["prompt"]] = count.get(r["prompt"], 0) + 1
    chosen: set[str] = set()
    total = 0
    for prompt in candidates:
        if total >= n_pairs:
            break
        chosen.add(prompt)
        total += count[prompt]
    return chosen


def _template_tokenizer(spec: StageSpec):
    """The pretrained tokenizer whose chat template renders the conversations, or None (no model, setting plain, or
    no template)."""
    task = spec.task
    if task.chat_template == "plain" or spec.model is None or not spec.model.pretrained:
        return None
    from roads.models import load_tokenizer

    tokenizer = load_tokenizer(spec.model.pretrained)
    return tokenizer if getattr(tokenizer, "chat_template", None) else None


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: PrepareDataConfig = spec.config()
    task = spec.task
    synthetic = synthetic_task(task)
    if synthetic is None:
        splits = _real_splits(task, cfg, spec.seed)
    elif cfg.n_judge_pairs:
        raise DataError(f"prepare_data.n_judge_pairs: task {spec.task_name!r} has a gold reward; a held-out judge "
                        "(pairs_judge) is drawn from real preference data only — leave n_judge_pairs at 0")
    if synthetic is None:
        tokenizer = _template_tokenizer(spec)
        if tokenizer is not None:
            splits = chat_templated(splits, tokenizer)
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
    source = {"family_source": source_digest(task.family)} if is_path(task.family) else {}  # its code is the data's
    write_json(out_dir / "task.json", {"name": spec.task_name, **task.model_dump(), **source})
    written = SPLITS + ((JUDGE_SPLIT,) if JUDGE_SPLIT in splits else ())
    for name in written:
        write_jsonl(out_dir / f"{name}.jsonl", splits[name])
    metrics = {f"prepare_data/n_{name}": float(len(splits[name])) for name in written}
    if synthetic is None:
        metrics["prepare_data/chat_template"] = float(tokenizer is not None)
    files = [f"{n}.jsonl" for n in written] + ["task.json"]
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
    tracker.progress(", ".join(f"{len(splits[n])} {n}" for n in written))
    return StageResult(metrics=metrics, files=files)
