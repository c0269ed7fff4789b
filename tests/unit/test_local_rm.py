"""The local reward model: its Bradley–Terry loss on summed log-probabilities against hand-computed values, the
differentiable log-probabilities against the no-grad ones verifiers score with, and the ``local_rm`` stage on tiny
data (outputs, the verifier it leaves, determinism, a learning rate that blows up)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import roads.stages.local_rm as local_rm
from roads.artifacts import read_json, read_jsonl
from roads.config import StageSpec
from roads.settings import LocalRmConfig
from roads.errors import TrainingError
from roads.generation import encode, sequence_logps
from roads.losses import local_bt_loss
from roads.models import load_policy
from roads.runner import execute
from roads.verifiers import completion_ids, load_verifier, summed_logps
from support import Recorder, differs, weights, tiny_data, tiny_sft

N_PAIRS, FRACTION, BATCH, BETA = 12, 0.5, 4, 0.5  # 6 training pairs: 2 optimiser steps


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- the loss


def test_local_bt_loss_hand_computed():
    loss = local_bt_loss(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]), beta=2.0)
    expected = (math.log(2.0) + -math.log(sigmoid(2.0))) / 2  # −log σ(0) = log 2; −log σ(2·1)
    assert loss.shape == ()
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # β scales the margin: β = 0.5 on a margin of 4 is β = 2 on a margin of 1
    assert float(local_bt_loss(torch.tensor([4.0]), torch.tensor([0.0]), beta=0.5)) == pytest.approx(
        -math.log(sigmoid(2.0)), rel=1e-6)
    # log-probabilities are negative; only the difference counts
    assert float(local_bt_loss(torch.tensor([-7.0]), torch.tensor([-4.0]), beta=1.0)) == pytest.approx(
        -math.log(sigmoid(-3.0)), rel=1e-6)


def test_local_bt_loss_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-3.0, -1.0], requires_grad=True)
    rejected = torch.tensor([-2.0, -5.0], requires_grad=True)
    beta = 0.7
    local_bt_loss(chosen, rejected, beta).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    for i, margin in enumerate([-1.0, 4.0]):  # dL/dchosen_i = −β σ(−β·margin_i) / B
        assert float(chosen.grad[i]) == pytest.approx(-beta * sigmoid(-beta * margin) / 2, rel=1e-5)
        assert float(rejected.grad[i]) == pytest.approx(-float(chosen.grad[i]), rel=1e-6)


def test_local_bt_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        local_bt_loss(torch.zeros(2), torch.zeros(3), beta=1.0)


# --------------------------------------------------------------------------- tiny data and an SFT model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    data = tiny_data(store, N_PAIRS, n_val_pairs=6)
    return {"data": data, "sft": tiny_sft(store, data)}


def spec(seed: int = 0, **params) -> StageSpec:
    cfg = LocalRmConfig(**{"epochs": 1, "batch_size": BATCH, "pair_fraction": FRACTION, "beta": BETA,
                           "logging_steps": 1, **params})
    return StageSpec(stage="local_rm", params=cfg.model_dump(), seed=seed)


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    tracker = Recorder()
    result = execute(spec(), inputs, tmp_path_factory.mktemp("rm-store"), tracker)
    return result, tracker


# --------------------------------------------------------------------------- differentiable log-probabilities


def test_differentiable_logps_match_the_verifier_logps(inputs):
    model, tokenizer = load_policy(inputs["sft"].path)
    rows = read_jsonl(Path(inputs["data"].path) / "pairs_val.jsonl")
    prompts, chosen, _ = local_rm.pair_ids(tokenizer, rows)
    assert prompts == encode(tokenizer, [r["prompt"] for r in rows])
    assert chosen == completion_ids(tokenizer, [r["chosen"] for r in rows])
    assert all(c[-1] == tokenizer.eos_token_id for c in chosen)
    reference = sequence_logps(model, prompts, chosen, pad_id=tokenizer.pad_token_id)
    model.train()
    with_grad = local_rm.summed_logps_with_grad(model, prompts, chosen, pad_id=tokenizer.pad_token_id, max_length=256)
    assert with_grad.requires_grad and with_grad.shape == (len(rows),)
    assert torch.allclose(with_grad.detach(), reference, atol=1e-4)
    # truncation cuts the completion's end: the same as scoring the shortened completion
    truncated = local_rm.summed_logps_with_grad(model, prompts[:1], chosen[:1], pad_id=tokenizer.pad_token_id,
                                                max_length=len(prompts[0]) + 2)
    short = sequence_logps(model, prompts[:1], [chosen[0][:2]], pad_id=tokenizer.pad_token_id)
    assert torch.allclose(truncated.detach(), short, atol=1e-4)


# --------------------------------------------------------------------------- the stage


def test_stage_outputs(trained, inputs):
    result, tracker = trained
    out = Path(result.artifact.path)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trained.json", "verifier.json",
                 "validation.json"):
        assert (out / name).is_file(), name
    assert read_json(out / "verifier.json") == {"kind": "local", "beta": BETA}
    n_pairs = len(read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl"))
    assert read_json(out / "trained.json")["train_examples"] == round(n_pairs * FRACTION)
    assert result.files == ["validation.json"]
    assert set(read_json(out / "validation.json")) == {"accuracy", "loglik", "margin"}


def test_stage_trains_and_reports(trained, inputs):
    result, tracker = trained
    m = result.metrics
    for key in ("local_rm/loss", "local_rm/val_accuracy", "local_rm/val_loglik", "local_rm/val_margin"):
        assert key in m, key
    assert all(math.isfinite(v) for v in m.values())
    assert 0.0 <= m["local_rm/val_accuracy"] <= 1.0 and m["local_rm/val_loglik"] <= 0.0
    assert m["local_rm/loss"] > 0.0
    assert differs(weights(result.artifact.path), weights(inputs["sft"].path))
    # logging_steps = 1: one training log per step, then the held-out metrics
    steps = [step for logs, step in tracker.logs if "local_rm/loss" in logs]
    assert steps == [1, 2]
    assert any(msg.startswith("step 2/2 loss ") for msg in tracker.messages)
    validation = read_json(Path(result.artifact.path) / "validation.json")
    assert validation["accuracy"] == pytest.approx(m["local_rm/val_accuracy"], abs=1e-6)


def test_the_saved_verifier_scores_beta_times_summed_logps(trained, inputs):
    result, _ = trained
    out = result.artifact.path
    rows = read_jsonl(Path(inputs["data"].path) / "pairs_val.jsonl")
    prompts, completions = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    verifier = load_verifier("local_rm", out)
    assert verifier.kind == "local" and verifier.train_examples == round(N_PAIRS * FRACTION)
    model, tokenizer = load_policy(out)
    expected = BETA * summed_logps(model, tokenizer, prompts, completions)
    assert torch.allclose(verifier.score(prompts, completions), expected)
    # and the held-out metrics are those of this verifier
    rejected = verifier.score(prompts, [r["rejected"] for r in rows])
    assert float((verifier.score(prompts, completions) - rejected).mean()) == pytest.approx(
        result.metrics["local_rm/val_margin"], abs=1e-4)


def test_stage_is_deterministic(trained, inputs, tmp_path):
    again = execute(spec(), inputs, tmp_path / "again")
    assert again.artifact.digest == trained[0].artifact.digest
    other = execute(spec(seed=1), inputs, tmp_path / "seed1")  # another shuffle of the pairs
    assert other.artifact.digest != again.artifact.digest


def test_training_leaves_the_global_generator_alone(inputs):
    model, tokenizer = load_policy(inputs["sft"].path)
    rows = read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl")[:4]
    before = torch.get_rng_state()
    local_rm.train_local_rm(LocalRmConfig(epochs=1, batch_size=4), 0, model, tokenizer, rows)
    assert torch.equal(torch.get_rng_state(), before)


def test_fractional_epochs_round_up_to_whole_steps(inputs):
    model, tokenizer = load_policy(inputs["sft"].path)
    rows = read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl")[:6]  # 3 batches of 2 per epoch
    tracker = Recorder()
    metrics = local_rm.train_local_rm(LocalRmConfig(epochs=1.5, batch_size=2, logging_steps=2), 0, model, tokenizer,
                                      rows, tracker)
    assert metrics["local_rm/steps"] == 5  # ceil(1.5 × 3)
    assert [step for _, step in tracker.logs] == [2, 4, 5]  # every logging_steps, and the last step


def test_exploding_learning_rate_fails_the_stage(inputs, tmp_path):
    with pytest.raises(TrainingError, match=r"^local_rm: .*lower local_rm\.lr"):
        execute(spec(lr=1e30), inputs, tmp_path)
    assert not (tmp_path / "local_rm").exists()  # nothing committed


def test_non_finite_loss_fails_at_its_step(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(local_rm, "local_bt_loss", lambda *args: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match=r"^local_rm: loss became nan at step 1; lower local_rm\.lr"):
        execute(spec(), inputs, tmp_path)
