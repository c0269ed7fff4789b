"""evaluate: score one policy on the held-out prompts.

Samples ``samples_per_prompt`` completions per prompt from the policy and from the SFT reference with the same seed
(common random numbers: the SFT policy's samples are exactly the reference samples). Metrics, where the task has a gold
reward: ``gold_reward_mean``; ``win_rate`` against the SFT sample of the same prompt and index, judged by the gold
reward, ties counted half; always: ``kl_to_reference`` (Monte-Carlo estimate of KL(π‖π_ref) = E_y~π[log π(y|x) −
log π_ref(y|x)]), ``length_mean`` (tokens, EOS excluded), ``finished_rate``, and the gold-free displacement
check ``val_chosen_logp_change`` / ``val_rejected_logp_change``: the mean change, policy − reference, of the
log-likelihood of the held-out pairs' chosen (rejected) responses, EOS included; for a DPO policy also
``train_chosen_logp_change`` / ``train_rejected_logp_change`` / ``train_chosen_more_likely``, the same on its own
training pairs (its ``displacement.json``: for online DPO, the pairs it sampled). Output: ``metrics.json`` and
``samples.jsonl`` (one row per sample: the data for intervals over prompts and seeds). ``metrics.json`` also names
the stage that trained the policy and on how many examples (from its ``trained.json``), for learning curves, and
the policy's ``selection`` (its ``selection.json``: how its epochs were chosen) where it has one.

With ``judge`` (a verifier entry; for real data a ``reward_model`` trained on ``pairs_judge``, pairs no policy trained
on): ``proxy_win_rate``, the win rate against the SFT sample of the same prompt and index judged by the judge's score,
ties half — a proxy for the gold win rate, as good as the judge — each sample's ``judge_margin``, and in
``metrics.json`` the judge's name, the split and number of pairs it trained on, and its held-out accuracy and
log-likelihood on ``pairs_val`` (``judge_val_accuracy``, ``judge_val_loglik``, ``judge_val_pairs``).
"""

from __future__ import annotations

from pathlib import Path
from statistics import fmean

import torch

from roads.artifacts import ArtifactRef, StageResult, read_json, read_jsonl, write_json, write_jsonl
from roads.config import StageSpec
from roads.settings import EvaluateConfig
from roads.data import gold_of, task_of
from roads.generation import encode, sample, sequence_logps
from roads.models import load_policy
from roads.training import NullTracker, Tracker
from roads.verifiers import VERIFIER_FILE, load_verifier, preference_metrics, same_text, summed_logps, tie_identical

VERSION = 1


def win_rate(policy: list[float], reference: list[float]) -> float:
    """Fraction of paired samples where the policy's gold reward beats the reference's; ties count half."""
    return fmean(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(policy, reference, strict=True))


def judge_samples(name: str, inputs: dict[str, ArtifactRef], rows: list[dict], val: list[dict], batch_size: int,
                  tracker: Tracker) -> dict:
    """Judge every sample against the SFT sample of the same prompt and index with the verifier ``name`` (the input
    ``judge``): each row gets ``judge_margin`` (its log-odds that the policy's sample is better: score difference for a
    scalar verifier, ``compare`` for a generative one). Returns ``proxy_win_rate`` (margin > 0 wins, ties half) and
    what the proxy rests on: the judge's name, the split it trained on and how many pairs, and its held-out accuracy
    on ``pairs_val`` (pairs no policy and no judge trained on)."""
    judge_dir = Path(inputs["judge"].path)
    judge = load_verifier(name, judge_dir, reference=inputs["reference"].path, batch_size=batch_size)
    prompts = [r["prompt"] for r in rows]
    mine, theirs = [r["completion"] for r in rows], [r["reference_completion"] for r in rows]
    if judge.compare is not None:
        margins = judge.compare(prompts, mine, theirs)
    else:
        margins = judge.score(prompts, mine) - judge.score(prompts, theirs)
    margins = tie_identical(margins, same_text(mine, theirs))  # the same sample twice is a tie, exactly
    for row, margin in zip(rows, margins.tolist(), strict=True):
        row["judge_margin"] = round(float(margin), 6)
    # the SFT policy against itself: the same samples, every comparison a tie
    proxy = win_rate([r["judge_margin"] for r in rows], [0.0] * len(rows))
    info = read_json(judge_dir / VERIFIER_FILE)
    out = {"proxy_win_rate": proxy, "judge": name, "judge_kind": judge.kind,
           "judge_trained_on": info.get("pairs", "pairs_train"), "judge_train_pairs": judge.train_examples}
    if val:
        if judge.compare is not None:
            margin = judge.compare([r["prompt"] for r in val], [r["chosen"] for r in val], [r["rejected"] for r in val])
            chosen, rejected = margin, torch.zeros_like(margin)
        else:
            chosen = judge.score([r["prompt"] for r in val], [r["chosen"] for r in val])
            rejected = judge.score([r["prompt"] for r in val], [r["rejected"] for r in val])
        held = preference_metrics(chosen, rejected, same_text([r["chosen"] for r in val], [r["rejected"] for r in val]))
        out.update(judge_val_accuracy=round(held["accuracy"], 6), judge_val_loglik=round(held["loglik"], 6),
                   judge_val_pairs=len(val))
    tracker.progress(f"proxy win rate {proxy:.3f} (judge {name}, trained on {out['judge_train_pairs']} "
                     f"{out['judge_trained_on']} pairs, held-out accuracy {out.get('judge_val_accuracy', float('nan')):.3f})")
    return out


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: EvaluateConfig = spec.config()
    data = Path(inputs["data"].path)
    task_name, gold = gold_of(data)
    prompts = [r["prompt"] for r in read_jsonl(data / "eval_prompts.jsonl")]
    policy, tokenizer = load_policy(inputs["policy"].path)
    same_model = Path(inputs["policy"].path) == Path(inputs["reference"].path)
    reference = policy if same_model else load_policy(inputs["reference"].path)[0]
    kw = dict(n=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
              seed=spec.seed, batch_size=cfg.batch_size)
    tracker.progress(f"sampling {len(prompts)} x {cfg.samples_per_prompt} from {spec.policy}")
    arm_samples = sample(policy, tokenizer, prompts, **kw)
    ref_samples = arm_samples if same_model else sample(reference, tokenizer, prompts, **kw)

    flat_prompts = [p for p, group in zip(prompts, arm_samples) for _ in group]
    flat = [c for group in arm_samples for c in group]
    flat_ref = [c for group in ref_samples for c in group]
    prompt_ids = encode(tokenizer, flat_prompts)
    ids = [list(c.ids) for c in flat]
    logp = sequence_logps(policy, prompt_ids, ids, pad_id=tokenizer.pad_token_id, batch_size=cfg.batch_size)
    ref_logp = logp if same_model else sequence_logps(reference, prompt_ids, ids, pad_id=tokenizer.pad_token_id,
                                                      batch_size=cfg.batch_size)
    rows = []
    for i, (p, c, r) in enumerate(zip(flat_prompts, flat, flat_ref)):
        row = {
            "prompt_index": i // cfg.samples_per_prompt,
            "sample_index": i % cfg.samples_per_prompt,
            "prompt": p,
            "completion": c.text,
            "length": len(c.ids) - int(c.finished),
            "finished": c.finished,
            "logp": round(float(logp[i]), 6),
            "ref_logp": round(float(ref_logp[i]), 6),
            "reference_completion": r.text,
        }
        if gold is not None:
            row["gold_reward"] = gold(p, c.text)
            row["reference_gold_reward"] = gold(p, r.text)
        rows.append(row)

    metrics = {
        "kl_to_reference": fmean(r["logp"] - r["ref_logp"] for r in rows),
        "length_mean": fmean(r["length"] for r in rows),
        "finished_rate": fmean(float(r["finished"]) for r in rows),
    }
    if gold is not None:
        metrics["gold_reward_mean"] = fmean(r["gold_reward"] for r in rows)
        metrics["win_rate"] = win_rate([r["gold_reward"] for r in rows], [r["reference_gold_reward"] for r in rows])
        metrics["exact_rate"] = fmean(float(r["gold_reward"] == 1.0) for r in rows)
    val = read_jsonl(data / "pairs_val.jsonl") if (data / "pairs_val.jsonl").is_file() else []
    judged = {}
    if "judge" in inputs:  # the proxy where there is no gold reward: a held-out verifier judges policy vs SFT
        judged = judge_samples(spec.params["judge"], inputs, rows, val, cfg.batch_size, tracker)
        metrics["proxy_win_rate"] = judged.pop("proxy_win_rate")
    if val:  # the gold-free displacement check: does training make the held-out chosen responses less likely?
        val_prompts = [r["prompt"] for r in val]
        for side in ("chosen", "rejected"):
            responses = [r[side] for r in val]
            metrics[f"val_{side}_logp_change"] = 0.0 if same_model else fmean(
                (summed_logps(policy, tokenizer, val_prompts, responses)
                 - summed_logps(reference, tokenizer, val_prompts, responses)).tolist())
    metrics = {k: round(v, 6) for k, v in metrics.items()}
    folder = Path(inputs["policy"].path)
    trained = read_json(folder / "trained.json") if (folder / "trained.json").is_file() else {}
    selection = read_json(folder / "selection.json") if (folder / "selection.json").is_file() else None
    if (folder / "displacement.json").is_file():  # a DPO policy: how training moved its own pairs' likelihoods
        moved = read_json(folder / "displacement.json")
        metrics.update({f"train_{k}": moved[k] for k in ("chosen_logp_change", "rejected_logp_change",
                                                         "chosen_more_likely") if k in moved})
    write_json(out_dir / "metrics.json", {"policy": spec.policy, "task": task_name, "family": task_of(data)[1].family,
                                          "seed": spec.seed,
                                          "policy_stage": trained.get("stage"),
                                          "train_examples": trained.get("train_examples"), **metrics, **judged,
                                          **({"selection": selection} if selection else {})})
    write_jsonl(out_dir / "samples.jsonl", rows)
    tracker.progress(", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    numbers = {**metrics, **{k: float(v) for k, v in judged.items() if k.startswith("judge_val_")}}
    return StageResult(metrics={f"evaluate/{k}": v for k, v in numbers.items()}, files=["metrics.json", "samples.jsonl"])
