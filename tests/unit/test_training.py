"""Tests for roads.training: the NaN/inf guard and metric forwarding of StageCallback, the divergence rule (LossGuard, on
every step of the TRL trainers and of train_loop; tiny SFT and DPO with a huge lr), check_finite, trainer_args
(accepted by every TRL config on CPU) and final_train_metrics."""

from __future__ import annotations

import math
import types

import pytest
import torch

from roads.settings import OfflineDpoConfig, RewardModelConfig, SftConfig
from roads.errors import RoadsError, TrainingError
from roads.training import LossGuard, NullTracker, StageCallback, check_finite, final_train_metrics, trainer_args


class RecordingTracker:
    def __init__(self):
        self.metrics: list[tuple[dict, int | None]] = []
        self.messages: list[str] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def progress(self, message):
        self.messages.append(message)


def _state(step=3, max_steps=10):
    return types.SimpleNamespace(global_step=step, max_steps=max_steps)


# --------------------------------------------------------------------------- StageCallback


@pytest.mark.parametrize("key", ["loss", "train_loss"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_stops_the_stage(key, value):
    tracker = RecordingTracker()
    with pytest.raises(TrainingError) as info:
        StageCallback("sft", tracker).on_log(None, _state(), None, logs={key: value})
    message = str(info.value)
    assert message.startswith("sft:")
    assert key in message
    assert "lower sft.lr" in message
    assert "step 3" in message
    assert isinstance(info.value, RoadsError) and info.value.exit_code == 1
    assert tracker.metrics == []  # nothing forwarded from a failed step


def test_non_finite_loss_names_its_own_stage():
    with pytest.raises(TrainingError, match=r"^offline_dpo: .*lower offline_dpo\.lr"):
        StageCallback("offline_dpo", NullTracker()).on_log(None, _state(), None, logs={"loss": float("nan")})


def test_finite_loss_is_forwarded_per_step():
    tracker = RecordingTracker()
    logs = {"loss": 1.5, "grad_norm": 2, "learning_rate": 1e-3, "epoch": 0.5, "note": "text is skipped"}
    StageCallback("sft", tracker).on_log(None, _state(step=3), None, logs=logs)
    assert len(tracker.metrics) == 1
    metrics, step = tracker.metrics[0]
    assert step == 3
    assert metrics["sft/loss"] == 1.5
    assert metrics["sft/grad_norm"] == 2.0 and isinstance(metrics["sft/grad_norm"], float)
    assert metrics["sft/learning_rate"] == 1e-3
    assert "sft/note" not in metrics
    assert all(k.startswith("sft/") for k in metrics)
    assert len(tracker.messages) == 1 and "step 3/10" in tracker.messages[0] and "1.5000" in tracker.messages[0]
    assert logs["loss"] == 1.5  # the trainer's dict is not modified


def test_logs_without_loss_are_forwarded_without_progress_line():
    tracker = RecordingTracker()
    StageCallback("reward_model", tracker).on_log(None, _state(step=7), None, logs={"train_runtime": 1.25})
    assert tracker.metrics == [({"reward_model/train_runtime": 1.25}, 7)]
    assert tracker.messages == []
    StageCallback("reward_model", tracker).on_log(None, _state(step=8), None, logs=None)
    assert tracker.metrics[-1] == ({}, 8)


# --------------------------------------------------------------------------- check_finite


def test_check_finite_passes_on_finite_weights():
    check_finite(torch.nn.Linear(3, 2), "sft")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_raises_on_a_bad_weight(bad):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    with torch.no_grad():
        model[1].weight[0, 1] = bad
    with pytest.raises(TrainingError) as info:
        check_finite(model, "reward_model")
    message = str(info.value)
    assert message.startswith("reward_model:")
    assert "1.weight" in message
    assert "reward_model.lr" in message


# --------------------------------------------------------------------------- trainer_args


def test_trainer_args_fields(tmp_path):
    cfg = SftConfig(lr=0.02, epochs=1.5, batch_size=7, max_length=48, logging_steps=4)
    args = trainer_args(cfg, 11, str(tmp_path))
    assert args["bf16"] is False
    assert args["report_to"] == "none"
    assert args["save_strategy"] == "no"
    assert args["seed"] == 11 and args["data_seed"] == 11
    assert args["learning_rate"] == 0.02
    assert args["num_train_epochs"] == 1.5
    assert args["per_device_train_batch_size"] == 7
    assert args["max_length"] == 48
    assert args["logging_steps"] == 4
    assert args["output_dir"] == str(tmp_path)
    assert trainer_args(cfg, 0, str(tmp_path), beta=0.3)["beta"] == 0.3


def test_trainer_args_are_accepted_by_trl_configs_on_cpu(tmp_path):
    import trl

    sft = trl.SFTConfig(**trainer_args(SftConfig(), 3, str(tmp_path / "sft")))
    assert sft.bf16 is False and sft.seed == 3 and sft.data_seed == 3
    assert sft.learning_rate == SftConfig().lr and sft.num_train_epochs == SftConfig().epochs
    assert sft.report_to in ([], "none", ["none"])
    assert getattr(sft.save_strategy, "value", sft.save_strategy) == "no"

    dpo_cfg = OfflineDpoConfig()
    dpo = trl.DPOConfig(**trainer_args(dpo_cfg, 0, str(tmp_path / "dpo"), beta=0.1, loss_type="sigmoid"))
    assert dpo.beta == 0.1 and dpo.bf16 is False
    assert dpo.learning_rate == dpo_cfg.lr
    assert "sigmoid" in (dpo.loss_type if isinstance(dpo.loss_type, (list, tuple)) else [dpo.loss_type])

    reward = trl.RewardConfig(**trainer_args(RewardModelConfig(), 0, str(tmp_path / "rm")))
    assert reward.bf16 is False and reward.max_length == RewardModelConfig().max_length


# --------------------------------------------------------------------------- final_train_metrics


def test_final_train_metrics_keeps_last_value_and_skips_epoch_and_step():
    history = [
        {"loss": 2.0, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 1},
        {"loss": 1.0, "grad_norm": 3, "epoch": 1.0, "step": 2},
        {"train_loss": 1.5, "train_runtime": 0.25, "epoch": 1.0, "step": 2, "note": "x"},
    ]
    out = final_train_metrics("sft", history)
    assert out == {
        "sft/loss": 1.0,
        "sft/grad_norm": 3.0,
        "sft/learning_rate": 1e-3,
        "sft/train_loss": 1.5,
        "sft/train_runtime": 0.25,
    }
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert final_train_metrics("sft", []) == {}


# --------------------------------------------------------------------------- the divergence rule (issue 15)


def test_trainer_args_log_a_nan_step_as_nan():
    # Transformers' default logging_nan_inf_filter logs a NaN step as the window's mean (0.0 when all are NaN)
    assert trainer_args(SftConfig(), 0, "out")["logging_nan_inf_filter"] is False


def test_the_guard_measures_from_the_first_step():
    guard = LossGuard("sft", 100.0)
    for step, loss in enumerate([5.5, 7.0, 300.0, 549.0, 0.1], start=1):  # up to 100 × 5.5 passes
        guard.check(loss, step)
    with pytest.raises(TrainingError) as info:
        guard.check(9.05e6, 6)
    message = str(info.value)
    assert message.startswith("sft: loss rose from 5.5 at step 1 to 9.05e+06 at step 6 (more than 100× its first value)")
    assert "lower sft.lr" in message and "sft.divergence_factor" in message and "nothing was cached" in message
    assert isinstance(info.value, RoadsError) and info.value.exit_code == 1


@pytest.mark.parametrize("first", [0.0, -0.4, 0.3])
def test_a_loss_that_starts_near_or_below_zero_is_measured_against_one(first):
    guard = LossGuard("online_rl", 100.0)
    guard.check(first, 1)
    guard.check(99.0, 2)  # a hundred times 0.3 (or 0) would be 30 (or 0): noise of an RL objective, not divergence
    with pytest.raises(TrainingError, match=r"^online_rl: loss rose .* \(more than 100× max\(\|its first value\|, 1\)\)"):
        guard.check(101.0, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_guard_fails_a_non_finite_loss_at_any_step(bad):
    with pytest.raises(TrainingError, match=r"^q_sft: loss became .* at step 1; lower q_sft\.lr"):
        LossGuard("q_sft", 100.0).check(bad, 1)
    guard = LossGuard("sft", 100.0)
    guard.check(2.0, 1)
    with pytest.raises(TrainingError, match=r"^sft: loss became .* at step 2; lower sft\.lr"):
        guard.check(bad, 2)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_logged_grad_norm_stops_the_stage(value):
    with pytest.raises(TrainingError, match=r"^reward_model: grad_norm became .* at step 3; lower reward_model\.lr"):
        StageCallback("reward_model", NullTracker()).on_log(None, _state(), None, logs={"loss": 0.7, "grad_norm": value})


def test_the_callback_takes_its_factor_from_the_stage_config():
    assert StageCallback("sft", NullTracker(), SftConfig(divergence_factor=7)).guard.factor == 7
    assert StageCallback("sft", NullTracker()).guard.factor == SftConfig().divergence_factor == 100


def test_train_loop_fails_a_loss_that_rose_past_the_factor():
    from roads.settings import LocalRmConfig
    from roads.training import train_loop

    model = torch.nn.Linear(2, 1)
    losses = iter([2.0, 3.0, 50.0, 201.0])

    def step_loss(batch):
        return model.weight.sum() * 0 + next(losses), {}

    cfg = LocalRmConfig(epochs=4, batch_size=4, logging_steps=100, divergence_factor=100)
    with pytest.raises(TrainingError, match=r"^local_rm: loss rose from 2 at step 1 to 201 at step 4 .* local_rm\.lr"):
        train_loop("local_rm", cfg, 0, model, 4, step_loss, NullTracker())
    losses = iter([2.0, 3.0, 50.0, 201.0])
    out = train_loop("local_rm", cfg.model_copy(update={"divergence_factor": 1000.0}), 0, model, 4, step_loss,
                     NullTracker())
    assert out["local_rm/steps"] == 4.0


# a tiny SFT: the real trainer, the real loss; a few seconds on CPU


@pytest.fixture(scope="module")
def sft_rows():
    from roads.data.synthetic import SyntheticTask, generate
    from roads.models import build_tokenizer

    data = generate(SyntheticTask("gap"), seed=0, n_sft=64, n_pairs=16, n_val_pairs=1, n_eval_prompts=1,
                    demo_noise=0.3, behaviour_noise=0.5, bt_temperature=0.1)
    corpus = ([r["prompt"] + r["completion"] for r in data["sft"]]
              + [r["prompt"] + r["chosen"] + r["rejected"] for r in data["pairs_train"]])
    return data["sft"], data["pairs_train"], build_tokenizer(corpus)


def _tiny_sft(sft_rows, out_dir, nan_from_forward=None, **cfg):
    """SFT of a fresh tiny model; ``nan_from_forward=k``: its weights turn NaN just before its k-th forward pass."""
    from roads.models import new_causal_lm
    from roads.sft_trainer import train_sft

    rows, _, tokenizer = sft_rows
    model = new_causal_lm("tiny", tokenizer, seed=0)
    if nan_from_forward:
        calls = []

        def poison(module, args):
            calls.append(1)
            if len(calls) == nan_from_forward:
                with torch.no_grad():
                    next(module.parameters()).fill_(float("nan"))

        model.register_forward_pre_hook(poison)
    tracker = RecordingTracker()
    settings = SftConfig(**{"epochs": 1, "batch_size": 8, "logging_steps": 1000, **cfg})  # no log before the end
    return train_sft("sft", settings, 0, model, tokenizer, rows, out_dir, tracker), tracker


def test_a_normal_tiny_sft_does_not_trip_the_rule(sft_rows, tmp_path):
    metrics, tracker = _tiny_sft(sft_rows, tmp_path, lr=1e-3, logging_steps=1)
    losses = [m["sft/loss"] for m, _ in tracker.metrics if "sft/loss" in m]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert (tmp_path / "model.safetensors").is_file()


def test_a_tiny_sft_with_a_huge_lr_fails_naming_the_setting(sft_rows, tmp_path):
    # sft.lr=1e3 on the smoke study logged 5.48 -> 9,051,094 -> 5.61 and was cached; here the logs never come
    # (logging_steps 1000): the rule reads each step's own loss
    with pytest.raises(TrainingError) as info:
        _tiny_sft(sft_rows, tmp_path / "out", lr=1e3)
    message = str(info.value)
    assert message.startswith("sft: loss rose from ") and "at step 1 to " in message
    assert "more than 100× its first value" in message and "lower sft.lr" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_nan_loss_is_caught_at_its_step_though_the_logs_would_hide_it(sft_rows, tmp_path):
    # no log before the end, and the filter would have shown the NaN steps as 0.0: the rule reads each step's loss
    # (without it, the stage would fail only at the end, on the weights)
    with pytest.raises(TrainingError, match=r"^sft: loss became nan at step 2; lower sft\.lr"):
        _tiny_sft(sft_rows, tmp_path, nan_from_forward=2, lr=1e-3)


def test_a_tiny_dpo_with_a_huge_lr_fails_naming_the_setting(sft_rows, tmp_path):
    from roads.dpo_trainer import train_dpo
    from roads.models import new_causal_lm
    from roads.settings import OfflineDpoConfig

    _, pairs, tokenizer = sft_rows
    new_causal_lm("tiny", tokenizer, seed=0).save_pretrained(tmp_path / "start")
    tokenizer.save_pretrained(tmp_path / "start")
    cfg = OfflineDpoConfig(lr=1e3, epochs=1, batch_size=8, logging_steps=1000)
    with pytest.raises(TrainingError, match=r"^offline_dpo: loss rose from 0\.6931 at step 1 .* lower offline_dpo\.lr"):
        train_dpo("offline_dpo", cfg, 0, str(tmp_path / "start"), pairs, tmp_path / "out", NullTracker(), beta=0.1,
                  loss_type="sigmoid", precompute_ref=True)


def test_sfts_held_out_batch_shrinks_with_max_length(sft_rows, tmp_path, monkeypatch):
    """The held-out NLL's batch holds ~4,096 tokens: 64 rows at the presets' 64 tokens (unchanged), 8 at 512. A fixed
    64 rows at 512 tokens with a 49,152-token vocabulary took an SFT worker to 10.8 GB (hh-rlhf on SmolLM2-135M)."""
    import roads.sft_trainer as sft_trainer

    assert [sft_trainer.eval_batch_size(n) for n in (64, 128, 512, 2048, 8192)] == [64, 32, 8, 2, 1]
    seen = []
    real = sft_trainer.SFTConfig

    def spy(**kwargs):
        seen.append(kwargs.get("per_device_eval_batch_size"))
        return real(**kwargs)

    monkeypatch.setattr(sft_trainer, "SFTConfig", spy)
    from roads.models import new_causal_lm

    rows, _, tokenizer = sft_rows
    settings = SftConfig(epochs=1, batch_size=8, max_length=512)
    sft_trainer.train_sft("sft", settings, 0, new_causal_lm("tiny", tokenizer, seed=0), tokenizer, rows[:16], tmp_path,
                          RecordingTracker(), val_rows=rows[16:24])
    assert seen == [8]
