"""Tests for roads.training: the NaN/inf guard and metric forwarding of StageCallback, check_finite, trainer_args
(accepted by every TRL config on CPU) and final_train_metrics."""

from __future__ import annotations

import math
import types

import pytest
import torch

from roads.settings import OfflineDpoConfig, RewardModelConfig, SftConfig
from roads.errors import RoadsError, TrainingError
from roads.training import NullTracker, StageCallback, check_finite, final_train_metrics, trainer_args


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
