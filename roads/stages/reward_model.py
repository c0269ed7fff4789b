"""reward_model: the global verifier — the SFT model with its LM head replaced by a scalar head, trained with the
Bradley–Terry loss (TRL's RewardTrainer) on the training pairs (the first ``pair_fraction`` of them). Logs
validation accuracy and preference log-likelihood, mean log σ(r(x, y+) − r(x, y−)), on held-out pairs. Output: the
reward model and tokenizer, ``validation.json`` and ``verifier.json`` (kind ``global``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from roads.artifacts import ArtifactRef, StageResult, read_jsonl, write_json
from roads.config import StageSpec
from roads.settings import RewardModelConfig
from roads.generation import reward_scores
from roads.models import reward_model_from_policy
from roads.training import NullTracker, StageCallback, Tracker, first_fraction, save_trained, train, trainer_args
from roads.verifiers import VERIFIER_FILE, preference_metrics

VERSION = 1


def score_pairs(model, tokenizer, rows: list[dict], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [r["prompt"] for r in rows]
    chosen = reward_scores(model, tokenizer, prompts, [r["chosen"] for r in rows], batch_size=batch_size)
    rejected = reward_scores(model, tokenizer, prompts, [r["rejected"] for r in rows], batch_size=batch_size)
    return chosen, rejected


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: RewardModelConfig = spec.config()
    data = Path(inputs["data"].path)
    train_rows = first_fraction(read_jsonl(data / "pairs_train.jsonl"), cfg.pair_fraction)
    val = read_jsonl(data / "pairs_val.jsonl")
    model, tokenizer = reward_model_from_policy(inputs["sft"].path, seed=spec.seed)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = RewardTrainer(
            model=model,
            args=RewardConfig(**trainer_args(cfg, spec.seed, scratch)),
            train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train_rows]),
            processing_class=tokenizer,
            callbacks=[StageCallback("reward_model", tracker)],
        )
        train(trainer)
    metrics = save_trained("reward_model", model, tokenizer, trainer, out_dir)
    chosen, rejected = score_pairs(model, tokenizer, val, cfg.val_batch_size)
    val_metrics = preference_metrics(chosen, rejected)
    metrics.update({f"reward_model/val_{k}": v for k, v in val_metrics.items()})
    tracker.log_metrics({f"reward_model/val_{k}": v for k, v in val_metrics.items()}, step=trainer.state.global_step)
    tracker.progress(f"held-out accuracy {val_metrics['accuracy']:.3f}, log-likelihood {val_metrics['loglik']:.4f}")
    write_json(out_dir / "validation.json", {k: round(v, 6) for k, v in val_metrics.items()})
    write_json(out_dir / VERIFIER_FILE, {"kind": "global"})
    return StageResult(metrics=metrics, files=["validation.json"])
