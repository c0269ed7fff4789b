"""genrm: the generative verifier (Mahan et al., "Generative Reward Models") — the language model itself reads a
judge prompt holding the prompt and two responses and writes a verdict token saying which response is better. The
judge format (verdicts "A"/"B" after "\\nbetter:", rationales after "\\nwhy:") and its scoring, :func:`compare`
(exactly antisymmetric log-odds that a ≻ b, with votes and rationales), live in ``roads/judge.py``.

Methods (``genrm.method``):

``genrm``     SFT (loss on the verdict only) from the ``sft`` input on every training pair in *both* orders (chosen
              as A → "A", chosen as B → "B"), so no position is favoured by the data.
``star_sft``  STaR: the pairs are split into ``star_iterations`` equal parts (as in the paper); in round i the
              current model samples ``star_samples`` judgements (rationale + verdict, at most ``rationale_tokens``
              + a few tokens) per pair and order of part i; those whose verdict (the one after the last
              "\\nbetter:") matches the label are kept (a judgement without a verdict is wrong) and the model is
              trained on them by SFT (loss on rationale and verdict). A round that keeps nothing falls back to the
              plain labels ("\\nbetter:" + verdict, an empty rationale) and says so (``genrm/star_fallback_rounds``).
``star_dpo``  the same sampling, then DPO (β = ``genrm.beta``, the start model as the reference) on one (correct,
              wrong) pair of judgements per judge prompt that has both; a round without any such pair falls back to
              (plain correct label, plain wrong label).

Inputs: ``data`` (``pairs_train.jsonl``, ``pairs_val.jsonl``) and ``sft`` (the start model). Output: the model and
tokenizer, ``trained.json`` (train_examples = the number of preference pairs), ``verifier.json`` (kind
``generative`` with votes, rationale, rationale_tokens, temperature), ``validation.json`` (accuracy, log-likelihood
log σ(compare(x, y+, y−)) and margin on the held-out pairs) and, for the STaR methods, ``star.json`` (one entry per
round: judge prompts, samples, with_verdict, correct, kept, fallback).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from roads.artifacts import ArtifactRef, StageResult, read_jsonl, write_json
from roads.config import StageSpec
from roads.settings import GenRmConfig
from roads.dpo_trainer import train_dpo
from roads.errors import DataError, TrainingError
from roads.generation import encode, sample
from roads.judge import ANSWER, VERDICTS, compare, judge_prompt, judgement_tokens, split_judgement, verdict_ids
from roads.models import load_policy
from roads.sft_trainer import train_sft
from roads.training import NullTracker, Tracker, write_trained
from roads.verifiers import VERIFIER_FILE, preference_metrics, same_text

VERSION = 1
STAGE = "genrm"


# --------------------------------------------------------------------------- the judge's training data


def load_judge(path: str | Path):
    """The model at ``path`` as a judge. A GenRM is a verifier, not a policy: the response vocabulary its start policy
    may be restricted to (``generation_config.suppress_tokens``, :func:`roads.models.restrict_vocab`) must not hold
    for its judgements, or it could never write a rationale or a verdict token (on the calibrated testbed STaR
    sampled no verdict in 8,000 tries for that reason)."""
    model, tokenizer = load_policy(path)
    model.generation_config.suppress_tokens = None
    return model, tokenizer


def unrestrict_saved(folder: Path) -> None:
    """Drop the response-vocabulary restriction a saved judge inherited (STaR-DPO trains from the start policy's
    folder), so that whoever loads it — ``measure_gap``, ``online_dpo`` — samples its rationales unrestricted."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(folder))
    except OSError:  # no generation_config.json: nothing restricted
        return
    if config.suppress_tokens:
        config.suppress_tokens = None
        config.save_pretrained(str(folder))


def both_orders(pairs: list[dict], rationale: bool) -> tuple[list[str], list[str]]:
    """Judge prompts and their correct verdicts: each pair with the chosen response as A ("A"), then as B ("B")."""
    prompts, labels = [], []
    for pair in pairs:
        prompts += [judge_prompt(pair["prompt"], pair["chosen"], pair["rejected"], rationale),
                    judge_prompt(pair["prompt"], pair["rejected"], pair["chosen"], rationale)]
        labels += list(VERDICTS)
    return prompts, labels


def label_rows(pairs: list[dict], rationale: bool = False) -> list[dict]:
    """SFT rows on the plain labels: the verdict (after the answer cue and an empty rationale, for a rationale
    model), both orders of every pair."""
    prompts, labels = both_orders(pairs, rationale)
    return [{"prompt": p, "completion": (ANSWER if rationale else "") + v} for p, v in zip(prompts, labels)]


def other(verdict: str) -> str:
    return VERDICTS[1 - VERDICTS.index(verdict)]


# --------------------------------------------------------------------------- training


def fitted(cfg, tokenizer, texts: list[str], tracker: Tracker):
    """``cfg`` with ``max_length`` raised to the longest training sequence (text + EOS): a judge sequence holds two
    responses, and the trainers would cut its end — the verdict — or drop it."""
    longest = max(len(ids) for ids in encode(tokenizer, texts)) + 1
    if longest <= cfg.max_length:
        return cfg
    tracker.progress(f"judge sequences reach {longest} tokens: training with max_length {longest} "
                     f"(genrm.max_length is {cfg.max_length})")
    return cfg.model_copy(update={"max_length": longest})


def star_round(model, tokenizer, cfg: GenRmConfig, pairs: list[dict], seed: int) -> tuple[list[dict], list[dict], dict]:
    """Sample judgements of ``pairs`` (both orders) and sort them by their verdicts: (SFT rows of the correct ones,
    deduplicated per judge prompt; DPO pairs (first correct, first wrong — a wrong verdict before no verdict) per
    judge prompt that has both; counts)."""
    judges, labels = both_orders(pairs, rationale=True)
    groups = sample(model, tokenizer, judges, n=cfg.star_samples,
                    max_new_tokens=judgement_tokens(tokenizer, cfg.rationale_tokens), temperature=cfg.temperature,
                    seed=seed, batch_size=cfg.val_batch_size)
    sft_rows, dpo_pairs = [], []
    with_verdict = correct_count = 0
    for judge, label, group in zip(judges, labels, groups, strict=True):
        correct, wrong, unfinished = [], [], []
        for completion in group:
            rationale, verdict = split_judgement(completion.text)
            if verdict is None:
                unfinished.append(completion.text)
                continue
            with_verdict += 1
            (correct if verdict == label else wrong).append(rationale + ANSWER + verdict)
        correct_count += len(correct)
        sft_rows += [{"prompt": judge, "completion": c} for c in dict.fromkeys(correct)]
        if correct and (wrong or unfinished):
            dpo_pairs.append({"prompt": judge, "chosen": correct[0], "rejected": (wrong or unfinished)[0]})
    samples = len(judges) * cfg.star_samples
    counts = {"judge_prompts": len(judges), "samples": samples, "with_verdict": with_verdict,
              "correct": correct_count}
    return sft_rows, dpo_pairs, counts


def plain_label_pairs(pairs: list[dict]) -> list[dict]:
    """DPO pairs on the plain labels (empty rationales): the correct verdict against the wrong one."""
    prompts, labels = both_orders(pairs, rationale=True)
    return [{"prompt": p, "chosen": ANSWER + v, "rejected": ANSWER + other(v)} for p, v in zip(prompts, labels)]


def split_parts(rows: list, parts: int) -> list[list]:
    """``rows`` in ``parts`` consecutive parts of (nearly) equal size; empty parts are left out."""
    bounds = [round(i * len(rows) / parts) for i in range(parts + 1)]
    return [rows[bounds[i]:bounds[i + 1]] for i in range(parts) if bounds[i + 1] > bounds[i]]


def train_star(cfg: GenRmConfig, seed: int, start: str, pairs: list[dict], out_dir: Path,
               tracker: Tracker) -> tuple[dict[str, float], list[dict]]:
    """STaR-SFT or STaR-DPO rounds from the policy at ``start``; the last round's model is saved to ``out_dir``."""
    parts = split_parts(pairs, cfg.star_iterations)
    policy = start
    metrics: dict[str, float] = {}
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, part in enumerate(parts):
            model, tokenizer = load_judge(policy)
            verdict_ids(tokenizer)
            if torch.cuda.is_available():
                model = model.to("cuda")
            tracker.progress(f"round {index + 1}/{len(parts)}: sampling {2 * len(part)} judge prompts x "
                             f"{cfg.star_samples}")
            sft_rows, dpo_pairs, counts = star_round(model, tokenizer, cfg, part, seed * 1000 + index)
            kept = len(sft_rows) if cfg.method == "star_sft" else len(dpo_pairs)
            fallback = kept == 0
            if fallback:
                what = "judgement was correct" if cfg.method == "star_sft" else "prompt had a correct and a wrong judgement"
                tracker.progress(f"round {index + 1}: no sampled {what}; training on the plain labels instead")
                sft_rows, dpo_pairs = label_rows(part, rationale=True), plain_label_pairs(part)
            counts.update(round=index, kept=kept, fallback=fallback)
            rounds.append(counts)
            tracker.progress(f"round {index + 1}: {counts['correct']}/{counts['samples']} sampled verdicts correct, "
                             f"{counts['with_verdict']} with a verdict, {kept} kept")
            tracker.log_metrics({f"{STAGE}/star_correct": counts["correct"] / counts["samples"],
                                 f"{STAGE}/star_with_verdict": counts["with_verdict"] / counts["samples"],
                                 f"{STAGE}/star_kept": float(kept), f"{STAGE}/star_fallback": float(fallback)},
                                step=index)
            round_dir = out_dir if index == len(parts) - 1 else Path(scratch) / f"round{index}"
            if cfg.method == "star_sft":
                train_cfg = fitted(cfg, tokenizer, [r["prompt"] + r["completion"] for r in sft_rows], tracker)
                metrics.update(train_sft(STAGE, train_cfg, seed, model, tokenizer, sft_rows, round_dir, tracker))
            else:
                del model
                train_cfg = fitted(cfg, tokenizer, [r["prompt"] + c for r in dpo_pairs
                                                    for c in (r["chosen"], r["rejected"])], tracker)
                # the sigmoid loss, the reference's log-probs computed once before training (offline_dpo's defaults)
                metrics.update(train_dpo(STAGE, train_cfg, seed, policy, dpo_pairs, round_dir, tracker,
                                         beta=cfg.beta, loss_type="sigmoid", precompute_ref=True, reference=start))
            policy = str(round_dir)
    total = sum(r["samples"] for r in rounds)
    metrics.update({
        f"{STAGE}/star_correct": sum(r["correct"] for r in rounds) / total,
        f"{STAGE}/star_with_verdict": sum(r["with_verdict"] for r in rounds) / total,
        f"{STAGE}/star_kept": float(sum(r["kept"] for r in rounds)),
        f"{STAGE}/star_fallback_rounds": float(sum(r["fallback"] for r in rounds)),
    })
    return metrics, rounds


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: GenRmConfig = spec.config()
    data = Path(inputs["data"].path)
    pairs = read_jsonl(data / "pairs_train.jsonl")
    val = read_jsonl(data / "pairs_val.jsonl")
    if not pairs:
        raise DataError(f"{STAGE}: no training pairs in {data}")
    start = inputs["sft"].path
    rationale = cfg.method != "genrm"
    files = ["validation.json"]
    tracker.progress(f"{cfg.method}: {len(pairs)} training pairs, judged in both orders")
    if cfg.method == "genrm":
        model, tokenizer = load_judge(start)
        verdict_ids(tokenizer)
        rows = label_rows(pairs)
        train_cfg = fitted(cfg, tokenizer, [r["prompt"] + r["completion"] for r in rows], tracker)
        metrics = train_sft(STAGE, train_cfg, spec.seed, model, tokenizer, rows, out_dir, tracker)
    else:
        metrics, rounds = train_star(cfg, spec.seed, start, pairs, out_dir, tracker)
        write_json(out_dir / "star.json", rounds)
        files.append("star.json")
    unrestrict_saved(out_dir)
    write_trained(out_dir, len(pairs), STAGE)  # preference pairs, as the other verifiers count them
    write_json(out_dir / VERIFIER_FILE, {"kind": "generative", "votes": cfg.votes, "rationale": rationale,
                                         "rationale_tokens": cfg.rationale_tokens, "temperature": cfg.temperature})

    model, tokenizer = load_judge(out_dir)
    if torch.cuda.is_available():
        model = model.to("cuda")
    margin = compare(model, tokenizer, [r["prompt"] for r in val], [r["chosen"] for r in val],
                     [r["rejected"] for r in val], rationale=rationale, votes=cfg.votes,
                     rationale_tokens=cfg.rationale_tokens, temperature=cfg.temperature,
                     batch_size=cfg.val_batch_size)
    identical = same_text([r["chosen"] for r in val], [r["rejected"] for r in val])
    val_metrics = {f"{STAGE}/val_{k}": v
                   for k, v in preference_metrics(margin, torch.zeros_like(margin), identical).items()}
    for key, value in val_metrics.items():
        if not math.isfinite(value):
            raise TrainingError(f"{STAGE}: held-out {key} is {value}; lower {STAGE}.lr — nothing was cached")
    metrics.update(val_metrics)
    tracker.log_metrics(val_metrics)
    tracker.progress(f"held-out accuracy {val_metrics[f'{STAGE}/val_accuracy']:.3f}, "
                     f"log-likelihood {val_metrics[f'{STAGE}/val_loglik']:.4f}")
    write_json(out_dir / "validation.json", {k.removeprefix(f"{STAGE}/val_"): round(v, 6) for k, v in val_metrics.items()})
    return StageResult(metrics=metrics, files=files)
