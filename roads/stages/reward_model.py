"""reward_model: the global verifier — the SFT model with its LM head replaced by a scalar head, trained with the
Bradley–Terry loss (TRL's RewardTrainer) on the training pairs (the first ``pair_fraction`` of them). Logs
validation accuracy and preference log-likelihood, mean log σ(r(x, y+) − r(x, y−)), on held-out pairs. Output: the
reward model and tokenizer, ``validation.json`` and ``verifier.json`` (kind ``global``; a held-out judge, ``pairs:
pairs_judge``, trains on the pairs no policy trains on and says so there: ``pairs``, ``val_pairs``). With ``lrs``, the learning
rate is chosen by a rule: one reward model per candidate, the best held-out accuracy on ``pairs_select.jsonl``
(never reported) kept, the candidates and the choice in ``selection.json``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from datasets import Dataset
from trl import RewardConfig, RewardTrainer

from roads.artifacts import ArtifactRef, StageResult, read_jsonl, write_json
from roads.errors import DataError
from roads.config import StageSpec
from roads.settings import RewardModelConfig
from roads.generation import reward_scores
from roads.models import reward_model_from_policy
from roads.lora import plain, with_lora
from roads.settings import LoraConfig
from roads.training import (LengthRule, LengthRuled, NullTracker, StageCallback, Tracker, first_fraction, save_trained,
                            train, trainer_args)
from roads.verifiers import VERIFIER_FILE, preference_metrics, same_text

VERSION = 1


def pair_metrics(model, tokenizer, rows: list[dict], batch_size: int) -> dict[str, float]:
    """The reward model's preference metrics on ``rows`` (a pair of identical texts is a tie)."""
    prompts = [r["prompt"] for r in rows]
    chosen = reward_scores(model, tokenizer, prompts, [r["chosen"] for r in rows], batch_size=batch_size)
    rejected = reward_scores(model, tokenizer, prompts, [r["rejected"] for r in rows], batch_size=batch_size)
    return preference_metrics(chosen, rejected, same_text([r["chosen"] for r in rows], [r["rejected"] for r in rows]))


class RoadsRewardTrainer(LengthRuled, RewardTrainer):
    """RewardTrainer whose pairs longer than max_length are dropped or cut, and counted, by a ``LengthRule``."""


def _train(cfg: RewardModelConfig, seed: int, sft: str, rows: list[dict], tracker: Tracker,
           lora: LoraConfig | None = None):
    model, tokenizer = reward_model_from_policy(sft, seed=seed)
    model = with_lora(model, lora, seed, task_type="SEQ_CLS")  # LoRA: adapters, and the scalar head in full
    rule = LengthRule("reward_model", cfg, "rm", tracker)
    with tempfile.TemporaryDirectory() as scratch:
        args = trainer_args(cfg, seed, scratch)
        args["max_length"] = rule.trl_max_length()  # the rule drops or cuts the long pairs itself
        trainer = RoadsRewardTrainer(
            model=model,
            length_rule=rule,
            args=RewardConfig(**args),
            train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
            processing_class=tokenizer,
            callbacks=[StageCallback("reward_model", tracker, cfg)],
        )
        train(trainer)
    return model, tokenizer, trainer


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: RewardModelConfig = spec.config()
    data = Path(inputs["data"].path)
    pairs_file = data / f"{cfg.pairs}.jsonl"
    if not pairs_file.is_file():
        raise DataError(f"reward_model.pairs: {pairs_file} does not exist; a held-out judge's pairs come from real data "
                        "with prepare_data.n_judge_pairs above 0")
    train_rows = first_fraction(read_jsonl(pairs_file), cfg.pair_fraction)
    val = read_jsonl(data / "pairs_val.jsonl")
    selection = None
    if cfg.lrs:  # the learning rate chosen by a rule: held-out accuracy on pairs_select (log-lik breaks ties)
        held = read_jsonl(data / "pairs_select.jsonl") if (data / "pairs_select.jsonl").is_file() else []
        if not held:
            raise DataError(f"reward_model.lrs: {data / 'pairs_select.jsonl'} has no pairs; set "
                            "prepare_data.n_select_pairs above 0, or leave reward_model.lrs empty")
        candidates, best = [], None
        for lr in cfg.lrs:
            model, tokenizer, trainer = _train(cfg.model_copy(update={"lr": lr}), spec.seed, inputs["sft"].path,
                                               train_rows, NullTracker(), spec.lora)
            m = pair_metrics(model, tokenizer, held, cfg.val_batch_size)
            candidates.append({"lr": lr, "select_accuracy": round(m["accuracy"], 6), "select_loglik": round(m["loglik"], 6)})
            tracker.progress(f"lr {lr:g}: accuracy {m['accuracy']:.3f}, log-likelihood {m['loglik']:.4f} on "
                             f"{len(held)} selection pairs")
            key = (m["accuracy"], m["loglik"])
            if best is None or key > best[0]:
                best = (key, lr, model, tokenizer, trainer)
        _, lr, model, tokenizer, trainer = best
        selection = {"criterion": "held-out preference accuracy on pairs_select (highest wins; log-likelihood breaks "
                                  "ties)", "setting": "lr", "candidates": candidates, "selected": lr,
                     "selection_pairs": len(held)}
        tracker.progress(f"keeping lr {lr:g}")
    else:
        model, tokenizer, trainer = _train(cfg, spec.seed, inputs["sft"].path, train_rows, tracker, spec.lora)
    metrics = save_trained("reward_model", model, tokenizer, trainer, out_dir)
    model = plain(model)  # LoRA: the merged weights that were saved
    files = ["validation.json"]
    if selection:
        write_json(out_dir / "selection.json", selection)
        metrics["reward_model/selected_lr"] = float(selection["selected"])
        files.append("selection.json")
    val_metrics = pair_metrics(model, tokenizer, val, cfg.val_batch_size)
    metrics.update({f"reward_model/val_{k}": v for k, v in val_metrics.items()})
    tracker.log_metrics({f"reward_model/val_{k}": v for k, v in val_metrics.items()}, step=trainer.state.global_step)
    tracker.progress(f"held-out accuracy {val_metrics['accuracy']:.3f}, log-likelihood {val_metrics['loglik']:.4f}")
    write_json(out_dir / "validation.json", {k: round(v, 6) for k, v in val_metrics.items()})
    held_out = {} if cfg.pairs == "pairs_train" else {"pairs": cfg.pairs, "val_pairs": len(val)}
    write_json(out_dir / VERIFIER_FILE, {"kind": "global", **held_out})  # a judge says what it trained on
    return StageResult(metrics=metrics, files=files)
