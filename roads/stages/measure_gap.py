"""measure_gap: the generation–verification gap of one (task, seed), measured as numbers.

The paper argues that two-stage RLHF (reward model, then RL) can beat one-stage DPO because *verifying* a response
is easier than *generating* one, but it never measures that gap. This stage does, for the verifiers the study
trains on exactly the same preference pairs:

``global``    the reward model r(x, y) (stage ``reward_model``),
``local``     the local reward model β·Σ_t log π(y_t | x, y<t) (stage ``local_rm``),
``implicit``  the DPO implicit reward β·log π_DPO(y|x)/π_SFT(y|x) (stages ``offline_dpo``, ``online_dpo``),

and, where the task is synthetic, the gold reward itself (verifier ``gold``): the upper bound of any verifier.

Two measurements:

* **Verification** — each verifier's held-out preference accuracy (ties count half), mean log-likelihood
  log σ(s(x, y+) − s(x, y−)) and mean margin on ``pairs_val.jsonl``.
* **Selection (best-of-N)** — ``max_n`` samples per evaluation prompt from each policy (SFT and DPO samples, by
  default); for each verifier and each N in 1, 2, 4, …, ``max_n``, the expected gold reward of the sample the
  verifier picks among N. Where that curve rises above the policy's own mean gold reward (N = 1), the verifier
  knows something the generator does not; the gold curve shows how much there is to know.

Inputs: ``data`` (a prepare_data or narrow_data folder), ``reference`` (the SFT policy: the reference of the DPO
implicit reward), ``verifier.<entry>`` for each entry of ``verifiers`` and ``policy.<entry>`` for each of
``policies``. Without a gold reward (real preference data) only the verification metrics are measured.

Outputs:

``gap.json``              {"task", "seed", "ns", "n_prompts",
                           "verifiers": {entry: {"kind", "parameters", "train_examples", "val_accuracy",
                                                 "val_loglik", "val_margin"}},
                           "policies": {entry: {"parameters", "train_examples", "gold_mean"}},
                           "best_of_n": {policy: {verifier or "gold": [mean over prompts, one per N]}}}
                          (``gold_mean`` and ``best_of_n`` only where the task has a gold reward)
``verifier_pairs.jsonl``  one row per (verifier, held-out pair): verifier, pair_index, margin, correct, loglik
``best_of_n.jsonl``       one row per (policy, verifier incl. gold, prompt): policy, verifier, prompt_index, values

The estimator (:func:`best_of_n`): from M samples of a prompt, the exact expectation, over a uniformly random
subset of N ≤ M of them, of the gold reward of the subset's highest-scoring sample (ties broken uniformly at
random). Like the unbiased pass@k estimator, it is an unbiased estimate of best-of-N with N i.i.d. samples and uses
all M samples rather than one arbitrary N-subset.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path
from statistics import fmean
from typing import Iterator, Sequence

import torch

from roads.artifacts import ArtifactRef, StageResult, read_jsonl, write_json, write_jsonl
from roads.config import StageSpec
from roads.settings import MeasureGapConfig
from roads.data import gold_of
from roads.generation import sample
from roads.models import count_parameters, load_policy
from roads.training import NullTracker, Tracker
from roads.verifiers import Verifier, gold_verifier, load_verifier, preference_metrics, trained_examples

VERSION = 1
GOLD = "gold"


def n_grid(max_n: int) -> list[int]:
    """1, 2, 4, … up to ``max_n``, and ``max_n`` itself when it is not a power of two."""
    if max_n < 1:
        raise ValueError(f"max_n must be at least 1, got {max_n}")
    ns, n = [], 1
    while n <= max_n:
        ns.append(n)
        n *= 2
    if ns[-1] != max_n:
        ns.append(max_n)
    return ns


def best_of_n(gold: Sequence[float], scores: Sequence[float], ns: Sequence[int]) -> list[float]:
    """For M samples of one prompt with gold rewards ``gold`` and verifier scores ``scores``: for each N in ``ns``,
    the expected gold reward of the sample the verifier picks (highest score, ties broken uniformly at random)
    among a uniformly random N of the M samples drawn without replacement.

    Sorted ascending by score, the sample at rank i (1-based) is the pick with probability C(i−1, N−1)/C(M, N).
    Tied samples are exchangeable, so each rank within a group of equal scores carries the group's mean gold reward.
    Computed in exact rational arithmetic and rounded once: N = 1 gives the mean of ``gold``, N = M the mean gold of
    the top-scoring group."""
    gold = [float(g) for g in gold]
    scores = [float(s) for s in scores]
    m = len(gold)
    if len(scores) != m:
        raise ValueError(f"{m} gold rewards but {len(scores)} scores")
    if m == 0:
        raise ValueError("no samples")
    if any(math.isnan(s) for s in scores) or any(math.isnan(g) for g in gold):
        raise ValueError("NaN among the gold rewards or scores")
    order = sorted(range(m), key=scores.__getitem__)
    groups: list[tuple[int, int, Fraction]] = []  # (first rank, rank after the last, sum of gold) in ascending order
    start = 0
    while start < m:
        end = start + 1
        while end < m and scores[order[end]] == scores[order[start]]:
            end += 1
        groups.append((start, end, sum((Fraction(gold[order[k]]) for k in range(start, end)), Fraction(0))))
        start = end
    out = []
    for n in ns:
        if not 1 <= n <= m:
            raise ValueError(f"N = {n} needs 1 ≤ N ≤ M = {m} samples")
        total = Fraction(0)
        for first, after, gold_sum in groups:
            # Σ_{i=first+1}^{after} C(i−1, N−1) = C(after, N) − C(first, N)  (hockey stick)
            weight = math.comb(after, n) - math.comb(first, n)
            if weight:
                total += weight * gold_sum / (after - first)
        out.append(float(total / math.comb(m, n)))
    return out


def metric_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_/.-]", "_", name)


def _verifiers(inputs: dict[str, ArtifactRef], cfg: MeasureGapConfig) -> Iterator[tuple[str, Verifier]]:
    """(entry, verifier) for each ``verifier.<entry>`` input, loaded one at a time (the last is released when the
    next is loaded)."""
    for name, ref in inputs.items():
        if name.startswith("verifier."):
            entry = name.split(".", 1)[1]
            yield entry, load_verifier(entry, ref.path, reference=inputs["reference"].path, batch_size=cfg.batch_size)


def validate(verifier: Verifier, val: list[dict]) -> tuple[dict[str, float], list[dict]]:
    """Preference metrics of a verifier on held-out pairs, and one row per pair. The margin is the verifier's pairwise
    ``compare(x, y+, y−)`` where it has one (a generative verifier), else s(x, y+) − s(x, y−)."""
    prompts = [r["prompt"] for r in val]
    if verifier.compare is not None:
        margin = verifier.compare(prompts, [r["chosen"] for r in val], [r["rejected"] for r in val])
        chosen = margin.to(torch.float64).cpu()
        rejected = torch.zeros_like(chosen)
    else:
        chosen = verifier.score(prompts, [r["chosen"] for r in val]).to(torch.float64).cpu()
        rejected = verifier.score(prompts, [r["rejected"] for r in val]).to(torch.float64).cpu()
    margin = chosen - rejected
    loglik = torch.nn.functional.logsigmoid(margin)
    rows = [{"verifier": verifier.name, "pair_index": i, "margin": round(float(d), 6),
             "correct": 1.0 if d > 0 else 0.5 if d == 0 else 0.0, "loglik": round(float(ll), 6)}
            for i, (d, ll) in enumerate(zip(margin.tolist(), loglik.tolist()))]
    return preference_metrics(chosen, rejected), rows


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: MeasureGapConfig = spec.config()
    data = Path(inputs["data"].path)
    task_name, gold = gold_of(data)
    prompts = [r["prompt"] for r in read_jsonl(data / "eval_prompts.jsonl")][: cfg.n_prompts]
    val = read_jsonl(data / "pairs_val.jsonl")
    ns = n_grid(cfg.max_n)
    policy_names = [name.split(".", 1)[1] for name in inputs if name.startswith("policy.")]

    # 1. samples of every policy (strings only; each model is released before the next is loaded)
    policies: dict[str, dict] = {}
    samples: dict[str, list[list[str]]] = {}
    golds: dict[str, list[list[float]]] = {}
    for name in policy_names:
        folder = inputs[f"policy.{name}"].path
        model, tokenizer = load_policy(folder)
        policies[name] = {"parameters": count_parameters(model), "train_examples": trained_examples(folder)}
        if gold is not None:
            tracker.progress(f"sampling {len(prompts)} prompts x {cfg.max_n} from {name}")
            groups = sample(model, tokenizer, prompts, n=cfg.max_n, max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, seed=spec.seed, batch_size=cfg.batch_size)
            samples[name] = [[c.text for c in group] for group in groups]
            golds[name] = [[gold(p, c) for c in group] for p, group in zip(prompts, samples[name], strict=True)]
            policies[name]["gold_mean"] = round(fmean(g for group in golds[name] for g in group), 6)
        del model

    verifiers_out: dict[str, dict] = {}
    pair_rows: list[dict] = []
    curves: dict[str, dict[str, list[list[float]]]] = {name: {} for name in samples}  # policy -> verifier -> per prompt
    metrics: dict[str, float] = {}

    def select(verifier: Verifier) -> None:
        for name in samples:
            tracker.progress(f"scoring {len(prompts)} x {cfg.max_n} samples of {name} with {verifier.name}")
            flat_prompts = [p for p, group in zip(prompts, samples[name]) for _ in group]
            flat = [c for group in samples[name] for c in group]
            scores = verifier.score(flat_prompts, flat).to(torch.float64).cpu().tolist()
            per_prompt = [best_of_n(golds[name][i], scores[i * cfg.max_n:(i + 1) * cfg.max_n], ns)
                          for i in range(len(prompts))]
            curves[name][verifier.name] = per_prompt
            mean = [fmean(v[j] for v in per_prompt) for j in range(len(ns))]
            tracker.progress(f"{name} / {verifier.name}: best-of-{ns[0]} {mean[0]:.4f}, best-of-{ns[-1]} {mean[-1]:.4f}")

    # 2. each verifier in turn: held-out pairs, then the samples of every policy
    for entry, verifier in _verifiers(inputs, cfg):
        tracker.progress(f"validating {entry} ({verifier.kind}, {verifier.parameters:,} parameters) on {len(val)} "
                         "held-out pairs")
        summary, rows = validate(verifier, val)
        pair_rows += rows
        verifiers_out[entry] = {"kind": verifier.kind, "parameters": verifier.parameters,
                                "train_examples": verifier.train_examples,
                                **{f"val_{k}": round(v, 6) for k, v in summary.items()}}
        metrics[f"gap/{metric_name(entry)}/val_accuracy"] = round(summary["accuracy"], 6)
        metrics[f"gap/{metric_name(entry)}/val_loglik"] = round(summary["loglik"], 6)
        tracker.progress(f"{entry}: held-out accuracy {summary['accuracy']:.3f}, log-likelihood {summary['loglik']:.4f}")
        select(verifier)
        del verifier  # release its models before the next verifier is loaded
    if gold is not None:
        select(gold_verifier(gold))  # the upper bound

    # 3. outputs
    bon_rows, bon_summary = [], {}
    for name, by_verifier in curves.items():
        bon_summary[name] = {}
        for verifier_name, per_prompt in by_verifier.items():
            bon_rows += [{"policy": name, "verifier": verifier_name, "prompt_index": i,
                          "values": [round(v, 6) for v in values]} for i, values in enumerate(per_prompt)]
            mean = [round(fmean(v[j] for v in per_prompt), 6) for j in range(len(ns))]
            bon_summary[name][verifier_name] = mean
            for j in sorted({0, len(ns) - 1}):
                metrics[f"gap/{metric_name(name)}/{metric_name(verifier_name)}/bon_at_{ns[j]}"] = mean[j]
    summary_json = {"task": task_name, "seed": spec.seed, "ns": ns, "n_prompts": len(prompts),
                    "verifiers": verifiers_out, "policies": policies}
    if gold is not None:
        summary_json["best_of_n"] = bon_summary
    write_json(out_dir / "gap.json", summary_json)
    write_jsonl(out_dir / "verifier_pairs.jsonl", pair_rows)
    write_jsonl(out_dir / "best_of_n.jsonl", bon_rows)
    return StageResult(metrics=metrics, files=["gap.json", "verifier_pairs.jsonl", "best_of_n.jsonl"])
