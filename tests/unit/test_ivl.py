"""Inverse value learning: its loss against hand-computed values, the zero-initialised value network (base + value is
the base exactly), and the ``ivl`` stage on tiny data (outputs, the composed policy it leaves, training that helps,
determinism, a learning rate that blows up)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import roads.stages.ivl as ivl
from roads.artifacts import read_json
from roads.config import StageSpec
from roads.settings import IvlConfig
from roads.errors import TrainingError
from roads.generation import encode, sample
from roads.models import POLICY_FILE, ComposedLM, load_policy
from roads.runner import execute
from support import Recorder, tiny_data, tiny_sft

N_PAIRS, BATCH = 16, 8  # 2 steps per epoch


# --------------------------------------------------------------------------- the loss


def test_ivl_loss_hand_computed():
    # V = 2, three positions: two counted, the third (huge logits) masked out
    base = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [50.0, -50.0]]])
    value = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [-80.0, 90.0]]])
    labels = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[True, True, False]])
    loss, ce, penalty = ivl.ivl_loss(base, value, labels, mask, l1=2.0)
    # position 0: softmax [½, ½], label 0 → log 2; position 1: softmax [¾, ¼], label 1 → log 4
    assert float(ce) == pytest.approx((math.log(2.0) + math.log(4.0)) / 2, rel=1e-6)
    # ‖g_t‖₁ / V: 0 and log(3)/2, averaged over the two counted positions
    assert float(penalty) == pytest.approx(math.log(3.0) / 4, rel=1e-6)
    assert float(loss) == pytest.approx(1.5 * math.log(2.0) + 2.0 * math.log(3.0) / 4, rel=1e-6)
    assert loss.shape == ce.shape == penalty.shape == ()
    # no L1: the loss is the cross-entropy; nothing counted: zeros, not NaN
    assert float(ivl.ivl_loss(base, value, labels, mask, l1=0.0)[0]) == pytest.approx(float(ce), rel=1e-6)
    empty = ivl.ivl_loss(base, value, labels, torch.zeros_like(mask), l1=1.0)
    assert all(float(x) == 0.0 for x in empty)


def test_ivl_loss_gradient_flows_to_the_value_logits_only():
    base = torch.randn(2, 3, 5, requires_grad=True)
    value = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[True, True, False], [False, True, True]])
    loss, _, _ = ivl.ivl_loss(base.detach(), value, labels, mask, l1=1.0)
    loss.backward()
    assert value.grad is not None and base.grad is None
    assert torch.equal(value.grad[0, 2], torch.zeros(5)) and torch.equal(value.grad[1, 0], torch.zeros(5))
    with pytest.raises(ValueError):
        ivl.ivl_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), labels[:1, :2], mask[:1, :2], 1.0)


# --------------------------------------------------------------------------- tiny data, a base and a target


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    data = tiny_data(store, N_PAIRS)
    return {"data": data, "base": tiny_sft(store, data, seed=0), "target": tiny_sft(store, data, seed=1)}


def spec(seed: int = 0, **params) -> StageSpec:
    cfg = IvlConfig(**{"epochs": 2, "batch_size": BATCH, "lr": 3e-3, "logging_steps": 1, **params})
    return StageSpec(stage="ivl", params=cfg.model_dump(), seed=seed)


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    tracker = Recorder()
    result = execute(spec(), inputs, tmp_path_factory.mktemp("ivl-store"), tracker)
    return result, tracker


def probe_ids(tokenizer) -> torch.Tensor:
    ids = encode(tokenizer, ["abc", "xyzzy q"])
    width = min(len(i) for i in ids)
    return torch.tensor([i[:width] for i in ids])


def test_base_and_target_share_a_vocabulary(inputs):
    _, base_tok = load_policy(inputs["base"].path)
    _, target_tok = load_policy(inputs["target"].path)
    assert base_tok.get_vocab() == target_tok.get_vocab()
    assert load_file(str(Path(inputs["base"].path) / "model.safetensors")).keys() == \
        load_file(str(Path(inputs["target"].path) / "model.safetensors")).keys()
    assert inputs["base"].digest != inputs["target"].digest  # another seed: other weights


# --------------------------------------------------------------------------- a zero value network


def test_zero_value_network_reproduces_the_base_exactly(inputs, tmp_path):
    base, tokenizer = load_policy(inputs["base"].path)
    value = ivl.new_value_network("tiny", tokenizer, seed=0)
    assert not value.config.tie_word_embeddings
    assert value.lm_head.weight is not value.model.embed_tokens.weight
    assert torch.count_nonzero(value.lm_head.weight) == 0 and torch.count_nonzero(value.model.embed_tokens.weight) > 0
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        expected = base(input_ids=ids).logits.float()
        composed = ComposedLM([base, value], ["logits", "logits"], [1.0, 1.0])(input_ids=ids).logits
    assert composed.dtype == torch.float32
    assert torch.equal(composed, expected)
    # and still after a save and a reload (the untied zero head survives)
    value.save_pretrained(tmp_path / "value")
    reloaded, _ = load_policy(inputs["base"].path)
    from transformers import AutoModelForCausalLM
    value2 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "value"))
    with torch.no_grad():
        again = ComposedLM([reloaded, value2], ["logits", "logits"], [1.0, 1.0])(input_ids=ids).logits
    assert torch.equal(again, expected)


# --------------------------------------------------------------------------- the stage


def test_stage_outputs(trained, inputs):
    result, _ = trained
    out = Path(result.artifact.path)
    for name in (POLICY_FILE, "trained.json", "value/model.safetensors", "value/config.json", "value/tokenizer.json",
                 "target/model.safetensors", "target/tokenizer.json"):
        assert (out / name).is_file(), name
    assert read_json(out / POLICY_FILE)["parts"] == [{"path": "target", "transform": "logits", "weight": 1.0},
                                                     {"path": "value", "transform": "logits", "weight": 1.0}]
    assert read_json(out / "trained.json") == {"train_examples": N_PAIRS, "stage": "ivl"}
    # the target is copied byte for byte
    target = Path(inputs["target"].path)
    assert (out / "target/model.safetensors").read_bytes() == (target / "model.safetensors").read_bytes()


def test_stage_trains_and_reports(trained):
    result, tracker = trained
    m = result.metrics
    for key in ("ivl/loss", "ivl/ce", "ivl/penalty", "ivl/train_loss", "ivl/steps", "ivl/train_ce_on_base",
                "ivl/train_ce_base_alone", "ivl/train_ce_on_target", "ivl/train_ce_target_alone"):
        assert key in m and math.isfinite(m[key]), key
    assert m["ivl/steps"] == 4  # 2 epochs × 2 batches
    assert m["ivl/penalty"] > 0.0 and m["ivl/loss"] > m["ivl/ce"]
    assert m["ivl/train_ce_on_base"] < m["ivl/train_ce_base_alone"]
    assert [step for logs, step in tracker.logs if "ivl/loss" in logs] == [1, 2, 3, 4]
    assert any(msg.startswith("step 4/4 loss ") for msg in tracker.messages)
    head = load_file(str(Path(result.artifact.path) / "value/model.safetensors"))["lm_head.weight"]
    assert torch.count_nonzero(head) > 0


def test_the_composed_policy_is_target_plus_value(trained, inputs):
    result, _ = trained
    out = Path(result.artifact.path)
    policy, tokenizer = load_policy(out)
    assert isinstance(policy, ComposedLM)
    target, _ = load_policy(inputs["target"].path)
    value, _ = load_policy(out / "value")
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        composed = policy(input_ids=ids).logits
        expected = target(input_ids=ids).logits.float() + value(input_ids=ids).logits.float()
    assert torch.equal(composed, expected)
    assert not torch.equal(composed, target(input_ids=ids).logits.float())
    samples = sample(policy, tokenizer, ["abc", "de"], n=2, max_new_tokens=6, temperature=1.0, seed=0)
    assert len(samples) == 2 and all(len(group) == 2 for group in samples)
    assert all(isinstance(c.text, str) and c.ids for group in samples for c in group)


def test_stage_is_deterministic(trained, inputs, tmp_path):
    again = execute(spec(), inputs, tmp_path / "again")
    assert again.artifact.digest == trained[0].artifact.digest


def test_training_leaves_the_global_generator_alone(inputs):
    base, tokenizer = load_policy(inputs["base"].path)
    value = ivl.new_value_network("tiny", tokenizer, seed=0)
    rows = ivl.training_rows(Path(inputs["data"].path), "demonstrations")[:4]
    before = torch.get_rng_state()
    ivl.train_value(IvlConfig(epochs=1, batch_size=4), 0, base, value, tokenizer, rows)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(not p.requires_grad for p in base.parameters())


def test_exploding_learning_rate_fails_the_stage(inputs, tmp_path):
    with pytest.raises(TrainingError, match=r"^ivl: .*lower ivl\.lr"):
        execute(spec(lr=1e30, epochs=1), inputs, tmp_path)
    assert not (tmp_path / "ivl").exists()  # nothing committed
