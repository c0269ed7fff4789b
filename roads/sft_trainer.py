"""SFT with TRL's SFTTrainer (loss on the completion only), shared by the stages that fine-tune on prompt/completion
rows: ``sft``, ``sft_chosen``, ``q_sft`` (its behaviour policy) and ``genrm`` (verdicts, STaR rationales).

With held-out rows, the number of epochs is chosen by a rule, never by the gold evaluation: after every epoch the
held-out NLL (mean over completion tokens, TRL's eval loss) is measured and the weights of the epoch with the lowest
one are kept (:class:`KeepBest`); the curve and the choice are written to ``selection.json``."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from roads.artifacts import write_json
from roads.errors import TrainingError
from roads.settings import TrainConfig
from roads.lora import with_lora
from roads.settings import LoraConfig
from roads.training import LengthRule, LengthRuled, StageCallback, Tracker, save_trained, train, trainer_args

SELECTION_FILE = "selection.json"


class KeepBest(TrainerCallback):
    """After each evaluation: the held-out loss on the curve, a copy of the weights when it is the lowest yet, and
    (``patience`` > 0) the end of training after ``patience`` evaluations without a lower one."""

    def __init__(self, stage: str, tracker: Tracker, patience: int = 0):
        self.stage, self.tracker, self.patience = stage, tracker, patience
        self.curve: list[tuple[float, float]] = []  # (epoch, held-out NLL)
        self.best: tuple[float, float] | None = None
        self.best_at = 0  # the number of evaluations when the best one came
        self.weights: dict | None = None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss, epoch = float(metrics["eval_loss"]), round(float(state.epoch), 6)
        self.curve.append((epoch, loss))
        self.tracker.log_metrics({f"{self.stage}/val_nll": loss}, step=len(self.curve))
        if math.isfinite(loss) and (self.best is None or loss < self.best[1]):
            self.best, self.best_at = (epoch, loss), len(self.curve)
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.patience and len(self.curve) - self.best_at >= self.patience:
            control.should_training_stop = True  # no better epoch in `patience` evaluations: the curve turned up


class RoadsSFTTrainer(LengthRuled, SFTTrainer):
    """SFTTrainer whose rows longer than max_length are cut or dropped, and counted, by a :class:`LengthRule`."""


def _rows(rows: list[dict]) -> Dataset:
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


EVAL_TOKENS = 4096  # tokens per held-out NLL batch: 64 rows at the presets' 64 tokens, 8 at 512


def eval_batch_size(max_length: int) -> int:
    """Rows per batch of the held-out NLL: ``EVAL_TOKENS // max_length`` (at most 64, at least 1). The logits of a
    batch are rows x max_length x vocabulary floats: a fixed 64 rows at 512 tokens with SmolLM2's 49,152-token
    vocabulary is 6.4 GB a copy, and SFT's evaluation alone took a worker to 10.8 GB (hh-rlhf, measured)."""
    return max(1, min(64, EVAL_TOKENS // max_length))


def train_sft(stage: str, cfg: TrainConfig, seed: int, model, tokenizer, rows: list[dict], out_dir: Path,
              tracker: Tracker, val_rows: list[dict] | None = None, patience: int = 0,
              lora: LoraConfig | None = None) -> dict[str, float]:
    """SFT (loss on the completion only) on ``rows`` of prompt/completion; saves model and tokenizer to ``out_dir``.
    With ``val_rows``: evaluates the held-out NLL after every epoch and keeps the best epoch's weights (see the
    module docstring), stopping after ``patience`` epochs without a better one (0: never early); ``selection.json``
    and the metrics ``<stage>/selected_epoch``, ``<stage>/val_nll_best``. Rows longer than ``cfg.max_length`` are
    handled by ``cfg.too_long`` and counted (:class:`roads.training.LengthRule`). With ``lora``, LoRA adapters train
    on the frozen base and the merged weights are saved (:mod:`roads.lora`)."""
    extra = ({"eval_strategy": "epoch", "per_device_eval_batch_size": eval_batch_size(cfg.max_length)}
             if val_rows else {})
    keep = KeepBest(stage, tracker, patience) if val_rows else None
    rule = LengthRule(stage, cfg, "sft", tracker)
    model = with_lora(model, lora, seed)
    with tempfile.TemporaryDirectory() as scratch:
        args = trainer_args(cfg, seed, scratch, **extra)
        args["max_length"] = rule.trl_max_length()  # the rule cuts or drops the long rows itself
        trainer = RoadsSFTTrainer(
            model=model,
            length_rule=rule,
            args=SFTConfig(**args),
            train_dataset=_rows(rows),
            eval_dataset=_rows(val_rows) if val_rows else None,
            processing_class=tokenizer,
            callbacks=[StageCallback(stage, tracker, cfg)] + ([keep] if keep else []),
        )
        if keep and (getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)):
            raise TrainingError(f"{stage}: choosing the epoch by held-out NLL keeps a copy of the weights, which "
                                "sharded training (fsdp, deepspeed) does not have; set sft.select=last")
        train(trainer)
        selected = {}
        if keep and keep.best is not None:
            model.load_state_dict(keep.weights)
            selected = {f"{stage}/selected_epoch": keep.best[0], f"{stage}/val_nll_best": keep.best[1]}
            tracker.progress(f"held-out NLL by epoch: " + ", ".join(f"{e:g}: {v:.4f}" for e, v in keep.curve)
                             + f" -> keeping epoch {keep.best[0]:g}")
    metrics = save_trained(stage, model, tokenizer, trainer, out_dir)
    if keep:
        write_json(Path(out_dir) / SELECTION_FILE, {
            "criterion": "held-out NLL per completion token (lowest wins)", "setting": "epochs",
            "candidates": [e for e, _ in keep.curve], "values": [v for _, v in keep.curve],
            "selected": keep.best[0] if keep.best else cfg.epochs, "held_out_rows": len(val_rows)})
    return {**metrics, **selected}
