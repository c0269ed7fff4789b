"""Q-SFT: its Bellman targets, weighted cross-entropy (both rest-mass variants) and extraction against values worked
out by hand, and the ``q_sft`` stage on tiny data (the composed policy it leaves, training, determinism, the reward
model's returns, a loss that blows up)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import roads.stages.q_sft as q_sft
from roads.artifacts import digest_dir, read_json, read_jsonl
from roads.config import StageSpec
from roads.settings import QSftConfig, RewardModelConfig
from roads.errors import TrainingError
from roads.generation import encode, sample
from roads.losses import q_sft_extract_logits, q_sft_loss, q_sft_targets
from roads.models import POLICY_FILE, ComposedLM, load_policy
from roads.runner import execute
from roads.verifiers import completion_ids, load_verifier
from support import Recorder, differs, weights, tiny_data, tiny_sft

LN2 = math.log(2.0)
N_PAIRS, BATCH, BETA = 6, 4, 0.5  # 12 responses: 3 optimiser steps


# --------------------------------------------------------------------------- Bellman targets


def test_targets_hand_computed():
    # V = 3, T = 3 action tokens; probabilities at the next state of each action
    behaviour = torch.tensor([[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]])
    target = torch.tensor([[[0.2, 0.6, 0.2], [0.3, 0.15, 0.5], [0.9, 0.05, 0.05]]])
    is_last = torch.tensor([[False, False, True]])
    w = q_sft_targets(torch.tensor([0.7]), behaviour, target, is_last, gamma=0.9, min_behaviour_prob=0.25)
    assert w.shape == (1, 3)
    # t=0: ratios 0.4, 2.0, (0.2 excluded) → 0.9·2.0 = 1.8 → clipped to 1
    # t=1: ratios 0.5, 0.5, (5.0 excluded: π_β = 0.1 ≤ ε) → 0.9·0.5 = 0.45
    # t=2: the last action → the return 0.7
    assert torch.allclose(w, torch.tensor([[1.0, 0.45, 0.7]]))
    # ε = 0 lets the rare token in: 0.9·5 → clipped to 1; γ = 0.5 on t=0: 0.5·2 = 1
    w0 = q_sft_targets(torch.tensor([0.7]), behaviour, target, is_last, gamma=0.5, min_behaviour_prob=0.0)
    assert torch.allclose(w0, torch.tensor([[1.0, 1.0, 0.7]]))
    w1 = q_sft_targets(torch.tensor([0.0]), behaviour, target, is_last, gamma=0.2, min_behaviour_prob=0.25)
    assert torch.allclose(w1, torch.tensor([[0.4, 0.1, 0.0]]))  # γ·max ratio; a rejected response returns 0


def test_targets_per_row_returns_and_no_gradient():
    behaviour = torch.full((2, 2, 4), 0.25)
    target = torch.full((2, 2, 4), 0.1, requires_grad=True)
    is_last = torch.tensor([[False, True], [True, False]])  # row 1: one action, then padding
    rewards = torch.tensor([1.0, 0.3], requires_grad=True)
    w = q_sft_targets(rewards, behaviour, target, is_last, gamma=1.0, min_behaviour_prob=1e-4)
    assert not w.requires_grad
    assert torch.allclose(w, torch.tensor([[0.4, 1.0], [0.3, 0.4]]))
    with pytest.raises(ValueError):
        q_sft_targets(rewards, behaviour, target[:, :1], is_last, gamma=1.0, min_behaviour_prob=0.0)


# --------------------------------------------------------------------------- the weighted cross-entropy


def loss_inputs():
    # p = softmax([ln 2, 0, 0]) = [1/2, 1/4, 1/4] at every position
    logits = torch.tensor([[[LN2, 0.0, 0.0], [LN2, 0.0, 0.0], [5.0, -3.0, 1.0]]])
    actions = torch.tensor([[1, 0, 2]])
    weights = torch.tensor([[0.5, 1.0, 0.9]])
    mask = torch.tensor([[1, 1, 0]])  # the third position is not an action
    return logits, actions, weights, mask


def test_loss_dummy_hand_computed():
    logits, actions, weights, mask = loss_inputs()
    loss = q_sft_loss(logits, actions, weights, mask, "dummy", dummy_id=2)
    # token 1: −[0.5 log ¼ + 0.5 log ¼] = 2 ln 2;  token 2: −[1·log ½] = ln 2;  mean 1.5 ln 2
    assert loss.shape == ()
    assert float(loss) == pytest.approx(1.5 * LN2, rel=1e-6)


def test_loss_spread_hand_computed():
    logits, actions, weights, mask = loss_inputs()
    loss = q_sft_loss(logits, actions, weights, mask, "spread", dummy_id=2)
    # token 1: −[0.5 log ¼ + 0.5·(log ½ + log ¼)/2] = ln 2 + 0.75 ln 2;  token 2: ln 2;  mean 1.375 ln 2
    assert float(loss) == pytest.approx(1.375 * LN2, rel=1e-6)


@pytest.mark.parametrize("rest_mass", ["dummy", "spread"])
def test_loss_is_the_cross_entropy_with_the_target_distribution(rest_mass):
    g = torch.Generator().manual_seed(0)
    B, T, V, d = 2, 3, 5, 4
    logits = torch.randn(B, T, V, generator=g)
    actions = torch.randint(0, V, (B, T), generator=g)
    weights = torch.rand(B, T, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    onehot = torch.nn.functional.one_hot(actions, V).float()
    w = weights[..., None]
    if rest_mass == "dummy":
        q = w * onehot + (1 - w) * torch.nn.functional.one_hot(torch.full((B, T), d), V).float()
    else:
        q = w * onehot + (1 - w) / (V - 1) * (1 - onehot)
    assert torch.allclose(q.sum(-1), torch.ones(B, T))
    ce = -(q * torch.log_softmax(logits, -1)).sum(-1)
    expected = (ce * mask).sum() / mask.sum()
    assert float(q_sft_loss(logits, actions, weights, mask, rest_mass, d)) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("rest_mass", ["dummy", "spread"])
def test_loss_optimum_puts_w_on_the_action(rest_mass):
    w, a, d = 0.3, 1, 0
    logits = torch.zeros(1, 1, 3, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=2.0)
    for _ in range(1500):
        optimizer.zero_grad()
        q_sft_loss(logits, torch.tensor([[a]]), torch.tensor([[w]]), torch.ones(1, 1), rest_mass, d).backward()
        optimizer.step()
    p = torch.softmax(logits.detach()[0, 0], -1)
    assert float(p[a]) == pytest.approx(w, abs=1e-2)
    if rest_mass == "dummy":
        assert float(p[d]) == pytest.approx(1 - w, abs=1e-2)
    else:
        assert p[[d, 2]].tolist() == pytest.approx([(1 - w) / 2] * 2, abs=1e-2)


def test_loss_no_gradient_into_the_weights_and_errors():
    logits, actions, weights, mask = loss_inputs()
    logits.requires_grad_(True)
    weights.requires_grad_(True)
    q_sft_loss(logits, actions, weights, mask, "dummy", 2).backward()
    assert weights.grad is None and logits.grad is not None
    assert float(logits.grad[0, 2].abs().sum()) == 0.0  # a masked position gets no gradient
    assert float(q_sft_loss(logits, actions, weights, torch.zeros(1, 3), "dummy", 2).detach()) == 0.0
    with pytest.raises(ValueError, match="rest_mass"):
        q_sft_loss(logits, actions, weights, mask, "elsewhere", 2)
    with pytest.raises(ValueError):
        q_sft_loss(logits, actions[:, :2], weights, mask, "dummy", 2)


# --------------------------------------------------------------------------- extraction


def tiny_lm(seed: int, vocab: int = 11) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()


def test_extract_logits_hand_computed():
    behaviour = torch.tensor([LN2, 0.0, 0.0])  # π_β = [½, ¼, ¼]
    likelihood = torch.log(torch.tensor([0.2, 0.3, 0.5]))  # p_θ
    out = q_sft_extract_logits(behaviour, likelihood, beta=2.0)
    assert torch.allclose(out, torch.tensor([math.log(0.5) + 0.4, math.log(0.25) + 0.6, math.log(0.25) + 1.0]))
    # π ∝ π_β·exp(β·p_θ)
    expected = torch.tensor([0.5, 0.25, 0.25]) * torch.exp(2.0 * torch.tensor([0.2, 0.3, 0.5]))
    assert torch.allclose(torch.softmax(out, -1), expected / expected.sum())


def test_extract_logits_equal_the_composed_policy():
    behaviour, likelihood, beta = tiny_lm(0), tiny_lm(1), 0.7
    composed = ComposedLM([behaviour, likelihood], ["log_softmax", "softmax"], [1.0, beta])
    ids = torch.tensor([[1, 4, 2, 7, 3], [5, 5, 9, 0, 1]])
    with torch.no_grad():
        expected = q_sft_extract_logits(behaviour(input_ids=ids).logits, likelihood(input_ids=ids).logits, beta)
        assert torch.allclose(composed(input_ids=ids).logits, expected, atol=1e-6)


# --------------------------------------------------------------------------- the stage's pieces


def test_token_batch_aligns_actions_with_logits():
    ids, attention, action, is_last = q_sft.token_batch([[5, 6], [5]], [[7, 8, 2], [9, 2]], pad_id=0, max_length=8)
    assert ids.tolist() == [[5, 6, 7, 8, 2], [5, 9, 2, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # logits t predict token t + 1: actions 7, 8, EOS are predicted at 1, 2, 3
    assert action.tolist() == [[False, True, True, True], [True, True, False, False]]
    assert is_last.tolist() == [[False, False, False, True], [False, True, False, False]]
    # cut at max_length: the last kept token ends the sequence and takes the return
    ids, _, action, is_last = q_sft.token_batch([[5, 6]], [[7, 8, 2]], pad_id=0, max_length=4)
    assert ids.tolist() == [[5, 6, 7, 8]]
    assert action.tolist() == [[False, True, True]] and is_last.tolist() == [[False, False, True]]


def test_polyak_update():
    target, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in target.parameters():
            p.fill_(0.0)
        for p in model.parameters():
            p.fill_(1.0)
    q_sft.polyak_update(target, model, 0.25)
    assert all(torch.allclose(p, torch.full_like(p, 0.25)) for p in target.parameters())


def test_responses_and_returns():
    rows = [{"prompt": "x", "chosen": "a", "rejected": "b"}, {"prompt": "y", "chosen": "c", "rejected": "d"}]
    items = q_sft.responses(rows)
    assert [(it["prompt"], it["completion"]) for it in items] == [("x", "a"), ("x", "b"), ("y", "c"), ("y", "d")]
    assert q_sft.response_returns(QSftConfig(), items, {}).tolist() == [1.0, 0.0, 1.0, 0.0]


# --------------------------------------------------------------------------- tiny data and an SFT model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    data = tiny_data(store, N_PAIRS, n_val_pairs=4)
    return {"data": data, "sft": tiny_sft(store, data)}


def spec(seed: int = 0, **params) -> StageSpec:
    cfg = QSftConfig(**{"epochs": 1, "batch_size": BATCH, "beta": BETA, "logging_steps": 1, "lr": 1e-3, **params})
    return StageSpec(stage="q_sft", params=cfg.model_dump(), seed=seed)


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    tracker = Recorder()
    result = execute(spec(), inputs, tmp_path_factory.mktemp("q-store"), tracker)
    return result, tracker


# --------------------------------------------------------------------------- the stage


def test_stage_outputs(trained):
    result, _ = trained
    out = Path(result.artifact.path)
    for part in ("behaviour", "likelihood"):
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            assert (out / part / name).is_file(), f"{part}/{name}"
    assert read_json(out / POLICY_FILE) == {"parts": [
        {"path": "behaviour", "transform": "log_softmax", "weight": 1.0},
        {"path": "likelihood", "transform": "softmax", "weight": BETA}]}
    assert read_json(out / "trained.json") == {"train_examples": 2 * N_PAIRS, "stage": "q_sft"}


def test_stage_trains_and_reports(trained, inputs):
    result, tracker = trained
    m = result.metrics
    for key in ("q_sft/loss", "q_sft/weight_mean", "q_sft/train_loss", "q_sft/responses", "q_sft/behaviour_loss"):
        assert key in m, key
    assert all(math.isfinite(v) for v in m.values())
    assert m["q_sft/responses"] == 2 * N_PAIRS and m["q_sft/mean_return"] == 0.5
    assert 0.0 <= m["q_sft/weight_mean"] <= 1.0 and m["q_sft/loss"] > 0.0
    out = Path(result.artifact.path)
    sft = weights(inputs["sft"].path)
    assert differs(weights(out / "likelihood"), sft) and differs(weights(out / "behaviour"), sft)
    assert differs(weights(out / "likelihood"), weights(out / "behaviour"))
    steps = [step for logs, step in tracker.logs if "q_sft/loss" in logs]
    assert steps == [1, 2, 3]  # logging_steps = 1; the behaviour SFT logs under its own names
    assert any(msg.startswith("step 3/3 loss ") for msg in tracker.messages)
    assert any(msg.startswith("behaviour step") for msg in tracker.messages)


def test_stage_leaves_a_composed_policy_that_samples(trained, inputs):
    result, _ = trained
    out = Path(result.artifact.path)
    policy, tokenizer = load_policy(out)
    assert isinstance(policy, ComposedLM) and policy.weights == [1.0, BETA]
    prompts = [r["prompt"] for r in read_jsonl(Path(inputs["data"].path) / "eval_prompts.jsonl")]
    samples = sample(policy, tokenizer, prompts, n=2, max_new_tokens=6, temperature=1.0, seed=0)
    assert [len(group) for group in samples] == [2] * len(prompts)
    assert sample(policy, tokenizer, prompts, n=2, max_new_tokens=6, temperature=1.0, seed=0) == samples
    behaviour, _ = load_policy(out / "behaviour")
    likelihood, _ = load_policy(out / "likelihood")
    ids, attention, _, _ = q_sft.token_batch(encode(tokenizer, prompts), completion_ids(tokenizer, ["ab", "c"]),
                                             pad_id=tokenizer.pad_token_id, max_length=64)
    with torch.no_grad():
        expected = q_sft_extract_logits(behaviour(input_ids=ids, attention_mask=attention).logits,
                                        likelihood(input_ids=ids, attention_mask=attention).logits, BETA)
        assert torch.allclose(policy(input_ids=ids, attention_mask=attention).logits, expected, atol=1e-5)


def test_stage_is_deterministic(trained, inputs, tmp_path):
    again = execute(spec(), inputs, tmp_path / "again")
    assert again.artifact.digest == trained[0].artifact.digest == digest_dir(again.artifact.path)


def test_spread_variant_runs(trained, inputs, tmp_path):
    result = execute(spec(rest_mass="spread", behaviour_epochs=0.25), inputs, tmp_path)
    assert math.isfinite(result.metrics["q_sft/loss"])
    assert result.artifact.digest != trained[0].artifact.digest
    assert differs(weights(Path(result.artifact.path) / "likelihood"),
                   weights(Path(trained[0].artifact.path) / "likelihood"))


def test_reward_model_returns(inputs, tmp_path):
    rm = execute(StageSpec(stage="reward_model", params=RewardModelConfig(epochs=0.5, batch_size=8).model_dump(),
                           seed=0), inputs, tmp_path / "rm")
    items = q_sft.responses(read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl"))
    returns = q_sft.response_returns(QSftConfig(reward="reward_model"), items, {**inputs, "verifier": rm.artifact})
    scores = load_verifier("reward_model", rm.artifact.path).score([it["prompt"] for it in items],
                                                                   [it["completion"] for it in items])
    assert returns.shape == (2 * N_PAIRS,)
    assert torch.allclose(returns, torch.sigmoid(scores.float()))
    with pytest.raises(Exception, match="verifier"):
        q_sft.response_returns(QSftConfig(reward="reward_model"), items, inputs)


def test_training_leaves_the_global_generator_alone_and_fails_on_nan(inputs, monkeypatch):
    model, tokenizer = load_policy(inputs["sft"].path)
    behaviour, _ = load_policy(inputs["sft"].path)
    target, _ = load_policy(inputs["sft"].path)
    rows = q_sft.responses(read_jsonl(Path(inputs["data"].path) / "pairs_train.jsonl")[:2])
    prompts = encode(tokenizer, [r["prompt"] for r in rows])
    completions = completion_ids(tokenizer, [r["completion"] for r in rows])
    returns = torch.tensor([1.0, 0.0, 1.0, 0.0])
    cfg = QSftConfig(epochs=1, batch_size=4)
    before = torch.get_rng_state()
    metrics = q_sft.train_likelihood(cfg, 0, model, target, behaviour, tokenizer, prompts, completions, returns)
    assert torch.equal(torch.get_rng_state(), before)
    assert metrics["q_sft/steps"] == 1
    monkeypatch.setattr(q_sft, "q_sft_loss", lambda *args: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match=r"^q_sft: loss became nan at step 1; lower q_sft\.lr"):
        q_sft.train_likelihood(cfg, 0, model, target, behaviour, tokenizer, prompts, completions, returns)
