"""sft_chosen: the simplest offline likelihood baseline — continue SFT from the SFT policy on the *chosen* responses
of the training preference pairs (the rejected ones are ignored). Output: the policy."""

from __future__ import annotations

from pathlib import Path

from roads.artifacts import ArtifactRef, StageResult, read_jsonl
from roads.config import StageSpec
from roads.settings import SftChosenConfig
from roads.models import load_policy
from roads.sft_trainer import train_sft
from roads.training import NullTracker, Tracker

VERSION = 1


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: SftChosenConfig = spec.config()
    pairs = read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl")
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs]
    model, tokenizer = load_policy(inputs["sft"].path)
    tracker.progress(f"{len(rows)} chosen responses")
    metrics = train_sft("sft_chosen", cfg, spec.seed, model, tokenizer, rows, out_dir, tracker)
    return StageResult(metrics=metrics, files=[])
