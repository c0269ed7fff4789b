"""The labels' Bayes ceiling: the gold reward r* used as a verifier on preference pairs labelled the way the theory
assumes, P(y1 ≻ y2) = σ((r*(y1) − r*(y2))/τ) (``roads.data.synthetic.bradley_terry_prefers_first``). No verifier can
explain such labels better than r*/τ itself, so its accuracy and log-likelihood on held-out pairs are the ceiling
every learnt verifier is read against; :func:`headroom` places a verifier between chance (accuracy ½,
log-likelihood log ½) and that ceiling.

Pure Python (no torch): prepare_data computes the ceiling, and a stage's cache key follows the modules it imports.
``roads.verifiers`` re-exports these names.
"""

from __future__ import annotations

import math

CHANCE_ACCURACY = 0.5  # a verifier that scores every response alike: ties count half
CHANCE_LOGLIK = -math.log(2.0)  # log σ(0)


def log_sigmoid(z: float) -> float:
    """log σ(z), stable for large |z|."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def label_probability(gold_margin: float, tau: float) -> float:
    """P(the label puts first the response with the higher gold reward) = σ(|Δr*|/τ) under Bradley–Terry labels
    with temperature τ (``roads.data.synthetic.bradley_terry_prefers_first``); τ = 0 (noiseless): 1, or ½ on a tie."""
    if gold_margin == 0:
        return 0.5
    if tau <= 0:
        return 1.0
    return math.exp(log_sigmoid(abs(gold_margin) / tau))


def bayes_ceiling(chosen_gold, rejected_gold, tau: float | None) -> dict:
    """The gold reward used as a verifier on labelled pairs: the best any verifier can do on these labels.

    ``chosen_gold``/``rejected_gold``: r* of each pair's chosen and rejected response; ``tau``: the Bradley–Terry
    temperature the labels were drawn with (0 = noiseless; None = unknown: only the τ-free numbers are given, the
    others are None). With Δ = r*_chosen − r*_rejected per pair:

    ``accuracy``           the realised ceiling: mean of 1 (Δ > 0), ½ (Δ = 0), 0 (Δ < 0) — the gold reward's own
                           accuracy on these very labels, ties counted half as :func:`preference_metrics` does
                           (independent of τ).
    ``loglik``             mean log σ(Δ/τ): the log-likelihood of the labels under the model that drew them (the
                           verifier r*/τ). τ = 0: 0 for a strict pair, log ½ for a tie (a Δ < 0 label is impossible
                           without noise and raises ValueError).
    ``expected_accuracy``  the expectation over the label noise, the pairs held fixed: mean over pairs of max(p, 1 − p)
                           with p = σ(Δ/τ) (½ on a tie) — the Bayes accuracy, the most any verifier can expect.
    ``expected_loglik``    likewise mean of p·log p + (1 − p)·log(1 − p): minus the mean binary entropy of the labels
                           (log ½ on a tie, 0 on a strict pair at τ = 0) — the most any verifier can expect.
    ``tie_fraction``       the fraction of pairs with Δ = 0 (their labels are coin flips).

    and ``tau`` and ``n_pairs``. The realised numbers are the paired comparator of a verifier scored on the same
    labels (r*/τ as a verifier scores exactly them); the expected ones remove the luck of the draw."""
    chosen, rejected = [float(c) for c in chosen_gold], [float(r) for r in rejected_gold]
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen gold rewards but {len(rejected)} rejected")
    if not chosen:
        raise ValueError("no pairs")
    if tau is not None and tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    deltas = [c - r for c, r in zip(chosen, rejected)]
    n = len(deltas)
    out = {"tau": tau, "n_pairs": n,
           "accuracy": sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in deltas) / n,
           "tie_fraction": sum(d == 0 for d in deltas) / n,
           "loglik": None, "expected_accuracy": None, "expected_loglik": None}
    if tau is None:
        return out
    loglik, expected_loglik, expected_accuracy = 0.0, 0.0, 0.0
    for d in deltas:
        if d == 0:
            loglik += CHANCE_LOGLIK
            expected_loglik += CHANCE_LOGLIK
            expected_accuracy += 0.5
        elif tau == 0:
            if d < 0:
                raise ValueError("a pair whose chosen response has the lower gold reward cannot carry a noiseless "
                                 "(tau = 0) label")
            expected_accuracy += 1.0
        else:
            z = abs(d) / tau
            loglik += log_sigmoid(d / tau)
            p, log_p, log_q = math.exp(log_sigmoid(z)), log_sigmoid(z), log_sigmoid(-z)
            expected_loglik += p * log_p + (1.0 - p) * log_q
            expected_accuracy += p
    out.update(loglik=loglik / n, expected_accuracy=expected_accuracy / n, expected_loglik=expected_loglik / n)
    return out


def headroom(value: float | None, ceiling: float | None, chance: float) -> float | None:
    """(value − chance) / (ceiling − chance): 0 at chance, 1 at the ceiling; None when either is unknown or the
    ceiling is not above chance (nothing to learn)."""
    if value is None or ceiling is None or not ceiling - chance > 1e-12:
        return None
    return (value - chance) / (ceiling - chance)
