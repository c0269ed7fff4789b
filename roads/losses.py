"""Hand-written training losses: pure functions of tensors (no model, no tokenizer), tested against values worked
out by hand."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid


def local_bt_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float) -> Tensor:
    """The local reward model's Bradley–Terry loss on summed log-probabilities:

        L = mean_i −log σ(β · (log π(y+_i | x_i) − log π(y−_i | x_i)))

    where ``chosen_logps`` and ``rejected_logps`` (shape (B,)) are Σ_t log π(y_t | x, y<t) over each completion's
    tokens. Reference-free: DPO's sigmoid loss without the reference policy's log-probabilities. Returns a scalar.
    """
    if chosen_logps.shape != rejected_logps.shape:
        raise ValueError(f"chosen_logps {tuple(chosen_logps.shape)} and rejected_logps "
                         f"{tuple(rejected_logps.shape)} differ in shape")
    return -logsigmoid(beta * (chosen_logps - rejected_logps)).mean()


# --------------------------------------------------------------------------- Q-SFT (Hong et al.)
REST_MASS = ("dummy", "spread")


def q_sft_targets(rewards: Tensor, next_behaviour_probs: Tensor, next_target_probs: Tensor, is_last: Tensor,
                  gamma: float, min_behaviour_prob: float) -> Tensor:
    """Q-SFT's Bellman target w(s, a) of every action token, shape (B, T), without gradient:

        w(s_t, a_t) = r                                                             at the last action (``is_last``)
        w(s_t, a_t) = γ · max_{a'} 1{π_β(a'|s_{t+1}) > ε} · p_θ̄(a'|s_{t+1}) / π_β(a'|s_{t+1})     elsewhere

    clipped to [0, 1]. The reward is paid only at the end, so r is the sequence's return; p_θ̄ / π_β is the target
    model's Q estimate (p_θ ≈ π_β · Q), and next tokens the behaviour policy gives at most ε are left out of the max.

    ``rewards``: (B,) returns in [0, 1] (or (B, T), one per token). ``next_behaviour_probs``, ``next_target_probs``:
    (B, T, V) probabilities of π_β and p_θ̄ at the NEXT state (position t + 1) of action t; their values at the last
    action are ignored. ``is_last``: (B, T) bool, the terminal action of each sequence. ``gamma``: γ;
    ``min_behaviour_prob``: ε.
    """
    if next_behaviour_probs.shape != next_target_probs.shape or next_behaviour_probs.dim() != 3:
        raise ValueError(f"next_behaviour_probs {tuple(next_behaviour_probs.shape)} and next_target_probs "
                         f"{tuple(next_target_probs.shape)} must share one (B, T, V) shape")
    if is_last.shape != next_behaviour_probs.shape[:2]:
        raise ValueError(f"is_last {tuple(is_last.shape)} is not (B, T) = {tuple(next_behaviour_probs.shape[:2])}")
    with torch.no_grad():
        behaviour, target = next_behaviour_probs.detach().float(), next_target_probs.detach().float()
        valid = behaviour > min_behaviour_prob
        ratio = torch.where(valid, target / behaviour.clamp_min(torch.finfo(torch.float32).tiny),
                            torch.zeros_like(target))
        bootstrap = gamma * ratio.max(dim=-1).values  # (B, T)
        r = rewards.detach().float().to(bootstrap.device)
        if r.dim() == 1:
            r = r[:, None].expand_as(bootstrap)
        return torch.where(is_last.bool(), r, bootstrap).clamp(0.0, 1.0)


def q_sft_loss(logits: Tensor, actions: Tensor, weights: Tensor, mask: Tensor, rest_mass: str, dummy_id: int) -> Tensor:
    """Q-SFT's weighted cross-entropy, a scalar: the mean over action tokens (``mask``) of
    CE(q, p_θ) = −Σ_v q(v) log p_θ(v), with p_θ = softmax(logits) and the target distribution

        "dummy":  q = w·onehot(a) + (1 − w)·onehot(d)
                  CE = −[w log p_θ(a) + (1 − w) log p_θ(d)]
        "spread": q = w·onehot(a) + (1 − w)/(V − 1)·(1 − onehot(a))
                  CE = −[w log p_θ(a) + (1 − w)/(V − 1)·Σ_{v≠a} log p_θ(v)]

    For one state the "dummy" loss is minimised at p_θ(a) = w, p_θ(d) = 1 − w, so p_θ(a|s) learns π_β(a|s)·Q(s, a) over
    the data. ``logits``: (B, T, V); ``actions``: (B, T) token ids; ``weights``: (B, T) targets w in [0, 1] (no
    gradient flows into them); ``mask``: (B, T), 1 on action tokens; ``dummy_id``: the token d. No action tokens: 0.
    """
    if rest_mass not in REST_MASS:
        raise ValueError(f"unknown rest_mass {rest_mass!r}; choose one of {', '.join(REST_MASS)}")
    if logits.dim() != 3 or actions.shape != logits.shape[:2] or weights.shape != actions.shape \
            or mask.shape != actions.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, T, V) and actions {tuple(actions.shape)}, "
                         f"weights {tuple(weights.shape)}, mask {tuple(mask.shape)} (B, T)")
    logp = torch.log_softmax(logits.float(), dim=-1)
    w = weights.detach().float()
    logp_action = logp.gather(-1, actions[..., None].long()).squeeze(-1)  # (B, T)
    if rest_mass == "dummy":
        rest = logp[..., dummy_id]
    else:
        rest = (logp.sum(-1) - logp_action) / (logp.shape[-1] - 1)
    per_token = -(w * logp_action + (1.0 - w) * rest)
    m = mask.float()
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def q_sft_extract_logits(behaviour_logits: Tensor, likelihood_logits: Tensor, beta: float) -> Tensor:
    """Q-SFT's extracted policy π(a|s) ∝ π_β(a|s)·exp(β·p_θ(a|s)) as logits (any shape (…, V)):

        log_softmax(behaviour_logits) + β·softmax(likelihood_logits)

    — what the composed policy ``[behaviour: log_softmax, weight 1; likelihood: softmax, weight β]`` computes."""
    return torch.log_softmax(behaviour_logits.float(), dim=-1) + beta * torch.softmax(likelihood_logits.float(), dim=-1)
