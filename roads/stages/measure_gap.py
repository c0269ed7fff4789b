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

Validity numbers, read by the report beside the comparison (synthetic tasks only; all reuse the samples above):

* **The labels' Bayes ceiling** — the gold reward as a verifier on the same held-out pairs
  (:func:`roads.ceiling.bayes_ceiling`), read from the data folder's ``ceiling.json`` (prepare_data writes it with
  the τ the labels were drawn with); a folder without one (narrow_data copies the other files) gets it computed from
  ``pairs_val``'s gold rewards with τ unknown: then only ``accuracy`` and ``tie_fraction`` are known, the τ-dependent
  numbers are null. Each verifier's **headroom** = (value − chance)/(ceiling − chance) with chance ½ (accuracy) and
  log ½ (log-likelihood), against the *realised* ceiling (``accuracy``, ``loglik``: r*/τ scored on these very labels,
  so it lands exactly on 1); null where the ceiling is unknown or not above chance.
* **On-policy verification** — pairs made of the first policy's own samples (the first entry of ``policies`` that was
  sampled, normally ``sft``): samples (0, 1), (2, 3), … of each prompt, ordered by the gold reward, gold ties left
  out. ``onpolicy_accuracy`` = the fraction the verifier orders as the gold reward does (verifier ties count half;
  the gold reward scores 1). The log-likelihood and both headroom fractions are taken against Bradley–Terry labels
  with the data's τ, *in expectation* over the label draw (no labels are sampled): with p = σ(Δr*/τ) the probability
  that the label puts the better sample first and m the verifier's margin, ``onpolicy_expected_accuracy`` = mean of
  p·c + (1 − p)·(1 − c) (c = 1, ½, 0 by the sign of m), ``onpolicy_loglik`` = mean of p·log σ(m) + (1 − p)·log σ(−m);
  the headroom fractions use the expected ceiling on the same pairs (``onpolicy.ceiling``: mean max(p, 1 − p) and
  minus the mean label entropy). At τ = 0 these are plain agreement and log σ(m) against a ceiling of 1 and 0; with
  τ unknown they are null. A generative verifier judges each pair with ``compare``; the others reuse the scores of
  the best-of-N step.
* **Relative gap** (Song et al. 2024, "Mind the Gap") — per policy and verifier at N = ``max_n``: (best-of-N gold with
  the verifier − the policy's mean gold) / (best-of-N gold with the gold reward − the policy's mean gold), a ratio of
  means over prompts: the fraction of the available improvement the verifier captures. Per prompt, numerator and
  denominator are the rows' ``gain_at_max_n`` in ``best_of_n.jsonl`` (= last − first entry of ``values``; the gold
  row's is the denominator), for the report to bootstrap the ratio.
* **Likelihood–reward rank correlation** — Spearman's ρ between log π_SFT(y|x) (the ``reference`` input, summed over
  completion + EOS as the verifiers score) and r*(x, y) over the first policy's samples: ``pooled`` over all prompts'
  samples together (it also rewards knowing which prompts are hard), ``within_prompt_mean`` the mean over prompts of
  the per-prompt ρ (prompts whose samples all share one gold reward or one likelihood are left out; how many count is
  ``within_prompt_n``): whether the generator's own likelihood already ranks its samples as r* does (the
  equivalence regime of DESIGN §2).
* **Greedy gold** — the mean gold reward of each policy's greedy output (temperature 0, one per prompt) on the same
  prompts.

Inputs: ``data`` (a prepare_data or narrow_data folder), ``reference`` (the SFT policy: the reference of the DPO
implicit reward), ``verifier.<entry>`` for each entry of ``verifiers`` and ``policy.<entry>`` for each of
``policies``. Without a gold reward (real preference data) only the verification metrics are measured.

Outputs:

``gap.json``              {"task", "seed", "ns", "n_prompts",
                           "verifiers": {entry: {"kind", "parameters", "train_examples", "val_accuracy",
                                                 "val_loglik", "val_margin",
                                                 "val_accuracy_headroom", "val_loglik_headroom",
                                                 "onpolicy_accuracy", "onpolicy_expected_accuracy", "onpolicy_loglik",
                                                 "onpolicy_accuracy_headroom", "onpolicy_loglik_headroom"}},
                           "policies": {entry: {"parameters", "train_examples", "gold_mean"}},
                           "best_of_n": {policy: {verifier or "gold": [mean over prompts, one per N]}},
                           "ceiling": {"source" ("ceiling.json" or "pairs_val"), "split", "tau", "n_pairs",
                                       "accuracy", "loglik", "expected_accuracy", "expected_loglik", "tie_fraction"},
                           "onpolicy": {"policy", "n_pairs", "n_gold_ties", "tau",
                                        "ceiling": {"accuracy", "expected_accuracy", "expected_loglik"}},
                           "relative_gap": {policy: {verifier: fraction at N = max_n, or null}},
                           "likelihood_spearman": {"policy", "n_samples", "pooled", "within_prompt_mean",
                                                   "within_prompt_n"},
                           "greedy_gold": {policy: mean gold reward of its greedy output}}
                          (``gold_mean``, ``best_of_n`` and everything after it, and the headroom and on-policy keys
                          of the verifiers, only where the task has a gold reward)
``verifier_pairs.jsonl``  one row per (verifier, held-out pair): verifier, pair_index, margin, correct, loglik; with a
                          known τ also the ceiling's rows, verifier ``gold``: margin Δr*/τ (Δr* at τ = 0), loglik
                          log σ(Δr*/τ) (at τ = 0: 0, or log ½ on a tie)
``best_of_n.jsonl``       one row per (policy, verifier incl. gold, prompt): policy, verifier, prompt_index, values,
                          gain_at_max_n
``onpolicy_pairs.jsonl``  one row per (verifier, on-policy pair): verifier, policy, pair_index, prompt_index, better,
                          worse (sample indices), gold_margin (> 0), label_p, margin, correct, expected_correct, loglik
``likelihood.jsonl``      one row per sample of the first policy: policy, prompt_index, sample_index, logp, gold
``greedy.jsonl``          one row per (policy, prompt): policy, prompt_index, completion, gold

Metrics (each only where its number is defined): ``gap/<verifier>/val_accuracy``, ``…/val_loglik``,
``…/val_accuracy_headroom``, ``…/val_loglik_headroom``, ``…/onpolicy_accuracy``, ``…/onpolicy_loglik``,
``…/onpolicy_accuracy_headroom``, ``…/onpolicy_loglik_headroom``; ``gap/<policy>/<verifier or gold>/bon_at_<N>`` (N = 1
and ``max_n``), ``gap/<policy>/<verifier>/relative_gap``, ``gap/<policy>/greedy_gold``; ``gap/ceiling/accuracy``,
``…/loglik``, ``…/expected_accuracy``, ``…/expected_loglik``; ``gap/likelihood_spearman`` (pooled) and
``gap/likelihood_spearman_within``.

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
from typing import Iterator, Optional, Sequence

import torch

from roads.artifacts import ArtifactRef, StageResult, read_json, read_jsonl, write_json, write_jsonl
from roads.config import StageSpec
from roads.settings import MeasureGapConfig
from roads.data import gold_of
from roads.generation import sample
from roads.models import count_parameters, load_policy
from roads.training import NullTracker, Tracker
from roads.ceiling import CHANCE_ACCURACY, CHANCE_LOGLIK, bayes_ceiling, headroom, label_probability, log_sigmoid
from roads.verifiers import (Verifier, gold_verifier, load_verifier, preference_metrics, same_text, summed_logps,
                            tie_identical, trained_examples)

VERSION = 2
GOLD = "gold"
CEILING_FILE = "ceiling.json"  # written by prepare_data
FILES = ["gap.json", "verifier_pairs.jsonl", "best_of_n.jsonl", "onpolicy_pairs.jsonl", "likelihood.jsonl",
         "greedy.jsonl"]


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
    identical = same_text([r["chosen"] for r in val], [r["rejected"] for r in val])
    margin = tie_identical(chosen - rejected, identical)  # the same text twice is a tie, exactly
    loglik = torch.nn.functional.logsigmoid(margin)
    rows = [{"verifier": verifier.name, "pair_index": i, "margin": round(float(d), 6),
             "correct": 1.0 if d > 0 else 0.5 if d == 0 else 0.0, "loglik": round(float(ll), 6)}
            for i, (d, ll) in enumerate(zip(margin.tolist(), loglik.tolist()))]
    return preference_metrics(chosen, rejected, identical), rows


def _round(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(float(v), 6)


def load_ceiling(data: Path, val: list[dict]) -> Optional[dict]:
    """The labels' Bayes ceiling on ``pairs_val``: the data folder's ``ceiling.json``, else computed from the pairs'
    gold rewards with τ unknown; None when the pairs carry no gold rewards."""
    file = data / CEILING_FILE
    if file.is_file():
        return {"source": CEILING_FILE, **read_json(file)}
    if val and all("chosen_gold" in r and "rejected_gold" in r for r in val):
        return {"source": "pairs_val", "split": "pairs_val",
                **bayes_ceiling([r["chosen_gold"] for r in val], [r["rejected_gold"] for r in val], None)}
    return None


def ceiling_rows(val: list[dict], tau: float) -> list[dict]:
    """``verifier_pairs.jsonl`` rows of the gold reward r*/τ as a verifier on the held-out pairs (the ceiling)."""
    rows = []
    for i, r in enumerate(val):
        d = float(r["chosen_gold"]) - float(r["rejected_gold"])
        if tau > 0:
            margin, loglik = d / tau, log_sigmoid(d / tau)
        else:
            margin, loglik = d, 0.0 if d > 0 else CHANCE_LOGLIK if d == 0 else -math.inf
        rows.append({"verifier": GOLD, "pair_index": i, "margin": round(margin, 6),
                     "correct": 1.0 if d > 0 else 0.5 if d == 0 else 0.0, "loglik": round(loglik, 6)})
    return rows


def onpolicy_pairs(golds: Sequence[Sequence[float]]) -> tuple[list[tuple[int, int, int]], int]:
    """(prompt index, better sample, worse sample) for the consecutive samples (0, 1), (2, 3), … of each prompt,
    ordered by the gold reward; gold ties are left out, and their number is the second value."""
    pairs, ties = [], 0
    for i, g in enumerate(golds):
        for a in range(0, len(g) - 1, 2):
            b = a + 1
            if g[a] == g[b]:
                ties += 1
            else:
                pairs.append((i, a, b) if g[a] > g[b] else (i, b, a))
    return pairs, ties


def onpolicy_metrics(margins: Sequence[float], gold_margins: Sequence[float],
                     tau: Optional[float]) -> tuple[dict[str, Optional[float]], list[dict]]:
    """A verifier on on-policy pairs (better first, so every gold margin is > 0) with margins m = s(better) −
    s(worse): agreement with the gold order, and accuracy and log-likelihood expected under Bradley–Terry labels of
    temperature τ (None when τ is unknown). Returns the means and one row per pair."""
    rows = []
    for m, d in zip(margins, gold_margins, strict=True):
        c = 1.0 if m > 0 else 0.5 if m == 0 else 0.0
        row = {"gold_margin": round(d, 6), "margin": round(m, 6), "correct": c, "label_p": None,
               "expected_correct": None, "loglik": None}
        if tau is not None:
            p = label_probability(d, tau)
            ll = p * log_sigmoid(m) + ((1.0 - p) * log_sigmoid(-m) if p < 1.0 else 0.0)
            row.update(label_p=round(p, 6), expected_correct=round(p * c + (1.0 - p) * (1.0 - c), 6),
                       loglik=round(ll, 6))
        rows.append(row)
    n = len(rows)
    mean = lambda key: None if not n or rows[0][key] is None else fmean(r[key] for r in rows)  # noqa: E731
    return {"accuracy": mean("correct") if n else None, "expected_accuracy": mean("expected_correct"),
            "loglik": mean("loglik")}, rows


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (ties get mean ranks); None when either side is constant or has < 2 values."""
    from scipy.stats import spearmanr

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def likelihood_spearman(logps: Sequence[Sequence[float]], golds: Sequence[Sequence[float]]) -> dict:
    """ρ(log π, r*) pooled over every prompt's samples, and the mean of the per-prompt ρ over the prompts where it
    is defined."""
    pooled = spearman([v for group in logps for v in group], [g for group in golds for g in group])
    within = [r for r in (spearman(lp, g) for lp, g in zip(logps, golds, strict=True)) if r is not None]
    return {"n_samples": sum(len(g) for g in golds), "pooled": _round(pooled),
            "within_prompt_mean": _round(fmean(within)) if within else None, "within_prompt_n": len(within)}


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: MeasureGapConfig = spec.config()
    data = Path(inputs["data"].path)
    task_name, gold = gold_of(data)
    prompts = [r["prompt"] for r in read_jsonl(data / "eval_prompts.jsonl")][: cfg.n_prompts]
    val = read_jsonl(data / "pairs_val.jsonl")
    ns = n_grid(cfg.max_n)
    policy_names = [name.split(".", 1)[1] for name in inputs if name.startswith("policy.")]
    ceiling = load_ceiling(data, val) if gold is not None else None
    tau = None if ceiling is None else ceiling.get("tau")
    metrics: dict[str, float] = {}

    # 1. samples and the greedy output of every policy (strings only; each model is released before the next is loaded)
    policies: dict[str, dict] = {}
    samples: dict[str, list[list[str]]] = {}
    golds: dict[str, list[list[float]]] = {}
    greedy_rows: list[dict] = []
    greedy_gold: dict[str, float] = {}
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
            greedy = sample(model, tokenizer, prompts, n=1, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                            seed=spec.seed, batch_size=cfg.batch_size)
            rows = [{"policy": name, "prompt_index": i, "completion": g[0].text, "gold": round(gold(p, g[0].text), 6)}
                    for i, (p, g) in enumerate(zip(prompts, greedy, strict=True))]
            greedy_rows += rows
            greedy_gold[name] = round(fmean(r["gold"] for r in rows), 6)
            metrics[f"gap/{metric_name(name)}/greedy_gold"] = greedy_gold[name]
            tracker.progress(f"{name}: mean gold {policies[name]['gold_mean']:.4f} sampled, {greedy_gold[name]:.4f} "
                             "greedy")
        del model

    # the first policy's samples: on-policy pairs, and its likelihood under the SFT policy against the gold reward
    first = next((p for p in cfg.policies if p in samples), next(iter(samples), None))
    pairs, n_ties = onpolicy_pairs(golds[first]) if first else ([], 0)
    onpolicy_rows: list[dict] = []
    likelihood_rows: list[dict] = []
    rho = None
    if first is not None and "reference" in inputs:
        tracker.progress(f"log-likelihood of {len(prompts)} x {cfg.max_n} samples of {first} under the SFT policy")
        model, tokenizer = load_policy(inputs["reference"].path)
        flat_prompts = [p for p, group in zip(prompts, samples[first]) for _ in group]
        logps = summed_logps(model, tokenizer, flat_prompts, [c for g in samples[first] for c in g],
                             cfg.batch_size).to(torch.float64).tolist()
        del model
        per_prompt = [logps[i * cfg.max_n:(i + 1) * cfg.max_n] for i in range(len(prompts))]
        rho = {"policy": first, **likelihood_spearman(per_prompt, golds[first])}
        likelihood_rows = [{"policy": first, "prompt_index": i, "sample_index": j, "logp": round(lp, 6),
                            "gold": round(golds[first][i][j], 6)}
                           for i, lps in enumerate(per_prompt) for j, lp in enumerate(lps)]
        for key, name in (("pooled", "likelihood_spearman"), ("within_prompt_mean", "likelihood_spearman_within")):
            if rho[key] is not None:
                metrics[f"gap/{name}"] = rho[key]
        tracker.progress(f"Spearman(log pi_SFT, r*) on {first}'s samples: pooled {rho['pooled']}, within prompts "
                         f"{rho['within_prompt_mean']} ({rho['within_prompt_n']} prompts)")

    verifiers_out: dict[str, dict] = {}
    pair_rows: list[dict] = []
    curves: dict[str, dict[str, list[list[float]]]] = {name: {} for name in samples}  # policy -> verifier -> per prompt

    def onpolicy(verifier: Verifier, scores: list[float]) -> dict[str, Optional[float]]:
        """The verifier on the first policy's on-policy pairs; ``scores``: its scores of that policy's samples."""
        if not pairs:
            margins = []
        elif verifier.compare is not None:  # a pairwise judge judges each pair
            margins = verifier.compare([prompts[i] for i, _, _ in pairs],
                                       [samples[first][i][a] for i, a, _ in pairs],
                                       [samples[first][i][b] for i, _, b in pairs]).to(torch.float64).cpu().tolist()
        else:
            margins = [scores[i * cfg.max_n + a] - scores[i * cfg.max_n + b] for i, a, b in pairs]
        summary, rows = onpolicy_metrics(margins, [golds[first][i][a] - golds[first][i][b] for i, a, b in pairs], tau)
        onpolicy_rows.extend({"verifier": verifier.name, "policy": first, "pair_index": k, "prompt_index": i,
                              "better": a, "worse": b, **row} for k, ((i, a, b), row) in enumerate(zip(pairs, rows)))
        return summary

    def select(verifier: Verifier) -> Optional[dict]:
        """Best-of-N curves of the verifier on every policy's samples; its on-policy metrics (learnt verifiers)."""
        result = None
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
            if name == first and verifier.kind != GOLD:
                result = onpolicy(verifier, scores)
        return result

    onpolicy_ceiling = None
    if pairs:
        c = bayes_ceiling([golds[first][i][a] for i, a, _ in pairs], [golds[first][i][b] for i, _, b in pairs], tau)
        onpolicy_ceiling = {k: _round(c[k]) for k in ("accuracy", "expected_accuracy", "expected_loglik")}

    # 2. each verifier in turn: held-out pairs, then the samples of every policy
    for entry, verifier in _verifiers(inputs, cfg):
        tracker.progress(f"validating {entry} ({verifier.kind}, {verifier.parameters:,} parameters) on {len(val)} "
                         "held-out pairs")
        summary, rows = validate(verifier, val)
        pair_rows += rows
        out = {"kind": verifier.kind, "parameters": verifier.parameters, "train_examples": verifier.train_examples,
               **{f"val_{k}": round(v, 6) for k, v in summary.items()}}
        metrics[f"gap/{metric_name(entry)}/val_accuracy"] = round(summary["accuracy"], 6)
        metrics[f"gap/{metric_name(entry)}/val_loglik"] = round(summary["loglik"], 6)
        tracker.progress(f"{entry}: held-out accuracy {summary['accuracy']:.3f}, log-likelihood {summary['loglik']:.4f}")
        if ceiling is not None:
            out["val_accuracy_headroom"] = _round(headroom(summary["accuracy"], ceiling["accuracy"], CHANCE_ACCURACY))
            out["val_loglik_headroom"] = _round(headroom(summary["loglik"], ceiling["loglik"], CHANCE_LOGLIK))
        on = select(verifier)
        if on is not None:
            top = onpolicy_ceiling or {}
            out.update(onpolicy_accuracy=_round(on["accuracy"]),
                       onpolicy_expected_accuracy=_round(on["expected_accuracy"]), onpolicy_loglik=_round(on["loglik"]),
                       onpolicy_accuracy_headroom=_round(headroom(on["expected_accuracy"], top.get("expected_accuracy"),
                                                                  CHANCE_ACCURACY)),
                       onpolicy_loglik_headroom=_round(headroom(on["loglik"], top.get("expected_loglik"),
                                                                CHANCE_LOGLIK)))
            tracker.progress(f"{entry}: on-policy accuracy {on['accuracy']} on {len(pairs)} pairs of {first}")
        for key in ("val_accuracy_headroom", "val_loglik_headroom", "onpolicy_accuracy", "onpolicy_loglik",
                    "onpolicy_accuracy_headroom", "onpolicy_loglik_headroom"):
            if out.get(key) is not None:
                metrics[f"gap/{metric_name(entry)}/{key}"] = out[key]
        chosen_by_rule = Path(inputs[f"verifier.{entry}"].path) / "selection.json"
        if chosen_by_rule.is_file():  # how its settings were chosen (reward_model.lrs): shown by the report
            out["selection"] = read_json(chosen_by_rule)
        verifiers_out[entry] = out
        del verifier  # release its models before the next verifier is loaded
    if gold is not None:
        select(gold_verifier(gold))  # the upper bound
    if ceiling is not None and ceiling.get("loglik") is not None:
        pair_rows += ceiling_rows(val, float(tau))

    # 3. outputs
    bon_rows, bon_summary, relative_gap = [], {}, {}
    for name, by_verifier in curves.items():
        bon_summary[name] = {}
        for verifier_name, per_prompt in by_verifier.items():
            bon_rows += [{"policy": name, "verifier": verifier_name, "prompt_index": i,
                          "values": [round(v, 6) for v in values], "gain_at_max_n": round(values[-1] - values[0], 6)}
                         for i, values in enumerate(per_prompt)]
            mean = [round(fmean(v[j] for v in per_prompt), 6) for j in range(len(ns))]
            bon_summary[name][verifier_name] = mean
            for j in sorted({0, len(ns) - 1}):
                metrics[f"gap/{metric_name(name)}/{metric_name(verifier_name)}/bon_at_{ns[j]}"] = mean[j]
        available = sum(v[-1] - v[0] for v in by_verifier.get(GOLD, []))
        relative_gap[name] = {}
        for verifier_name, per_prompt in by_verifier.items():
            if verifier_name == GOLD:
                continue
            value = sum(v[-1] - v[0] for v in per_prompt) / available if available > 1e-12 else None
            relative_gap[name][verifier_name] = _round(value)
            if value is not None:
                metrics[f"gap/{metric_name(name)}/{metric_name(verifier_name)}/relative_gap"] = round(value, 6)
    summary_json = {"task": task_name, "seed": spec.seed, "ns": ns, "n_prompts": len(prompts),
                    "verifiers": verifiers_out, "policies": policies}
    if gold is not None:
        summary_json["best_of_n"] = bon_summary
        summary_json["relative_gap"] = relative_gap
        summary_json["greedy_gold"] = greedy_gold
        summary_json["onpolicy"] = {"policy": first, "n_pairs": len(pairs), "n_gold_ties": n_ties, "tau": tau,
                                    "ceiling": onpolicy_ceiling}
        if rho is not None:
            summary_json["likelihood_spearman"] = rho
    if ceiling is not None:
        summary_json["ceiling"] = {k: _round(v) if isinstance(v, float) else v for k, v in ceiling.items()}
        for key in ("accuracy", "loglik", "expected_accuracy", "expected_loglik"):
            if ceiling.get(key) is not None:
                metrics[f"gap/ceiling/{key}"] = round(ceiling[key], 6)
    write_json(out_dir / "gap.json", summary_json)
    write_jsonl(out_dir / "verifier_pairs.jsonl", pair_rows)
    write_jsonl(out_dir / "best_of_n.jsonl", bon_rows)
    write_jsonl(out_dir / "onpolicy_pairs.jsonl", onpolicy_rows)
    write_jsonl(out_dir / "likelihood.jsonl", likelihood_rows)
    write_jsonl(out_dir / "greedy.jsonl", greedy_rows)
    return StageResult(metrics=metrics, files=list(FILES))
