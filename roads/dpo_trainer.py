"""DPO with TRL's DPOTrainer against a reference *loaded from disk* (an in-memory model would be the wrong
reference), its log-probs shared through ``roads/reference.py``; shared by ``offline_dpo``, ``online_dpo`` and
``genrm`` (STaR-DPO). A DPO policy is a verifier too: its implicit reward β·log π/π_ref (``verifier.json``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from datasets import Dataset
from trl import DPOConfig

from roads.artifacts import write_json
from roads.lora import plain, with_lora
from roads.settings import LoraConfig, TrainConfig
from roads.models import load_policy
from roads.reference import SharedReferenceDPOTrainer
from roads.training import LengthRule, StageCallback, Tracker, save_trained, train, trainer_args
from roads.verifiers import VERIFIER_FILE, summed_logps


def trl_loss(loss_type: str, rpo_alpha: float = 1.0) -> dict:
    """TRL DPOConfig's loss arguments for a roads ``loss_type``."""
    if loss_type == "rpo":
        return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, rpo_alpha]}
    return {"loss_type": [loss_type]}


def train_dpo(stage: str, cfg: TrainConfig, seed: int, start_policy: str, pairs: list[dict], out_dir: Path,
              tracker: Tracker, *, beta: float, loss_type: str, precompute_ref: bool,
              reference: str | None = None, rpo_alpha: float = 1.0,
              lora: LoraConfig | None = None) -> dict[str, float]:
    """DPO (β ``beta``, TRL's ``loss_type``, or ``rpo``: TRL's ['sigmoid', 'sft'] with weights [1, ``rpo_alpha``];
    ``precompute_ref``: the reference's log-probs once, before training)
    from the policy saved at ``start_policy`` against the reference saved at ``reference`` (default: the start
    policy); both are loaded from disk. Saves the result, its ``verifier.json`` (kind ``implicit``) and
    ``displacement.json`` (the mean change, start → trained, of the log-likelihood of the first 256 training pairs'
    chosen and rejected responses, and the fraction of chosen ones made more likely) to ``out_dir``. Pairs longer
    than ``cfg.max_length`` are handled by ``cfg.too_long`` and counted (:class:`roads.training.LengthRule`).

    With ``lora``: adapters on the frozen start policy. When the reference is the start policy, no second copy is
    loaded: TRL computes the reference with a frozen copy of the fresh adapter (B = 0, so exactly the start policy;
    see :mod:`roads.lora`); otherwise the reference is loaded from its folder as without LoRA."""
    model, tokenizer = load_policy(start_policy)
    same = reference is None or Path(reference).resolve() == Path(start_policy).resolve()
    ref_model = None if lora is not None and same else load_policy(reference or start_policy)[0]
    model = with_lora(model, lora, seed)
    rule = LengthRule(stage, cfg, "dpo", tracker)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = SharedReferenceDPOTrainer(
            model=model,
            ref_model=ref_model,
            length_rule=rule,
            args=DPOConfig(**trainer_args(cfg, seed, scratch, beta=beta, **trl_loss(loss_type, rpo_alpha),
                                          precompute_ref_log_probs=precompute_ref)),
            train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs]),
            processing_class=tokenizer,
            callbacks=[StageCallback(stage, tracker, cfg)],
        )
        if precompute_ref:
            tracker.log_metrics({f"{stage}/ref_logps_shared": float(trainer.ref_logps_shared)})
        probe = pairs[:DISPLACEMENT_PAIRS]
        before = _pair_logps(model, tokenizer, probe)
        train(trainer)
    metrics = save_trained(stage, model, tokenizer, trainer, out_dir)
    model = plain(model)  # LoRA: the merged weights that were saved
    after = _pair_logps(model, tokenizer, probe)
    displacement = {f"{side}_logp_change": round(float((after[side] - before[side]).mean()), 6) for side in after}
    displacement["chosen_more_likely"] = round(float((after["chosen"] > before["chosen"]).double().mean()), 6)
    write_json(Path(out_dir) / DISPLACEMENT_FILE, {**displacement, "pairs": len(probe)})
    metrics.update({f"{stage}/{k}": v for k, v in displacement.items()})
    write_json(Path(out_dir) / VERIFIER_FILE, {"kind": "implicit", "beta": beta})  # β·log π/π_ref is a verifier
    return metrics


DISPLACEMENT_FILE = "displacement.json"  # the mean change of its training pairs' log-likelihoods (displacement)
DISPLACEMENT_PAIRS = 256


def _pair_logps(model, tokenizer, pairs: list[dict]) -> dict:
    """log π(y|x) of each pair's chosen and rejected response (EOS included), for the displacement record."""
    prompts = [r["prompt"] for r in pairs]
    return {side: summed_logps(model, tokenizer, prompts, [r[side] for r in pairs]).to(torch.float64)
            for side in ("chosen", "rejected")}
