"""Stage smoke tests without Prefect: ``roads.runner.execute`` on tiny data. Losses finite, weights changed, the
results right where a right answer is known (the SFT policy against itself), determinism, nothing half-written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import roads.stages.sft
from roads.artifacts import ArtifactRef, digest_dir, read_json, read_jsonl
from roads.config import load_study
from roads.errors import RoadsError
from roads.models import build_tokenizer, load_pretrained, new_causal_lm
from roads.plan import build_plan
from roads.runner import execute
from support import HH_FILE, differs, weights

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines.yaml"
# the smoke pipeline made smaller still (2 optimiser steps per training stage)
SMALL = [
    "prepare_data.n_sft=32",
    "prepare_data.n_pairs=32",
    "prepare_data.n_val_pairs=8",
    "prepare_data.n_eval_prompts=8",
    "sft.batch_size=16",
    "offline_dpo.batch_size=16",
    "reward_model.batch_size=16",
    "evaluate.max_new_tokens=6",
]


def run_nodes(nodes, store) -> dict:
    results: dict = {}
    for node in nodes:
        results[node.id] = execute(node.spec, {k: results[v].artifact for k, v in node.inputs.items()}, store)
    return results


# --------------------------------------------------------------------------- the smoke pipeline's gap unit


@pytest.fixture(scope="module")
def gap_nodes():
    nodes = build_plan(load_study(PIPELINES, "smoke", SMALL))
    return {n.id: n for n in nodes if n.id.startswith("gap/") and n.stage != "reward_model"}


@pytest.fixture(scope="module")
def gap(gap_nodes, tmp_path_factory):
    return run_nodes(gap_nodes.values(), tmp_path_factory.mktemp("store"))


def test_stage_outputs_are_committed(gap):
    for node_id, result in gap.items():
        path = Path(result.artifact.path)
        assert path.is_dir(), node_id
        assert result.artifact.digest == digest_dir(path)
        assert not list(path.parent.glob(".tmp-*"))
        assert all(math.isfinite(v) for v in result.metrics.values()), node_id


def test_sft_changes_weights_and_losses_are_finite(gap, gap_nodes):
    spec = gap_nodes["gap/seed0/sft"].spec
    out = Path(gap["gap/seed0/sft"].artifact.path)
    metrics = gap["gap/seed0/sft"].metrics
    assert math.isfinite(metrics["sft/loss"]) and math.isfinite(metrics["sft/train_loss"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    fresh = new_causal_lm(spec.model.preset, tokenizer, seed=spec.seed,
                          max_positions=max(256, spec.config().max_length))
    assert fresh.config.vocab_size == read_json(out / "config.json")["vocab_size"]
    initial = {k: v.detach().clone() for k, v in fresh.state_dict().items() if k in weights(out)}
    assert differs(weights(out), initial)


def test_sft_is_deterministic(gap, gap_nodes, tmp_path):
    spec = gap_nodes["gap/seed0/sft"].spec
    data = {"data": gap["gap/seed0/prepare_data"].artifact}
    again = execute(spec, data, tmp_path / "again")
    assert again.artifact.digest == gap["gap/seed0/sft"].artifact.digest
    assert again.artifact.path != gap["gap/seed0/sft"].artifact.path
    other_seed = execute(spec.model_copy(update={"seed": 1}), data, tmp_path / "seed1")
    assert other_seed.artifact.digest != again.artifact.digest


def test_offline_dpo_moves_away_from_its_reference(gap):
    sft, dpo = gap["gap/seed0/sft"], gap["gap/seed0/offline_dpo"]
    assert differs(weights(dpo.artifact.path), weights(sft.artifact.path))
    assert math.isfinite(dpo.metrics["offline_dpo/loss"]) and math.isfinite(dpo.metrics["offline_dpo/train_loss"])
    assert read_json(Path(dpo.artifact.path) / "config.json")["vocab_size"] == read_json(
        Path(sft.artifact.path) / "config.json")["vocab_size"]


def test_evaluate_sft_policy_is_its_own_reference(gap):
    m = gap["gap/seed0/evaluate[sft]"].metrics
    assert m["evaluate/kl_to_reference"] == 0.0
    assert m["evaluate/win_rate"] == 0.5
    rows = read_jsonl(Path(gap["gap/seed0/evaluate[sft]"].artifact.path) / "samples.jsonl")
    assert rows and all(r["completion"] == r["reference_completion"] for r in rows)
    assert all(r["logp"] == r["ref_logp"] for r in rows)
    assert m["evaluate/val_chosen_logp_change"] == m["evaluate/val_rejected_logp_change"] == 0.0


def test_evaluate_dpo_policy_has_nonzero_kl(gap):
    m = gap["gap/seed0/evaluate[offline_dpo]"].metrics
    assert m["evaluate/kl_to_reference"] != 0.0
    assert 0.0 <= m["evaluate/win_rate"] <= 1.0
    assert 0.0 <= m["evaluate/gold_reward_mean"] <= 1.0
    saved = read_json(Path(gap["gap/seed0/evaluate[offline_dpo]"].artifact.path) / "metrics.json")
    assert saved["policy"] == "offline_dpo" and saved["task"] == "gap"
    # DPO pushes the rejected responses down more than the chosen ones (the displacement check measures both)
    assert m["evaluate/val_chosen_logp_change"] != 0.0
    assert m["evaluate/val_chosen_logp_change"] > m["evaluate/val_rejected_logp_change"]
    moved = read_json(Path(gap["gap/seed0/offline_dpo"].artifact.path) / "displacement.json")
    assert moved["pairs"] == 32 and 0.0 <= moved["chosen_more_likely"] <= 1.0
    assert moved["chosen_logp_change"] > moved["rejected_logp_change"]  # DPO separates its own pairs
    assert m["evaluate/train_chosen_logp_change"] == moved["chosen_logp_change"]


def test_failing_stage_leaves_nothing(gap, gap_nodes, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("stage exploded")

    monkeypatch.setattr(roads.stages.sft, "run", boom)
    with pytest.raises(RuntimeError, match="stage exploded"):
        execute(gap_nodes["gap/seed0/sft"].spec, {"data": gap["gap/seed0/prepare_data"].artifact}, tmp_path)
    assert not (tmp_path / "sft").exists()  # no .tmp-* folder and no committed folder


def test_failing_stage_after_writing_leaves_nothing(gap, gap_nodes, tmp_path, monkeypatch):
    def half_written(spec, inputs, out_dir, tracker=None):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # a kill, not only an exception

    monkeypatch.setattr(roads.stages.sft, "run", half_written)
    with pytest.raises(KeyboardInterrupt):
        execute(gap_nodes["gap/seed0/sft"].spec, {"data": gap["gap/seed0/prepare_data"].artifact}, tmp_path)
    assert not (tmp_path / "sft").exists()


def test_missing_input_folder_is_named(gap_nodes, tmp_path):
    missing = ArtifactRef(path=str(tmp_path / "prepare_data" / "gone"), digest="0" * 64)
    with pytest.raises(FileNotFoundError) as info:
        execute(gap_nodes["gap/seed0/sft"].spec, {"data": missing}, tmp_path / "store")
    assert "'data'" in str(info.value) and "gone" in str(info.value) and str(info.value).startswith("sft:")
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- a pretrained model by local path


def test_sft_from_a_pretrained_local_path(gap, tmp_path):
    data = Path(gap["gap/seed0/prepare_data"].artifact.path)
    corpus = [r["prompt"] + r["completion"] for r in read_jsonl(data / "sft.jsonl")]
    tokenizer = build_tokenizer(corpus, vocab_size=300)
    model = new_causal_lm("tiny", tokenizer, seed=5)
    pre = tmp_path / "pre"
    model.save_pretrained(pre)
    tokenizer.save_pretrained(pre)
    saved_cfg = read_json(pre / "config.json")

    study = load_study(PIPELINES, "smoke", [*SMALL, f"model.pretrained={pre}"])
    spec = study.stage_spec("sft", "gap", 0)
    assert spec.model.pretrained == str(pre)
    result = execute(spec, {"data": gap["gap/seed0/prepare_data"].artifact}, tmp_path / "store")
    out_cfg = read_json(Path(result.artifact.path) / "config.json")
    assert out_cfg["hidden_size"] == saved_cfg["hidden_size"]
    assert out_cfg["vocab_size"] == saved_cfg["vocab_size"] == len(tokenizer)
    assert differs(weights(result.artifact.path), weights(pre))
    assert math.isfinite(result.metrics["sft/train_loss"])


def test_load_pretrained_missing_path_names_it():
    with pytest.raises(RoadsError) as info:
        load_pretrained("/nonexistent/path")
    assert "/nonexistent/path" in str(info.value)
    assert "model.pretrained" in str(info.value)


# --------------------------------------------------------------------------- real data: hh-rlhf-smoke


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is not there")
    store = tmp_path_factory.mktemp("hh-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # pipelines.yaml names the file relative to the project folder
        # fewer pairs and demonstrations than the pipeline (which keeps 200 records) to stay fast on 2 cores
        study = load_study("pipelines.yaml", "hh-rlhf-smoke",
                           ["prepare_data.n_sft=32", "prepare_data.n_pairs=32", "sft.batch_size=16",
                            "reward_model.batch_size=16", "offline_dpo.batch_size=16",
                            "evaluate.max_new_tokens=8"])
        return run_nodes(build_plan(study), store)


def test_hh_prepare_data(hh):
    data = Path(hh["hh-rlhf/seed0/prepare_data"].artifact.path)
    sft = read_jsonl(data / "sft.jsonl")
    pairs = read_jsonl(data / "pairs_train.jsonl")
    val = read_jsonl(data / "pairs_val.jsonl")
    evals = read_jsonl(data / "eval_prompts.jsonl")
    assert sft and pairs and val and evals
    assert all(r["prompt"].endswith("\n\nAssistant:") for r in sft + pairs + val + evals)
    assert all(set(r) == {"prompt", "completion"} for r in sft)
    assert all({"prompt", "chosen", "rejected"} <= set(r) for r in pairs)
    trained = {r["prompt"] for r in sft} | {r["prompt"] for r in pairs}
    assert not trained & {r["prompt"] for r in evals}
    assert not trained & {r["prompt"] for r in val}
    assert read_json(data / "task.json")["family"] == "preferences"
    assert not any(k.endswith("gold_mean") for k in hh["hh-rlhf/seed0/prepare_data"].metrics)
    # the held-out judge's pairs (prepare_data.n_judge_pairs): prompts of their own, out of training and evaluation
    judge = read_jsonl(data / "pairs_judge.jsonl")
    assert len(judge) >= 40 and all({"prompt", "chosen", "rejected"} <= set(r) for r in judge)
    judged = {r["prompt"] for r in judge}
    held = {r["prompt"] for r in val + evals + read_jsonl(data / "sft_val.jsonl") + read_jsonl(data / "pairs_select.jsonl")}
    assert not judged & trained and not judged & held
    assert hh["hh-rlhf/seed0/prepare_data"].metrics["prepare_data/n_pairs_judge"] == len(judge)


def test_hh_training_stages(hh):
    for stage in ("sft", "reward_model", "offline_dpo"):
        metrics = hh[f"hh-rlhf/seed0/{stage}"].metrics
        assert math.isfinite(metrics[f"{stage}/train_loss"]), stage
    m = hh["hh-rlhf/seed0/reward_model"].metrics
    assert 0.0 <= m["reward_model/val_accuracy"] <= 1.0
    assert m["reward_model/val_loglik"] <= 0.0
    validation = read_json(Path(hh["hh-rlhf/seed0/reward_model"].artifact.path) / "validation.json")
    assert set(validation) == {"accuracy", "loglik", "margin"}


@pytest.mark.parametrize("policy", ["sft", "offline_dpo"])
def test_hh_evaluate_has_no_gold_reward(hh, policy):
    result = hh[f"hh-rlhf/seed0/evaluate[{policy}]"]
    m = result.metrics
    assert "evaluate/kl_to_reference" in m and "evaluate/length_mean" in m
    assert "evaluate/gold_reward_mean" not in m and "evaluate/win_rate" not in m
    assert 0.0 <= m["evaluate/finished_rate"] <= 1.0
    if policy == "sft":
        assert m["evaluate/kl_to_reference"] == 0.0
    rows = read_jsonl(Path(result.artifact.path) / "samples.jsonl")
    assert rows and all("gold_reward" not in r for r in rows)
    json.dumps(result.to_json())


def test_hh_proxy_win_rate_is_judged_by_the_held_out_reward_model(hh):
    """evaluate.judge: every sample judged against SFT's by the reward model trained on pairs_judge; the SFT policy
    ties itself (0.5), the proxy is the judge's margins counted as wins, and the judge's held-out accuracy is its own
    scoring of pairs_val; the report's proxy-judged table names the judge."""
    from roads.models import load_reward_model
    from roads.stages.reward_model import pair_metrics

    judge_dir = Path(hh["hh-rlhf/seed0/reward_model_judge"].artifact.path)
    assert read_json(judge_dir / "verifier.json") == {"kind": "global", "pairs": "pairs_judge", "val_pairs": 20}
    assert read_json(judge_dir / "trained.json")["lengths"]["examples"] >= 40  # the judge's pairs, not pairs_train
    assert read_json(Path(hh["hh-rlhf/seed0/reward_model"].artifact.path) / "verifier.json") == {"kind": "global"}
    data = Path(hh["hh-rlhf/seed0/prepare_data"].artifact.path)
    model, tokenizer = load_reward_model(judge_dir)
    expected = pair_metrics(model, tokenizer, read_jsonl(data / "pairs_val.jsonl"), 64)
    for policy in ("sft", "offline_dpo"):
        folder = Path(hh[f"hh-rlhf/seed0/evaluate[{policy}]"].artifact.path)
        info, rows = read_json(folder / "metrics.json"), read_jsonl(folder / "samples.jsonl")
        assert info["judge"] == "reward_model_judge" and info["judge_trained_on"] == "pairs_judge"
        assert info["judge_val_pairs"] == 20
        assert info["judge_val_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        wins = [1.0 if r["judge_margin"] > 0 else 0.5 if r["judge_margin"] == 0 else 0.0 for r in rows]
        assert info["proxy_win_rate"] == pytest.approx(sum(wins) / len(wins), abs=1e-6)
        assert hh[f"hh-rlhf/seed0/evaluate[{policy}]"].metrics["evaluate/proxy_win_rate"] == info["proxy_win_rate"]
        if policy == "sft":
            assert info["proxy_win_rate"] == 0.5 and all(r["judge_margin"] == 0.0 for r in rows)
    md = (Path(hh["report"].artifact.path) / "report.md").read_text()
    assert "the proxy-judged table" in md and "A proxy, not a gold reward" in md
    assert f"held-out accuracy {expected['accuracy']:.3f} on 20 pairs_val pairs" in md
    assert "| hh-rlhf | sft | 1 |" in md and "| 0.500 [0.500, 0.500] | reward_model_judge |" in md


def test_offline_dpo_rpo_on_gold_labels_trains_on_the_reordered_pairs(gap, gap_nodes, tmp_path):
    """The offline positive control: the same pairs ordered by the gold reward, trained with DPO + the chosen NLL."""
    from roads.stages.offline_dpo import gold_labelled

    nodes = {n.id: n for n in build_plan(load_study(PIPELINES, "smoke", SMALL + [
        "offline_dpo.loss_type=rpo", "offline_dpo.labels=gold"]))}
    node = nodes["gap/seed0/offline_dpo"]
    assert node.inputs == gap_nodes["gap/seed0/offline_dpo"].inputs
    result = execute(node.spec, {k: gap[v].artifact for k, v in node.inputs.items()}, tmp_path)
    assert math.isfinite(result.metrics["offline_dpo/train_loss"])
    assert differs(weights(result.artifact.path), weights(gap["gap/seed0/offline_dpo"].artifact.path))
    pairs = read_jsonl(Path(gap["gap/seed0/prepare_data"].artifact.path) / "pairs_train.jsonl")
    ordered = gold_labelled(pairs)
    assert all(r["chosen_gold"] > r["rejected_gold"] for r in ordered)
    assert len(ordered) == sum(r["chosen_gold"] != r["rejected_gold"] for r in pairs)
    flipped = sum(r["chosen_gold"] < r["rejected_gold"] for r in pairs)
    assert flipped > 0  # the noisy labels disagree with the gold reward on some pairs: the control differs


def test_keep_best_keeps_the_weights_of_the_lowest_held_out_loss():
    """The selection rule on constructed candidates: losses 3, 2, 2.5, nan -> epoch 2 and its weights."""
    import torch
    from types import SimpleNamespace

    from roads.sft_trainer import KeepBest
    from roads.training import NullTracker

    keep, model = KeepBest("sft", NullTracker()), torch.nn.Linear(1, 1, bias=False)
    for epoch, loss in enumerate([3.0, 2.0, 2.5, float("nan")], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        keep.on_evaluate(None, SimpleNamespace(epoch=float(epoch)), None, metrics={"eval_loss": loss}, model=model)
    assert keep.best == (2.0, 2.0) and float(keep.weights["weight"]) == 2.0
    assert [e for e, _ in keep.curve] == [1.0, 2.0, 3.0, 4.0]
    # patience 2: after two epochs without a better one the training stops
    keep, control = KeepBest("sft", NullTracker(), patience=2), SimpleNamespace(should_training_stop=False)
    for epoch, loss in enumerate([3.0, 2.0, 2.5], start=1):
        keep.on_evaluate(None, SimpleNamespace(epoch=float(epoch)), control, metrics={"eval_loss": loss}, model=model)
    assert not control.should_training_stop
    keep.on_evaluate(None, SimpleNamespace(epoch=4.0), control, metrics={"eval_loss": 2.4}, model=model)
    assert control.should_training_stop and keep.best == (2.0, 2.0)


def test_sft_chooses_its_epoch_by_held_out_nll(tmp_path):
    nodes = {n.id: n for n in build_plan(load_study(PIPELINES, "smoke", SMALL + [
        "sft.epochs=3", "prepare_data.n_sft_val=16"]))}
    data = execute(nodes["gap/seed0/prepare_data"].spec, {}, tmp_path)
    sft = execute(nodes["gap/seed0/sft"].spec, {"data": data.artifact}, tmp_path)
    selection = read_json(Path(sft.artifact.path) / "selection.json")
    assert selection["candidates"] == [1.0, 2.0, 3.0] and selection["held_out_rows"] == 16
    best = min(range(3), key=lambda i: selection["values"][i])
    assert selection["selected"] == selection["candidates"][best] == sft.metrics["sft/selected_epoch"]
    assert sft.metrics["sft/val_nll_best"] == pytest.approx(selection["values"][best])
    # the saved weights are the selected epoch's: their held-out NLL is the minimum of the curve
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_pretrained(sft.artifact.path)
    rows = read_jsonl(Path(data.artifact.path) / "sft_val.jsonl")
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "eval"), report_to="none",
                                                     per_device_eval_batch_size=64, max_length=64, bf16=False),
                         train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(selection["values"][best], rel=1e-4)


def test_the_dpo_rule_chooses_by_held_out_loglik_within_the_guards():
    """The selection rule on constructed candidates: the best criterion among those that pass both guards."""
    from roads.stages.select_dpo import choose

    c = [{"val_accuracy": 0.60, "val_loglik": -0.60, "chosen_logp_change": 0.1, "kl": 0.5},   # passes
         {"val_accuracy": 0.70, "val_loglik": -0.50, "chosen_logp_change": -0.4, "kl": 0.5},  # best, displaces
         {"val_accuracy": 0.65, "val_loglik": -0.55, "chosen_logp_change": 0.0, "kl": 3.0},   # over-optimised
         {"val_accuracy": 0.62, "val_loglik": -0.70, "chosen_logp_change": 0.2, "kl": 1.0}]   # passes, better
    assert choose(c, 0.0, 2.0) == (3, True)
    assert choose([c[0], {**c[3], "val_accuracy": 0.60}], 0.0, 2.0) == (0, True)  # equal accuracy: log-lik decides
    assert choose(c, 0.5, 2.0) == (1, True)  # a looser guard admits the displacing candidate
    assert choose(c[1:3], 0.0, 2.0) == (0, False)  # none passes: the least violation (0.4 < 1.0)
    assert choose([c[0], dict(c[0])], 0.0, 2.0) == (0, True)  # ties: the first in grid order


def test_select_dpo_chooses_settings_that_both_roads_then_use(gap, gap_nodes, tmp_path):
    from roads.selection import selected_settings

    extra = ["select_dpo.lrs=[5e-5, 5e-3]", "select_dpo.losses=[sigmoid]", "select_dpo.kl_prompts=4",
             "select_dpo.max_new_tokens=6", "prepare_data.n_select_pairs=8", "offline_dpo.select=select_dpo",
             "pipeline.stages=[prepare_data, sft, reward_model, select_dpo, offline_dpo, online_dpo_sft, evaluate]",
             "online_dpo.k=2", "online_dpo.max_new_tokens=4"]
    nodes = {n.id: n for n in build_plan(load_study(PIPELINES, "smoke", SMALL + extra))}
    assert nodes["gap/seed0/offline_dpo"].inputs["selection"] == "gap/seed0/select_dpo"
    assert nodes["gap/seed0/online_dpo_sft"].inputs["selection"] == "gap/seed0/select_dpo"  # shared by both roads
    data = execute(nodes["gap/seed0/prepare_data"].spec, {}, tmp_path)
    sft = execute(nodes["gap/seed0/sft"].spec, {"data": data.artifact}, tmp_path)
    sel = execute(nodes["gap/seed0/select_dpo"].spec, {"data": data.artifact, "sft": sft.artifact}, tmp_path)
    doc = read_json(Path(sel.artifact.path) / "dpo_selection.json")
    assert [c["lr"] for c in doc["candidates"]] == [5e-5, 5e-3] and doc["selection_pairs"] == 8
    assert all(math.isfinite(c[k]) for c in doc["candidates"] for k in ("val_loglik", "chosen_logp_change", "kl"))
    assert doc["selected"] == selected_settings(sel.artifact.path)
    offline = execute(nodes["gap/seed0/offline_dpo"].spec, {"data": data.artifact, "sft": sft.artifact,
                                                            "selection": sel.artifact}, tmp_path)
    assert read_json(Path(offline.artifact.path) / "verifier.json")["beta"] == doc["selected"]["beta"]


def test_reward_model_chooses_its_lr_on_the_selection_pairs(tmp_path):
    nodes = {n.id: n for n in build_plan(load_study(PIPELINES, "smoke", SMALL + [
        "reward_model.lrs=[1e-5, 1e-3]", "prepare_data.n_select_pairs=16"]))}
    data = execute(nodes["gap/seed0/prepare_data"].spec, {}, tmp_path)
    sft = execute(nodes["gap/seed0/sft"].spec, {"data": data.artifact}, tmp_path)
    rm = execute(nodes["gap/seed0/reward_model"].spec, {"data": data.artifact, "sft": sft.artifact}, tmp_path)
    sel = read_json(Path(rm.artifact.path) / "selection.json")
    assert [c["lr"] for c in sel["candidates"]] == [1e-5, 1e-3] and sel["selection_pairs"] == 16
    best = max(sel["candidates"], key=lambda c: (c["select_accuracy"], c["select_loglik"]))
    assert sel["selected"] == best["lr"] == rm.metrics["reward_model/selected_lr"]
