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

**The labels' Bayes ceiling** (``bayes_ceiling``, ``headroom``; defined in the torch-free :mod:`roads.ceiling`, so
that prepare_data can compute it without reaching the sampler, and re-exported here): the gold reward as a verifier,
the ceiling every learnt verifier is read against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from roads.artifacts import read_json
from roads.ceiling import (CHANCE_ACCURACY, CHANCE_LOGLIK, bayes_ceiling, headroom,  # noqa: F401  (re-exported)
                           label_probability, log_sigmoid)
from roads.errors import RoadsError
from roads.generation import encode, reward_scores, sequence_logps
from roads.judge import compare as judge_compare

KINDS = ("global", "local", "implicit", "generative", "gold")
VERIFIER_FILE = "verifier.json"


def completion_ids(tokenizer, completions: list[str]) -> list[list[int]]:
    """Token ids of each completion followed by EOS, as DPO and the local reward model train on them."""
    return [ids + [tokenizer.eos_token_id] for ids in encode(tokenizer, completions)]


def summed_logps(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 64) -> torch.Tensor:
    """Σ_t log π(y_t | x, y<t) over completion + EOS, shape (N,)."""
    return sequence_logps(model, encode(tokenizer, prompts), completion_ids(tokenizer, completions),
                          pad_id=tokenizer.pad_token_id, batch_size=batch_size)


def same_text(a: Sequence[str], b: Sequence[str]) -> list[bool]:
    """Which pairs (a[i], b[i]) are the same text: a verifier's margin on such a pair is exactly 0, whatever float
    noise its two scores carry (the same text scored in two batches of different padding differs in the last bits,
    and on 2-token responses a sixth of the pairs are such — enough to move an accuracy by 0.04 from run to run)."""
    return [x == y for x, y in zip(a, b, strict=True)]


def tie_identical(margin: torch.Tensor, identical: Optional[Sequence[bool]]) -> torch.Tensor:
    """``margin`` with the entries of identical pairs set to exactly 0 (see :func:`same_text`)."""
    if identical is None or not any(identical):
        return margin
    return margin.masked_fill(torch.tensor(list(identical), dtype=torch.bool, device=margin.device), 0.0)


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor,
                       identical: Optional[Sequence[bool]] = None) -> dict[str, float]:
    """Accuracy (ties count half) and mean log-likelihood log σ(r+ − r−) of the labels under a verifier. ``identical``
    marks pairs whose chosen and rejected texts are the same: their margin is 0, a tie (:func:`same_text`)."""
    margin = tie_identical(chosen - rejected, identical)
    accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
    return {
        "accuracy": float(accuracy),
        "loglik": float(torch.nn.functional.logsigmoid(margin).mean()),
        "margin": float(margin.mean()),
    }


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
