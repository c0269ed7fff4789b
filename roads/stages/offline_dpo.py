"""offline_dpo: the one-stage road — TRL's DPOTrainer on the training pairs, starting from the SFT policy, with the
SFT model *loaded from disk* as the reference (the first ``pair_fraction`` of the pairs, for learning curves;
``labels: gold`` orders them by the gold reward without noise — the offline road's positive control). The
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
from roads.selection import selected_settings
from roads.errors import DataError
from roads.training import NullTracker, Tracker, first_fraction

VERSION = 1


def gold_labelled(pairs: list[dict]) -> list[dict]:
    """The pairs ordered by their gold reward without label noise (chosen = the higher ``chosen_gold`` /
    ``rejected_gold``), exact ties left out: the same prompts and responses as the data, a perfect label."""
    if pairs and not all("chosen_gold" in r and "rejected_gold" in r for r in pairs):
        raise DataError("offline_dpo.labels=gold: the pairs have no chosen_gold/rejected_gold columns (real data has "
                        "no gold reward); use labels=data")
    out = []
    for r in pairs:
        if r["chosen_gold"] == r["rejected_gold"]:
            continue
        if r["chosen_gold"] < r["rejected_gold"]:
            r = {**r, "chosen": r["rejected"], "rejected": r["chosen"], "chosen_gold": r["rejected_gold"],
                 "rejected_gold": r["chosen_gold"]}
        out.append(r)
    return out


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: OfflineDpoConfig = spec.config()
    if "selection" in inputs:  # β, loss and lr chosen by the select_dpo rule (the same for both roads)
        cfg = cfg.model_copy(update=selected_settings(inputs["selection"].path))
        tracker.progress(f"DPO settings chosen by {cfg.select}: beta {cfg.beta:g}, loss {cfg.loss_type}, lr {cfg.lr:g}")
    pairs = first_fraction(read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl"), cfg.pair_fraction)
    if cfg.labels == "gold":
        pairs = gold_labelled(pairs)
        tracker.progress(f"{len(pairs)} pairs ordered by the gold reward (ties left out)")
    metrics = train_dpo("offline_dpo", cfg, spec.seed, inputs["sft"].path, pairs, out_dir, tracker,
                        beta=cfg.beta, loss_type=cfg.loss_type, rpo_alpha=cfg.rpo_alpha,
                        precompute_ref=cfg.precompute_ref, lora=spec.lora)
    return StageResult(metrics=metrics, files=[])
