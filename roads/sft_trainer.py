"""SFT with TRL's SFTTrainer (loss on the completion only), shared by the stages that fine-tune on prompt/completion
rows: ``sft``, ``sft_chosen``, ``q_sft`` (its behaviour policy) and ``genrm`` (verdicts, STaR rationales)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from roads.settings import TrainConfig
from roads.training import StageCallback, Tracker, save_trained, train, trainer_args


def train_sft(stage: str, cfg: TrainConfig, seed: int, model, tokenizer, rows: list[dict], out_dir: Path,
              tracker: Tracker) -> dict[str, float]:
    """SFT (loss on the completion only) on ``rows`` of prompt/completion; saves model and tokenizer to ``out_dir``."""
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**trainer_args(cfg, seed, scratch)),
            train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]),
            processing_class=tokenizer,
            callbacks=[StageCallback(stage, tracker)],
        )
        train(trainer)
    return save_trained(stage, model, tokenizer, trainer, out_dir)
