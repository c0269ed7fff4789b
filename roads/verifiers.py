"""Verifiers: anything that scores a (prompt, completion) pair, loaded from a stage output by its ``verifier.json``.

Four learnt kinds, all fitted to the same preference pairs (the paper's H5 comparison):

``global``    the reward model r(x, y): the SFT model with a scalar head, Bradley–Terry loss (stage ``reward_model``).
``local``     β·Σ_t log π(y_t | x, y<t) of a language model trained with the Bradley–Terry loss on exactly that
              quantity (stage ``local_rm``): a reward the generator's own token probabilities must carry.
``implicit``  the DPO implicit reward β·(log π_DPO(y|x) − log π_ref(y|x)) (stages ``offline_dpo``, ``online_dpo``),
              with the SFT model as π_ref.

``generative`` the language model as a judge (stage ``genrm``): it reads (prompt, response A, response B) and writes the
              verdict "A" or "B". Its native score is pairwise, ``compare(prompts, a, b)`` = the log-odds that a ≻ b
              (exactly antisymmetric, see :func:`roads.judge.compare`). Its pointwise ``score(prompts,
              completions)`` is the log-odds of each completion against a per-prompt *reference*: the first completion
              given for that prompt in the same call (which therefore scores 0) — the GenRM paper's reward relative to
              a reference response, r(x, y) = log p(y ≻ y_ref | x)/p(y_ref ≻ y | x). Scores are comparable only within
              one call and one prompt (ranking the samples of a prompt, as best-of-N and online DPO do).

and ``gold``, the task's true reward (synthetic tasks only). Completions are scored as the trainers saw them: the
global reward model reads prompt + completion + EOS (TRL's RewardTrainer); log-probabilities are summed over the
completion's tokens and the EOS (TRL's DPOTrainer appends it).

**The labels' Bayes ceiling** (:func:`bayes_ceiling`): synthetic preference labels are drawn as
P(y1 ≻ y2) = σ((r*(y1) − r*(y2))/τ), so no verifier can explain them better than r*/τ itself. Its accuracy and
log-likelihood on held-out pairs are the ceiling every learnt verifier is read against; :func:`headroom` places a
verifier between chance (accuracy ½, log-likelihood log ½) and that ceiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from roads.artifacts import read_json
from roads.errors import RoadsError
from roads.generation import encode, reward_scores, sequence_logps
from roads.judge import compare as judge_compare

KINDS = ("global", "local", "implicit", "generative", "gold")
VERIFIER_FILE = "verifier.json"
CHANCE_ACCURACY = 0.5  # a verifier that scores every response alike: ties count half
CHANCE_LOGLIK = -math.log(2.0)  # log σ(0)


def completion_ids(tokenizer, completions: list[str]) -> list[list[int]]:
    """Token ids of each completion followed by EOS, as DPO and the local reward model train on them."""
    return [ids + [tokenizer.eos_token_id] for ids in encode(tokenizer, completions)]


def summed_logps(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 64) -> torch.Tensor:
    """Σ_t log π(y_t | x, y<t) over completion + EOS, shape (N,)."""
    return sequence_logps(model, encode(tokenizer, prompts), completion_ids(tokenizer, completions),
                          pad_id=tokenizer.pad_token_id, batch_size=batch_size)


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (ties count half) and mean log-likelihood log σ(r+ − r−) of the labels under a verifier."""
    margin = chosen - rejected
    accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
    return {
        "accuracy": float(accuracy),
        "loglik": float(torch.nn.functional.logsigmoid(margin).mean()),
        "margin": float(margin.mean()),
    }


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


@dataclass
class Verifier:
    name: str
    kind: str
    score: Callable[[list[str], list[str]], torch.Tensor]  # (prompts, completions) -> (N,) scores
    parameters: int = 0
    train_examples: Optional[int] = None
    # (prompts, a, b) -> (N,) log-odds that a ≻ b, for verifiers that judge pairs (kind ``generative``); else None
    compare: Optional[Callable[[list[str], list[str], list[str]], torch.Tensor]] = None


def trained_examples(folder: str | Path) -> Optional[int]:
    """How many examples (pairs) the stage whose output is ``folder`` trained on, when it says (``trained.json``)."""
    file = Path(folder) / "trained.json"
    return int(read_json(file)["train_examples"]) if file.is_file() else None


def load_verifier(name: str, folder: str | Path, reference: str | Path | None = None,
                  batch_size: int = 64) -> Verifier:
    """The verifier saved at ``folder``. An ``implicit`` verifier needs the ``reference`` policy's folder; a
    ``generative`` one also has ``compare``."""
    from roads.models import count_parameters, load_policy, load_reward_model

    file = Path(folder) / VERIFIER_FILE
    if not file.is_file():
        raise RoadsError(f"{name}: {folder} holds no {VERIFIER_FILE}; a verifier is a reward_model, local_rm, genrm or "
                         "DPO policy output")
    info = read_json(file)
    kind, beta = info["kind"], float(info.get("beta", 1.0))
    examples = trained_examples(folder)
    if kind == "global":
        model, tokenizer = load_reward_model(folder)

        def score(prompts: list[str], completions: list[str]) -> torch.Tensor:
            return reward_scores(model, tokenizer, prompts, completions, batch_size=batch_size)
    elif kind == "local":
        model, tokenizer = load_policy(folder)

        def score(prompts: list[str], completions: list[str]) -> torch.Tensor:
            return beta * summed_logps(model, tokenizer, prompts, completions, batch_size)
    elif kind == "implicit":
        if reference is None:
            raise RoadsError(f"{name}: the DPO implicit reward needs the reference policy")
        model, tokenizer = load_policy(folder)
        ref_model, _ = load_policy(reference)

        def score(prompts: list[str], completions: list[str]) -> torch.Tensor:
            return beta * (summed_logps(model, tokenizer, prompts, completions, batch_size)
                           - summed_logps(ref_model, tokenizer, prompts, completions, batch_size))
    elif kind == "generative":
        model, tokenizer = load_policy(folder)
        options = dict(rationale=bool(info.get("rationale", False)), votes=int(info.get("votes", 1)),
                       rationale_tokens=int(info.get("rationale_tokens", 16)),
                       temperature=float(info.get("temperature", 1.0)), batch_size=batch_size)

        def compare(prompts: list[str], a: list[str], b: list[str]) -> torch.Tensor:
            return judge_compare(model, tokenizer, prompts, a, b, **options)

        def score(prompts: list[str], completions: list[str]) -> torch.Tensor:
            reference: dict[str, str] = {}  # prompt -> its first completion in this call
            return compare(prompts, completions, [reference.setdefault(p, c) for p, c in zip(prompts, completions,
                                                                                            strict=True)])

        return Verifier(name, kind, score, count_parameters(model), examples, compare)
    else:
        raise RoadsError(f"{file}: unknown verifier kind {kind!r}; expected one of {', '.join(KINDS[:4])}")
    return Verifier(name, kind, score, count_parameters(model), examples)


def gold_verifier(gold: Callable[[str, str], float]) -> Verifier:
    def score(prompts: list[str], completions: list[str]) -> torch.Tensor:
        return torch.tensor([gold(p, c) for p, c in zip(prompts, completions, strict=True)], dtype=torch.float64)

    return Verifier("gold", "gold", score)
