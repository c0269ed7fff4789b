"""ivl: inverse value learning (Lu et al., NAACL 2025; papers.md §4) — learn post-training as a change of logits.
A small value network g is trained on top of a frozen base f with the residual connection logits = f(x<t) + g(x<t):
next-token cross-entropy on the completions plus an L1 penalty l1 · mean_t ‖g(x<t)‖₁/|V| on the residual logits
(keeping g small, so it transfers). At inference g is added to the logits of *another* base with the same vocabulary
(the target: a larger preset or another seed), with no mixing coefficient: a transfer of post-training.

g is a fresh causal LM of ``value_preset`` on the base's tokenizer whose output head starts at exactly zero (the
preset's tied embeddings are untied first: the head gets its own zero weight, the input embeddings keep their random
initialisation), so at initialisation base + value == base exactly. The loop is written out (the paper's residual
model is not a TRL trainer): AdamW with linear decay to 0, rows shuffled each epoch from the seed, gradients clipped at
norm 1; the base is frozen (eval mode, no gradients).

Inputs: ``data`` (a prepare_data folder: the chosen responses of ``pairs_train.jsonl``, or the demonstrations of
``sft.jsonl``), ``base`` (the SFT folder the value network is trained with) and ``target`` (the SFT folder it is added
to). Output: a composed policy (``policy.json``, see :class:`roads.models.ComposedLM`) of ``target/`` (a copy of the
target base, so the policy's digest covers every weight it uses) + ``value/`` (the value network and tokenizer), both
with transform ``logits`` and weight 1, and ``trained.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from roads.artifacts import ArtifactRef, StageResult, read_jsonl
from roads.config import StageSpec
from roads.settings import IvlConfig
from roads.errors import DataError, RoadsError
from roads.generation import encode
from roads.models import count_parameters, load_policy, new_causal_lm, write_composed
from roads.training import NullTracker, Tracker, check_finite, write_trained, train_loop
from roads.verifiers import completion_ids

VERSION = 1
STAGE = "ivl"


def ivl_loss(base_logits: torch.Tensor, value_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             l1: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual model's loss, as (loss, ce, penalty) with loss = ce + l1 · penalty.

    Logits are (B, T, V) and already aligned with ``labels`` (B, T): position t predicts ``labels[:, t]``; ``mask``
    (B, T) marks the positions that count (the completion's tokens). ce is the mean over those positions of
    −log softmax(base_logits + value_logits)[label]; penalty the mean over the same positions of ‖value_logits_t‖₁/V.
    A batch with no counted position gives 0 for both (not NaN)."""
    if base_logits.shape != value_logits.shape:
        raise ValueError(f"base logits {tuple(base_logits.shape)} and value logits {tuple(value_logits.shape)} differ")
    weight = mask.float()
    count = weight.sum().clamp(min=1.0)
    logp = torch.log_softmax(base_logits.float() + value_logits.float(), dim=-1)
    nll = -logp.gather(-1, labels[..., None]).squeeze(-1)  # (B, T)
    ce = (nll * weight).sum() / count
    penalty = (value_logits.float().abs().mean(-1) * weight).sum() / count  # ‖g_t‖₁ / V per position
    return ce + l1 * penalty, ce, penalty


def zero_value_head(model) -> None:
    """Untie the output head from the input embeddings and set it to zero: the value network's logits are then exactly
    0 (h·0 = 0 for finite hidden states), so base + value == base until training moves the head."""
    model.config.tie_word_embeddings = False
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.zeros_like(head.weight))
    if getattr(head, "bias", None) is not None:
        head.bias = torch.nn.Parameter(torch.zeros_like(head.bias))


def new_value_network(preset: str, tokenizer, seed: int, max_positions: int = 256):
    """A fresh causal LM of ``preset`` on ``tokenizer`` (the base's vocabulary) with a zero, untied output head."""
    model = new_causal_lm(preset, tokenizer, seed=seed, max_positions=max_positions)
    zero_value_head(model)
    return model


def training_rows(data: Path, train_on: str) -> list[dict]:
    """Prompt/completion rows: the chosen responses of the training pairs, or the SFT demonstrations."""
    if train_on == "chosen":
        return [{"prompt": r["prompt"], "completion": r["chosen"]} for r in read_jsonl(data / "pairs_train.jsonl")]
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_jsonl(data / "sft.jsonl")]


def batch_tensors(prompt_ids: list[list[int]], completion_ids: list[list[int]], *, pad_id: int, max_length: int,
                  device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels, label_mask): prompt + completion cut to ``max_length`` tokens (the
    completion's end goes first), right-padded; labels and label_mask are shifted by one (position t predicts token
    t + 1), label_mask marks completion tokens."""
    seqs = [(list(p) + list(c))[:max_length] for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        target[i, len(p): len(s)] = True
    return ids.to(device), mask.to(device), ids[:, 1:].to(device), target[:, 1:].to(device)


@torch.no_grad()
def mean_ce(base, value, prompt_ids: list[list[int]], completion_ids: list[list[int]], *, pad_id: int,
            max_length: int, batch_size: int) -> float:
    """Mean next-token cross-entropy per completion token of base + value (``value`` None: the base alone)."""
    device = next(base.parameters()).device
    total, count = 0.0, 0.0
    for start in range(0, len(prompt_ids), batch_size):
        ids, attention, labels, label_mask = batch_tensors(
            prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size], pad_id=pad_id,
            max_length=max_length, device=device)
        base_logits = base(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        value_logits = (value(input_ids=ids, attention_mask=attention).logits[:, :-1].float() if value is not None
                        else torch.zeros_like(base_logits))
        _, ce, _ = ivl_loss(base_logits, value_logits, labels, label_mask, 0.0)
        n = float(label_mask.sum())
        total += float(ce) * n
        count += n
    return total / count if count else float("nan")


def train_value(cfg: IvlConfig, seed: int, base, value, tokenizer, rows: list[dict],
                tracker: Tracker = NullTracker()) -> dict[str, float]:
    """Train ``value`` in place on ``rows`` (prompt/completion) with ``base`` frozen; returns the training metrics."""
    if not rows:
        raise DataError(f"{STAGE}: no training rows")
    prompts = encode(tokenizer, [r["prompt"] for r in rows])
    completions = completion_ids(tokenizer, [r["completion"] for r in rows])
    pad_id, device = tokenizer.pad_token_id, next(value.parameters()).device
    base.eval()
    base.requires_grad_(False)

    def step_loss(batch: list[int]):
        ids, attention, labels, label_mask = batch_tensors(
            [prompts[i] for i in batch], [completions[i] for i in batch], pad_id=pad_id,
            max_length=cfg.max_length, device=device)
        with torch.no_grad():
            base_logits = base(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        value_logits = value(input_ids=ids, attention_mask=attention).logits[:, :-1]
        loss, ce, penalty = ivl_loss(base_logits, value_logits, labels, label_mask, cfg.l1)
        return loss, {"ce": float(ce.detach()), "penalty": float(penalty.detach())}

    return train_loop(STAGE, cfg, seed, value, len(rows), step_loss, tracker)


def run(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: Path, tracker: Tracker = NullTracker()) -> StageResult:
    cfg: IvlConfig = spec.config()
    rows = training_rows(Path(inputs["data"].path), cfg.train_on)
    base, tokenizer = load_policy(inputs["base"].path)
    target, target_tokenizer = load_policy(inputs["target"].path)
    if target_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise RoadsError(f"{STAGE}: the base ({inputs['base'].path}) and the target ({inputs['target'].path}) have "
                         "different vocabularies; the value network's logits can only be added to a base with the "
                         "same tokenizer (build both SFT models from the same data, or with the same pretrained family)")
    value = new_value_network(cfg.value_preset, tokenizer, seed=spec.seed, max_positions=max(256, cfg.max_length))
    if torch.cuda.is_available():
        base, target, value = base.to("cuda"), target.to("cuda"), value.to("cuda")
    tracker.progress(f"value network: {count_parameters(value):,} parameters ({cfg.value_preset}); "
                     f"{len(rows)} training rows ({cfg.train_on}), l1 = {cfg.l1}")
    metrics = train_value(cfg, spec.seed, base, value, tokenizer, rows, tracker)
    check_finite(value, STAGE)

    value_dir = out_dir / "value"
    value.save_pretrained(value_dir)
    tokenizer.save_pretrained(value_dir)
    shutil.copytree(inputs["target"].path, out_dir / "target")
    write_composed(out_dir, [{"path": "target", "transform": "logits", "weight": 1.0},
                             {"path": "value", "transform": "logits", "weight": 1.0}])
    write_trained(out_dir, len(rows), STAGE)

    # evidence the value network learnt something: the training rows' cross-entropy with and without it
    prompts = encode(tokenizer, [r["prompt"] for r in rows])
    completions = completion_ids(tokenizer, [r["completion"] for r in rows])
    kw = dict(pad_id=tokenizer.pad_token_id, max_length=cfg.max_length, batch_size=cfg.batch_size)
    ce = {f"{STAGE}/train_ce_on_base": mean_ce(base, value, prompts, completions, **kw),
          f"{STAGE}/train_ce_base_alone": mean_ce(base, None, prompts, completions, **kw),
          f"{STAGE}/train_ce_on_target": mean_ce(target, value, prompts, completions, **kw),
          f"{STAGE}/train_ce_target_alone": mean_ce(target, None, prompts, completions, **kw)}
    metrics.update(ce)
    metrics[f"{STAGE}/value_parameters"] = float(count_parameters(value))
    tracker.log_metrics(ce, step=int(metrics[f"{STAGE}/steps"]))
    tracker.progress(f"training CE: base {ce[f'{STAGE}/train_ce_base_alone']:.4f} → base + value "
                     f"{ce[f'{STAGE}/train_ce_on_base']:.4f}; target {ce[f'{STAGE}/train_ce_target_alone']:.4f} → "
                     f"target + value {ce[f'{STAGE}/train_ce_on_target']:.4f}")
    return StageResult(metrics=metrics, files=[])
