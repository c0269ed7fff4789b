"""q_sft: Q-SFT (Hong et al.) — offline value-based RL by supervised fine-tuning. A behaviour policy π_β is SFT on
every response of the preference pairs; a likelihood model p_θ (the SFT language model itself, no new heads) is
trained with a cross-entropy whose target puts weight w on the taken token, so that p_θ(a|s) ≈ π_β(a|s)·Q(s, a); a
target copy θ̄ is Polyak-averaged, θ̄ ← (1 − α)θ̄ + αθ, after every step.

Token-level MDP: the state is prompt + completion prefix, the action the next completion token (completion + EOS, as
``roads.verifiers.completion_ids`` tokenises it), and the only reward is the sequence's return at its last token:
1 for a chosen and 0 for a rejected response (``reward: preferences``) or σ(r(x, y)) of the reward model input
``verifier`` (``reward: reward_model``). Bellman target (``roads.losses.q_sft_targets``), clipped to [0, 1]:

    w = r at the last token,  else  γ · max_{a'} 1{π_β(a'|s') > ε} · p_θ̄(a'|s') / π_β(a'|s')

Where the rest 1 − w of the target goes (``rest_mass``): ``dummy`` — all of it on one dummy token, here the
tokenizer's pad token (a token no completion contains; a pretrained tokenizer whose pad is its EOS makes EOS the dummy);
``spread`` — evenly over the other V − 1 tokens. A sequence cut at ``max_length`` ends at its last kept token, which
then receives the return. Extraction: π(a|s) ∝ π_β(a|s)·exp(β·p_θ(a|s)), logits log_softmax(π_β) + β·softmax(p_θ).
The likelihood loop is written out (AdamW, linear decay to 0, responses shuffled each epoch from the seed, gradients
clipped at norm 1); the behaviour policy is trained with TRL's SFTTrainer (``behaviour_epochs``, the same lr and
batch size).

Inputs: ``data`` (``pairs_train.jsonl``), ``sft`` (the model both start from) and, with ``reward: reward_model``,
``verifier`` (a reward_model output). Output: a composed policy — ``behaviour/`` and ``likelihood/`` (each a model and
tokenizer), ``policy.json`` (behaviour log_softmax weight 1, likelihood softmax weight β) and ``trained.json``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from roads.artifacts import ArtifactRef, StageResult, read_jsonl
from roads.config import StageSpec
from roads.settings import QSftConfig, TrainConfig
from roads.errors import DataError, RoadsError
from roads.generation import encode
from roads.losses import q_sft_loss, q_sft_targets
from roads.models import load_policy, write_composed
from roads.sft_trainer import train_sft
from roads.training import NullTracker, Tracker, check_finite, write_trained, train_loop
from roads.verifiers import completion_ids, load_verifier

VERSION = 1
STAGE = "q_sft"


def responses(rows: list[dict]) -> list[dict]:
    """Every response of the pairs as {prompt, completion, chosen}: each pair's chosen, then its rejected."""
    out = []
    for r in rows:
        out.append({"prompt": r["prompt"], "completion": r["chosen"], "chosen": True})
        out.append({"prompt": r["prompt"], "completion": r["rejected"], "chosen": False})
    return out


def response_returns(cfg: QSftConfig, items: list[dict], inputs: dict[str, ArtifactRef]) -> torch.Tensor:
    """The return of each response, shape (N,), in [0, 1]: 1 chosen / 0 rejected, or σ(reward model score)."""
    if cfg.reward == "preferences":
        return torch.tensor([1.0 if it["chosen"] else 0.0 for it in items])
    if "verifier" not in inputs:
        raise RoadsError(f"{STAGE}: reward 'reward_model' needs the input 'verifier' (a reward_model output)")
    verifier = load_verifier("reward_model", inputs["verifier"].path)
    scores = verifier.score([it["prompt"] for it in items], [it["completion"] for it in items])
    return torch.sigmoid(scores.float().cpu())


def token_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], *, pad_id: int, max_length: int):
    """Right-padded (ids, attention) of shape (B, W), and over the W − 1 predicted positions (logits t predicts token
    t + 1): the action mask (completion tokens) and ``is_last`` (each row's last kept token), both (B, W − 1) bool.
    Each prompt + completion is cut to ``max_length`` tokens (the completion's end goes first)."""
    seqs = [(list(p) + list(c))[:max_length] for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(2, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    action = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    is_last = torch.zeros_like(action)
    for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
        first = max(len(p), 1)  # token j is predicted at position j − 1; the very first token has no state
        if len(s) > first:
            action[i, first - 1: len(s) - 1] = True
            is_last[i, len(s) - 2] = True
    return ids, attention, action, is_last


@torch.no_grad()
def polyak_update(target: torch.nn.Module, model: torch.nn.Module, alpha: float) -> None:
    """θ̄ ← (1 − α)θ̄ + αθ for every parameter."""
    for t, p in zip(target.parameters(), model.parameters(), strict=True):
        t.lerp_(p.detach(), alpha)


def train_likelihood(cfg: QSftConfig, seed: int, model, target, behaviour, tokenizer, prompts: list[list[int]],
                     completions: list[list[int]], returns: torch.Tensor,
                     tracker: Tracker = NullTracker()) -> dict[str, float]:
    """Train the likelihood model ``model`` in place (and its target copy ``target`` by Polyak averaging) on the
    responses; ``behaviour`` stays frozen. Returns the final training metrics."""
    n = len(prompts)
    if n == 0:
        raise DataError(f"{STAGE}: no training responses")
    device = next(model.parameters()).device
    for frozen in (behaviour, target):
        frozen.eval()
        frozen.requires_grad_(False)

    def step_loss(batch: list[int]):
        ids, attention, action, is_last = (t.to(device) for t in token_batch(
            [prompts[i] for i in batch], [completions[i] for i in batch], pad_id=tokenizer.pad_token_id,
            max_length=cfg.max_length))
        with torch.no_grad():
            next_behaviour = torch.softmax(behaviour(input_ids=ids, attention_mask=attention).logits.float()[:, 1:],
                                           dim=-1)
            next_target = torch.softmax(target(input_ids=ids, attention_mask=attention).logits.float()[:, 1:], dim=-1)
            weights = q_sft_targets(returns[batch].to(device), next_behaviour, next_target, is_last, cfg.gamma,
                                    cfg.min_behaviour_prob)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        loss = q_sft_loss(logits, ids[:, 1:], weights, action, cfg.rest_mass, tokenizer.pad_token_id)
        weight_mean = float(weights[action].mean()) if bool(action.any()) else 0.0
        return loss, {"weight_mean": weight_mean}

    return train_loop(STAGE, cfg, seed, model, n, step_loss, tracker,
                      after_step=lambda: polyak_update(target, model, cfg.polyak))


class _Behaviour:
    """The behaviour SFT's reports under ``q_sft/behaviour_<name>`` (so they do not mix with the likelihood loop's)."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics(behaviour_names(metrics), step=step)

    def progress(self, message: str) -> None:
        self.tracker.progress(f"behaviour {message}")


def behaviour_names(metrics: dict[str, float]) -> dict[str, float]:
    return {k.replace(f"{STAGE}/", f"{STAGE}/behaviour_", 1): v for k, v in metrics.items()}


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: QSftConfig = spec.config()
    out_dir = Path(out_dir)
    items = responses(read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl"))
    if not items:
        raise DataError(f"{STAGE}: {Path(inputs['data'].path) / 'pairs_train.jsonl'} has no pairs")
    returns = response_returns(cfg, items, inputs)
    tracker.progress(f"{len(items)} responses, mean return {float(returns.mean()):.3f}, γ = {cfg.gamma}, "
                     f"β = {cfg.beta}, rest mass {cfg.rest_mass}")

    # (a) the behaviour policy: SFT on every response
    behaviour, tokenizer = load_policy(inputs["sft"].path)
    behaviour_cfg = TrainConfig(epochs=cfg.behaviour_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                max_length=cfg.max_length, logging_steps=cfg.logging_steps)
    metrics = behaviour_names(train_sft(STAGE, behaviour_cfg, spec.seed, behaviour, tokenizer,
                                        [{"prompt": it["prompt"], "completion": it["completion"]} for it in items],
                                        out_dir / "behaviour", _Behaviour(tracker)))

    # (b) the likelihood model, from the SFT model, and its target copy
    model, _ = load_policy(inputs["sft"].path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, behaviour = model.to(device), behaviour.to(device)
    target = copy.deepcopy(model)
    prompts = encode(tokenizer, [it["prompt"] for it in items])
    completions = completion_ids(tokenizer, [it["completion"] for it in items])
    metrics.update(train_likelihood(cfg, spec.seed, model, target, behaviour, tokenizer, prompts, completions,
                                    returns, tracker))
    check_finite(model, STAGE)
    model.save_pretrained(out_dir / "likelihood")
    tokenizer.save_pretrained(out_dir / "likelihood")

    # (c) the extracted policy π ∝ π_β·exp(β·p_θ)
    write_composed(out_dir, [{"path": "behaviour", "transform": "log_softmax", "weight": 1.0},
                             {"path": "likelihood", "transform": "softmax", "weight": cfg.beta}])
    write_trained(out_dir, len(items), STAGE)
    metrics.update({f"{STAGE}/responses": float(len(items)), f"{STAGE}/mean_return": float(returns.mean())})
    return StageResult(metrics=metrics, files=[])
