"""offline_dpo: the one-stage road — TRL's DPOTrainer on the training pairs, starting from the SFT policy, with the
SFT model *loaded from disk* as the reference (the first ``pair_fraction`` of the pairs, for learning curves). The
reference's log-probs are computed once per (reference, pairs) and shared with every DPO run on the same pairs
(``roads/reference.py``).
Output: the policy, and ``verifier.json``: its implicit reward β·log π/π_ref is a verifier too.
"""

from __future__ import annotations

from pathlib import Path

from roads.artifacts import ArtifactRef, StageResult, read_jsonl
from roads.config import StageSpec
from roads.settings import OfflineDpoConfig
from roads.dpo_trainer import train_dpo
from roads.training import NullTracker, Tracker, first_fraction

VERSION = 1


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: OfflineDpoConfig = spec.config()
    pairs = first_fraction(read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl"), cfg.pair_fraction)
    metrics = train_dpo("offline_dpo", cfg, spec.seed, inputs["sft"].path, pairs, out_dir, tracker,
                        beta=cfg.beta, loss_type=cfg.loss_type, precompute_ref=cfg.precompute_ref)
    return StageResult(metrics=metrics, files=[])
