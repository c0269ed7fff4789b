"""genrm: the generative verifier (Mahan et al., "Generative Reward Models") — the language model itself reads a
judge prompt holding the prompt and two responses and writes a verdict token saying which response is better.

The judge format (:func:`judge_prompt`)::

    {prompt}\\n[A]{response a}\\n[B]{response b}\\nbetter:          → verdict "A" or "B"            (method genrm)
    {prompt}\\n[A]{response a}\\n[B]{response b}\\nwhy:             → {rationale}\\nbetter:A or …B   (star_sft, star_dpo)

The verdicts are the single characters "A" and "B": one byte each, so one token in the project's byte-level BPE
tokenizer (" A" is not: the tokenizers trained on the task text have no merge for it). :func:`verdict_ids` checks
this for whatever tokenizer the model has.

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

Scoring (:func:`compare`): d(a, b) = log p("A" | judge(a, b)) − log p("B" | judge(a, b)), the log-odds the judge
gives to a ≻ b; with a rationale model the verdict probabilities are read after a sampled rationale + "\\nbetter:".
With ``votes`` > 1, ``votes`` verdicts are sampled (each after its own rationale, for a rationale model) and the
majority share p, clipped to [1/(2·votes), 1 − 1/(2·votes)], gives d = log p/(1 − p). Both orders are scored and
compare(a, b) = (d(a, b) − d(b, a)) / 2, exactly antisymmetric (compare(a, a) = 0).

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
from roads.config import GenRmConfig, OfflineDpoConfig, StageSpec
from roads.errors import DataError, RoadsError, TrainingError
from roads.generation import encode, sample
from roads.models import load_policy
from roads.stages.offline_dpo import train_dpo
from roads.stages.reward_model import preference_metrics
from roads.stages.sft import train_sft
from roads.training import NullTracker, Tracker, write_trained
from roads.verifiers import VERIFIER_FILE

VERSION = 1
STAGE = "genrm"
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
            raise RoadsError(f"{STAGE}: the verdict {verdict!r} is not one token of this tokenizer (it encodes to "
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
            model, tokenizer = load_policy(policy)
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
                dpo_cfg = OfflineDpoConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                           max_length=cfg.max_length, logging_steps=cfg.logging_steps, data=cfg.data,
                                           beta=cfg.beta)
                dpo_cfg = fitted(dpo_cfg, tokenizer, [r["prompt"] + c for r in dpo_pairs
                                                      for c in (r["chosen"], r["rejected"])], tracker)
                metrics.update(train_dpo(STAGE, dpo_cfg, seed, policy, dpo_pairs, round_dir, tracker,
                                         reference=start))
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
        model, tokenizer = load_policy(start)
        verdict_ids(tokenizer)
        rows = label_rows(pairs)
        train_cfg = fitted(cfg, tokenizer, [r["prompt"] + r["completion"] for r in rows], tracker)
        metrics = train_sft(STAGE, train_cfg, spec.seed, model, tokenizer, rows, out_dir, tracker)
    else:
        metrics, rounds = train_star(cfg, spec.seed, start, pairs, out_dir, tracker)
        write_json(out_dir / "star.json", rounds)
        files.append("star.json")
    write_trained(out_dir, len(pairs), STAGE)  # preference pairs, as the other verifiers count them
    write_json(out_dir / VERIFIER_FILE, {"kind": "generative", "votes": cfg.votes, "rationale": rationale,
                                         "rationale_tokens": cfg.rationale_tokens, "temperature": cfg.temperature})

    model, tokenizer = load_policy(out_dir)
    if torch.cuda.is_available():
        model = model.to("cuda")
    margin = compare(model, tokenizer, [r["prompt"] for r in val], [r["chosen"] for r in val],
                     [r["rejected"] for r in val], rationale=rationale, votes=cfg.votes,
                     rationale_tokens=cfg.rationale_tokens, temperature=cfg.temperature,
                     batch_size=cfg.val_batch_size)
    val_metrics = {f"{STAGE}/val_{k}": v for k, v in preference_metrics(margin, torch.zeros_like(margin)).items()}
    for key, value in val_metrics.items():
        if not math.isfinite(value):
            raise TrainingError(f"{STAGE}: held-out {key} is {value}; lower {STAGE}.lr — nothing was cached")
    metrics.update(val_metrics)
    tracker.log_metrics(val_metrics)
    tracker.progress(f"held-out accuracy {val_metrics[f'{STAGE}/val_accuracy']:.3f}, "
                     f"log-likelihood {val_metrics[f'{STAGE}/val_loglik']:.4f}")
    write_json(out_dir / "validation.json", {k.removeprefix(f"{STAGE}/val_"): round(v, 6) for k, v in val_metrics.items()})
    return StageResult(metrics=metrics, files=files)
