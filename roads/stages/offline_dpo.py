"""offline_dpo: the one-stage road — TRL's DPOTrainer on the training pairs, starting from the SFT policy, with the
SFT model *loaded from disk* as the reference (the first ``pair_fraction`` of the pairs, for learning curves). The
reference's log-probs are computed once per (reference, pairs) and shared with every DPO run on the same pairs
(``roads/reference.py``).
Output: the policy, and ``verifier.json``: its implicit reward β·log π/π_ref is a verifier too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from datasets import Dataset
from trl import DPOConfig

from roads.artifacts import ArtifactRef, StageResult, read_jsonl, write_json
from roads.config import OfflineDpoConfig, StageSpec
from roads.models import load_policy
from roads.reference import SharedReferenceDPOTrainer
from roads.training import NullTracker, StageCallback, Tracker, first_fraction, save_trained, train, trainer_args
from roads.verifiers import VERIFIER_FILE

VERSION = 1


def train_dpo(stage: str, cfg: OfflineDpoConfig, seed: int, start_policy: str, pairs: list[dict], out_dir: Path,
              tracker: Tracker, reference: str | None = None) -> dict[str, float]:
    """DPO from the policy saved at ``start_policy`` against the reference saved at ``reference`` (default: the
    start policy); both are loaded from disk. Saves the result to ``out_dir``."""
    model, tokenizer = load_policy(start_policy)
    ref_model, _ = load_policy(reference or start_policy)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SharedReferenceDPOTrainer(
            model=model,
            ref_model=ref_model,
            args=DPOConfig(**trainer_args(cfg, seed, scratch, beta=cfg.beta, loss_type=cfg.loss_type,
                                          precompute_ref_log_probs=cfg.precompute_ref)),
            train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs]),
            processing_class=tokenizer,
            callbacks=[StageCallback(stage, tracker)],
        )
        if cfg.precompute_ref:
            tracker.log_metrics({f"{stage}/ref_logps_shared": float(trainer.ref_logps_shared)})
        train(trainer)
    metrics = save_trained(stage, model, tokenizer, trainer, out_dir)
    write_json(Path(out_dir) / VERIFIER_FILE, {"kind": "implicit", "beta": cfg.beta})  # β·log π/π_ref is a verifier
    return metrics


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: OfflineDpoConfig = spec.config()
    pairs = first_fraction(read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl"), cfg.pair_fraction)
    metrics = train_dpo("offline_dpo", cfg, spec.seed, inputs["sft"].path, pairs, out_dir, tracker)
    return StageResult(metrics=metrics, files=[])
