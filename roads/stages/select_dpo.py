"""select_dpo: the DPO settings both roads share (β, loss, learning rate), chosen by a pre-registered rule that never
reads the gold reward.

Each candidate of the grid ``betas × losses × lrs`` is trained as offline DPO on the training pairs from the SFT
policy (the optimiser's other settings — epochs, batch size, ``rpo_alpha``, … — are offline_dpo's). Each is then
measured on data no report uses, the held-out ``pairs_select.jsonl`` of the data folder:

- the **criterion**: the held-out preference accuracy of its implicit reward β·log π/π_SFT (how well the policy's
  own reward ranks preferences it did not train on; ties half), its log-likelihood breaking ties. Accuracy, not
  log-likelihood: the log-likelihood of σ(β·Δ log-ratio) measures the reward's scale as much as its ranking (measured
  on shuffle: every candidate within 0.01 nats of chance, log ½, while accuracies differed by 0.08);
- the **guards**, the same for both roads: the held-out chosen responses' mean log-likelihood must not fall by more
  than ``max_chosen_logp_fall`` nats (likelihood displacement), and the KL to SFT on the selection prompts
  (``kl_samples`` samples each) must stay under ``max_kl`` nats (over-optimisation).

The candidate with the highest criterion among those that pass both guards wins (the first in grid order on a tie);
if none passes, the one with the smallest guard violation does, and the choice says so. ``offline_dpo`` and
``online_dpo`` with ``select: <this entry>`` take the chosen β, loss and lr. Why guards: the criterion alone prefers
a collapsing lr (measured: it picked lr 5e-4 on every seed, whose policies lose gold reward).

Output: ``select.json`` {task, seed} and ``dpo_selection.json`` {criterion, guards, candidates: [{beta, loss_type, lr, val_loglik, val_accuracy,
chosen_logp_change, kl, passed}], selected: {beta, loss_type, lr}, passed}.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from statistics import fmean

import torch

from roads.artifacts import ArtifactRef, StageResult, read_jsonl, write_json
from roads.config import StageSpec
from roads.data import task_of
from roads.dpo_trainer import train_dpo
from roads.selection import CHOSEN, SELECTION_FILE
from roads.errors import DataError
from roads.generation import encode, sample, sequence_logps
from roads.models import load_policy
from roads.settings import SelectDpoConfig
from roads.training import NullTracker, Tracker, first_fraction
from roads.verifiers import preference_metrics, same_text, summed_logps

VERSION = 1


def choose(candidates: list[dict], max_chosen_logp_fall: float, max_kl: float) -> tuple[int, bool]:
    """(index of the winner, whether it passed the guards): the highest ``val_accuracy`` (then ``val_loglik``) among
    the candidates whose ``chosen_logp_change`` ≥ −max_chosen_logp_fall and ``kl`` ≤ max_kl (the first on a tie);
    if none passes, the smallest total violation."""
    if not candidates:
        raise ValueError("no candidates")

    def violation(c: dict) -> float:
        return max(0.0, -max_chosen_logp_fall - c["chosen_logp_change"]) + max(0.0, c["kl"] - max_kl)

    passing = [i for i, c in enumerate(candidates) if violation(c) == 0]
    if passing:
        return max(passing, key=lambda i: (candidates[i]["val_accuracy"], candidates[i]["val_loglik"], -i)), True
    return min(range(len(candidates)), key=lambda i: (violation(candidates[i]), i)), False


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: SelectDpoConfig = spec.config()
    data = Path(inputs["data"].path)
    sft_path = inputs["sft"].path
    pairs = first_fraction(read_jsonl(data / "pairs_train.jsonl"), cfg.pair_fraction)
    held = read_jsonl(data / "pairs_select.jsonl") if (data / "pairs_select.jsonl").is_file() else []
    if not held:
        raise DataError(f"select_dpo: {data / 'pairs_select.jsonl'} has no pairs; set prepare_data.n_select_pairs "
                        "above 0")
    prompts = [r["prompt"] for r in held]
    sft, tokenizer = load_policy(sft_path)
    sides = {side: [r[side] for r in held] for side in ("chosen", "rejected")}
    identical = same_text(sides["chosen"], sides["rejected"])  # the same text twice: a tie, whatever the float noise
    sft_logps = {side: summed_logps(sft, tokenizer, prompts, ys).to(torch.float64) for side, ys in sides.items()}
    kl_prompts = list(dict.fromkeys(prompts))[: cfg.kl_prompts]
    candidates: list[dict] = []
    grid = list(itertools.product(cfg.betas, cfg.losses, cfg.lrs))
    for n, (beta, loss, lr) in enumerate(grid, start=1):
        tracker.progress(f"candidate {n}/{len(grid)}: beta {beta:g}, loss {loss}, lr {lr:g}")
        with tempfile.TemporaryDirectory() as scratch:
            train_cfg = cfg.model_copy(update={"lr": lr})
            train_dpo("select_dpo", train_cfg, spec.seed, sft_path, pairs, Path(scratch), NullTracker(), beta=beta,
                      loss_type=loss, rpo_alpha=cfg.rpo_alpha, precompute_ref=cfg.precompute_ref, lora=spec.lora)
            policy, _ = load_policy(scratch)
            logps = {side: summed_logps(policy, tokenizer, prompts, ys).to(torch.float64) for side, ys in sides.items()}
            # its implicit reward β·(log π − log π_SFT), as roads.verifiers scores a DPO policy (SFT scored once)
            metrics = preference_metrics(beta * (logps["chosen"] - sft_logps["chosen"]),
                                         beta * (logps["rejected"] - sft_logps["rejected"]), identical)
            change = float((logps["chosen"] - sft_logps["chosen"]).mean())
            groups = sample(policy, tokenizer, kl_prompts, n=cfg.kl_samples, max_new_tokens=cfg.max_new_tokens,
                            temperature=1.0, seed=spec.seed)
            flat_prompts = [p for p, g in zip(kl_prompts, groups) for _ in g]
            ids = [list(c.ids) for g in groups for c in g]
            p_ids = encode(tokenizer, flat_prompts)
            kl = fmean((sequence_logps(policy, p_ids, ids, pad_id=tokenizer.pad_token_id)
                        - sequence_logps(sft, p_ids, ids, pad_id=tokenizer.pad_token_id)).tolist())
            del policy
        row = {"beta": beta, "loss_type": loss, "lr": lr, "val_loglik": round(metrics["loglik"], 6),
               "val_accuracy": round(metrics["accuracy"], 6), "chosen_logp_change": round(change, 6),
               "kl": round(kl, 6)}
        row["passed"] = change >= -cfg.max_chosen_logp_fall and kl <= cfg.max_kl
        candidates.append(row)
        tracker.log_metrics({"select_dpo/val_loglik": row["val_loglik"], "select_dpo/chosen_logp_change": change,
                             "select_dpo/kl": kl}, step=n)
        tracker.progress(f"  held-out log-lik {row['val_loglik']:.4f}, chosen log-lik change {change:+.3f}, "
                         f"KL {kl:.3f} -> {'passes' if row['passed'] else 'fails'} the guards")
    best, passed = choose(candidates, cfg.max_chosen_logp_fall, cfg.max_kl)
    selected = {k: candidates[best][k] for k in CHOSEN}
    write_json(out_dir / "select.json", {"task": task_of(data)[0], "seed": spec.seed})
    write_json(out_dir / SELECTION_FILE, {
        "criterion": "held-out preference accuracy of the implicit reward on pairs_select (highest wins; "
                     "log-likelihood breaks ties)",
        "guards": {"max_chosen_logp_fall": cfg.max_chosen_logp_fall, "max_kl": cfg.max_kl},
        "candidates": candidates, "selected": selected, "passed": passed, "selection_pairs": len(held)})
    tracker.progress(f"selected beta {selected['beta']:g}, loss {selected['loss_type']}, lr {selected['lr']:g}"
                     + ("" if passed else " (no candidate passed the guards: the least violation)"))
    return StageResult(metrics={"select_dpo/selected_beta": float(selected["beta"]),
                                "select_dpo/selected_lr": float(selected["lr"]),
                                "select_dpo/selected_index": float(best), "select_dpo/passed": float(passed)},
                       files=[SELECTION_FILE, "select.json"])
