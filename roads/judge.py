"""The generative judge (Mahan et al., "Generative Reward Models"): a language model reads a judge prompt holding the
prompt and two responses and writes a verdict token saying which response is better. Its format and its scoring,
shared by the ``genrm`` stage (which trains judges) and ``roads.verifiers`` (which loads them).

The judge format (:func:`judge_prompt`)::

    {prompt}\\n[A]{response a}\\n[B]{response b}\\nbetter:          → verdict "A" or "B"            (method genrm)
    {prompt}\\n[A]{response a}\\n[B]{response b}\\nwhy:             → {rationale}\\nbetter:A or …B   (star_sft, star_dpo)

The verdicts are the single characters "A" and "B": one byte each, so one token in the project's byte-level BPE
tokenizer (" A" is not: the tokenizers trained on the task text have no merge for it). :func:`verdict_ids` checks
this for whatever tokenizer the model has.

Scoring (:func:`compare`): d(a, b) = log p("A" | judge(a, b)) − log p("B" | judge(a, b)), the log-odds the judge
gives to a ≻ b; with a rationale model the verdict probabilities are read after a sampled rationale + "\\nbetter:".
With ``votes`` > 1, ``votes`` verdicts are sampled (each after its own rationale, for a rationale model) and the
majority share p, clipped to [1/(2·votes), 1 − 1/(2·votes)], gives d = log p/(1 − p). Both orders are scored and
compare(a, b) = (d(a, b) − d(b, a)) / 2, exactly antisymmetric (compare(a, a) = 0).
"""

from __future__ import annotations

import torch

from roads.errors import RoadsError
from roads.generation import encode, sample

VERDICTS = ("A", "B")  # response a is better, response b is better
ANSWER = "\nbetter:"  # what the verdict follows
WHY = "\nwhy:"  # what the rationale follows (rationale models)
VERIFIER_SEED = 0  # the seed of rationale and vote sampling when scoring (stage validation and load_verifier alike)


# --------------------------------------------------------------------------- the judge format


def judge_prompt(prompt: str, a: str, b: str, rationale: bool = False) -> str:
    """The judge's input: the prompt, response a as [A], response b as [B], then the cue of the verdict (or, for a
    rationale model, of the rationale)."""
    return f"{prompt}\n[A]{a}\n[B]{b}{WHY if rationale else ANSWER}"


def verdict_ids(tokenizer) -> tuple[int, int]:
    """Token ids of the verdicts "A" and "B". Each must be one token, also right after the answer cue (the trainers
    tokenise judge prompt + verdict together); otherwise a RoadsError."""
    cue = encode(tokenizer, [ANSWER])[0]
    ids = []
    for verdict in VERDICTS:
        alone, after_cue = encode(tokenizer, [verdict, ANSWER + verdict])
        if len(alone) != 1 or after_cue != cue + alone:
            raise RoadsError(f"genrm: the verdict {verdict!r} is not one token of this tokenizer (it encodes to "
                             f"{alone}, and after {ANSWER!r} to {after_cue[len(cue):]}); a generative verifier needs a "
                             "byte-level tokenizer")
        ids.append(alone[0])
    return ids[0], ids[1]


def split_judgement(text: str) -> tuple[str, str | None]:
    """(rationale, verdict) of a sampled judgement: the verdict is the character after the last answer cue, when it
    is "A" or "B"; the rationale is everything before that cue. Without a cue: (the whole text, None)."""
    at = text.rfind(ANSWER)
    if at < 0:
        return text, None
    verdict = text[at + len(ANSWER):][:1]
    return text[:at], verdict if verdict in VERDICTS else None


def judgement_tokens(tokenizer, rationale_tokens: int) -> int:
    """Sampling limit of one judgement: the rationale, the answer cue, the verdict and EOS."""
    return rationale_tokens + len(encode(tokenizer, [ANSWER])[0]) + 2


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def verdict_logps(model, tokenizer, contexts: list[str], batch_size: int = 64) -> torch.Tensor:
    """log p("A" | context) and log p("B" | context) (full-vocabulary softmax at the context's end), shape (N, 2)."""
    model.eval()
    device = next(model.parameters()).device
    wanted = torch.tensor(verdict_ids(tokenizer))
    out = []
    encoded = encode(tokenizer, contexts)
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start:start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # right padding: positions are 0, 1, … as in training
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        last = logits[torch.arange(len(rows), device=device), torch.tensor([len(r) - 1 for r in rows], device=device)]
        out.append(torch.log_softmax(last, dim=-1)[:, wanted.to(device)].cpu())
    return torch.cat(out) if out else torch.zeros((0, 2))


def judge_log_odds(model, tokenizer, prompts: list[str], first: list[str], second: list[str], *, rationale: bool,
                   votes: int, rationale_tokens: int, temperature: float, seed: int,
                   batch_size: int = 64) -> torch.Tensor:
    """d(first, second) per row: the judge's log-odds that ``first`` (shown as A) beats ``second`` (shown as B), in
    this order only (not antisymmetric). Shape (N,), float64."""
    n = len(prompts)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    judges = [judge_prompt(p, a, b, rationale) for p, a, b in zip(prompts, first, second, strict=True)]
    if rationale:
        groups = sample(model, tokenizer, judges, n=votes, max_new_tokens=judgement_tokens(tokenizer, rationale_tokens),
                        temperature=temperature, seed=seed, batch_size=batch_size)
        contexts = [j + split_judgement(c.text)[0] + ANSWER for j, group in zip(judges, groups) for c in group]
        logps = verdict_logps(model, tokenizer, contexts, batch_size).view(n, votes, 2)
    else:  # the verdict probabilities do not change between votes
        logps = verdict_logps(model, tokenizer, judges, batch_size).view(n, 1, 2).expand(n, votes, 2)
    diff = (logps[..., 0] - logps[..., 1]).to(torch.float64)  # (n, votes)
    if votes == 1:
        return diff[:, 0]
    p_a = torch.sigmoid(diff / temperature)  # the verdict distribution restricted to {A, B}, at the temperature
    uniform = torch.rand((n, votes), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    share = (uniform < p_a).to(torch.float64).mean(1).clamp(0.5 / votes, 1 - 0.5 / votes)
    return torch.log(share) - torch.log1p(-share)


def compare(model, tokenizer, prompts: list[str], a: list[str], b: list[str], *, rationale: bool = False,
            votes: int = 1, rationale_tokens: int = 16, temperature: float = 1.0, seed: int = VERIFIER_SEED,
            batch_size: int = 64) -> torch.Tensor:
    """The judge's log-odds that a ≻ b for each row, (d(a, b) − d(b, a)) / 2, shape (N,), float64.

    Exactly antisymmetric: each pair is judged in a canonical order (the smaller string first) and in the other, so
    compare(b, a) computes the very same numbers as compare(a, b) and negates them; identical responses get 0."""
    if not len(prompts) == len(a) == len(b):
        raise ValueError(f"{len(prompts)} prompts, {len(a)} and {len(b)} responses")
    out = torch.zeros(len(prompts), dtype=torch.float64)
    rows = [i for i in range(len(prompts)) if a[i] != b[i]]
    if not rows:
        return out
    sign = torch.tensor([1.0 if a[i] < b[i] else -1.0 for i in rows], dtype=torch.float64)
    x = [min(a[i], b[i]) for i in rows]
    y = [max(a[i], b[i]) for i in rows]
    p = [prompts[i] for i in rows]
    d = judge_log_odds(model, tokenizer, p + p, x + y, y + x, rationale=rationale, votes=votes,
                       rationale_tokens=rationale_tokens, temperature=temperature, seed=seed, batch_size=batch_size)
    m = len(rows)
    out[rows] = sign * ((d[:m] - d[m:]) / 2)
    return out
