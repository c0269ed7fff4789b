"""local_rm: the local verifier (the paper's local reward model) — the SFT language model itself, no value head,
trained with the Bradley–Terry loss on its summed log-probabilities r(x, y) = β·Σ_t log π(y_t | x, y<t) (over the
completion's tokens and EOS) on the training pairs (the first ``pair_fraction`` of them). This is reference-free DPO,
which TRL does not offer, so the loop is written out here: AdamW with linear decay to 0, pairs shuffled each epoch
from the seed, gradients clipped at norm 1 (the TRL stages' default).

Inputs: ``data`` (a prepare_data folder: ``pairs_train.jsonl``, ``pairs_val.jsonl``) and ``sft`` (the policy it
starts from). Output: the trained language model and tokenizer, ``trained.json``, ``verifier.json`` (kind ``local``
with its β) and ``validation.json`` (accuracy, log-likelihood and margin of the held-out pairs' labels under r).
"""

from __future__ import annotations

from pathlib import Path

import torch

from roads.artifacts import ArtifactRef, StageResult, read_jsonl, write_json
from roads.config import StageSpec
from roads.settings import LocalRmConfig
from roads.errors import DataError
from roads.generation import encode
from roads.losses import local_bt_loss
from roads.models import load_policy
from roads.training import NullTracker, Tracker, check_finite, first_fraction, write_trained, train_loop
from roads.verifiers import VERIFIER_FILE, completion_ids, preference_metrics, same_text, summed_logps

VERSION = 1
STAGE = "local_rm"


def pair_ids(tokenizer, rows: list[dict]) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Token ids of the prompts, chosen and rejected completions (+ EOS), tokenised as ``roads.verifiers`` scores."""
    prompts = encode(tokenizer, [r["prompt"] for r in rows])
    return (prompts, completion_ids(tokenizer, [r["chosen"] for r in rows]),
            completion_ids(tokenizer, [r["rejected"] for r in rows]))


def summed_logps_with_grad(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], *, pad_id: int,
                           max_length: int) -> torch.Tensor:
    """Σ_t log π(y_t | x, y<t) over each completion's tokens, shape (N,), differentiable. Each prompt + completion is
    cut to ``max_length`` tokens (the completion's end goes first); rows are padded on the right."""
    device = next(model.parameters()).device
    seqs = [(list(p) + list(c))[:max_length] for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)  # completion positions
    for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        target[i, len(p): len(s)] = True
    ids, mask, target = ids.to(device), mask.to(device), target.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (N, T, V)
    tok_logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    return (tok_logp * target[:, 1:]).sum(-1)


def train_local_rm(cfg: LocalRmConfig, seed: int, model, tokenizer, rows: list[dict],
                   tracker: Tracker = NullTracker()) -> dict[str, float]:
    """Train ``model`` in place on the pairs ``rows``; returns the final training metrics."""
    if not rows:
        raise DataError(f"{STAGE}: no training pairs")
    prompts, chosen, rejected = pair_ids(tokenizer, rows)

    def step_loss(batch: list[int]):
        logps = summed_logps_with_grad(
            model, [prompts[i] for i in batch] * 2, [chosen[i] for i in batch] + [rejected[i] for i in batch],
            pad_id=tokenizer.pad_token_id, max_length=cfg.max_length)
        chosen_logps, rejected_logps = logps[: len(batch)], logps[len(batch):]
        margin = (chosen_logps - rejected_logps).detach()
        accuracy = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
        return local_bt_loss(chosen_logps, rejected_logps, cfg.beta), {"accuracy": accuracy}

    return train_loop(STAGE, cfg, seed, model, len(rows), step_loss, tracker)


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: LocalRmConfig = spec.config()
    data = Path(inputs["data"].path)
    train_rows = first_fraction(read_jsonl(data / "pairs_train.jsonl"), cfg.pair_fraction)
    val = read_jsonl(data / "pairs_val.jsonl")
    model, tokenizer = load_policy(inputs["sft"].path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    tracker.progress(f"{len(train_rows)} training pairs, β = {cfg.beta}")
    metrics = train_local_rm(cfg, spec.seed, model, tokenizer, train_rows, tracker)
    check_finite(model, STAGE)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_trained(out_dir, len(train_rows), STAGE)
    write_json(out_dir / VERIFIER_FILE, {"kind": "local", "beta": cfg.beta})

    prompts = [r["prompt"] for r in val]
    chosen = cfg.beta * summed_logps(model, tokenizer, prompts, [r["chosen"] for r in val], cfg.val_batch_size)
    rejected = cfg.beta * summed_logps(model, tokenizer, prompts, [r["rejected"] for r in val], cfg.val_batch_size)
    identical = same_text([r["chosen"] for r in val], [r["rejected"] for r in val])
    val_metrics = {f"{STAGE}/val_{k}": v for k, v in preference_metrics(chosen, rejected, identical).items()}
    metrics.update(val_metrics)
    tracker.log_metrics(val_metrics, step=int(metrics[f"{STAGE}/steps"]))
    tracker.progress(f"held-out accuracy {val_metrics[f'{STAGE}/val_accuracy']:.3f}, "
                     f"log-likelihood {val_metrics[f'{STAGE}/val_loglik']:.4f}")
    write_json(out_dir / "validation.json", {k.removeprefix(f"{STAGE}/val_"): round(v, 6) for k, v in val_metrics.items()})
    return StageResult(metrics=metrics, files=["validation.json"])
