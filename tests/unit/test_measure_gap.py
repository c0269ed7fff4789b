"""The generation–verification gap: the best-of-N estimator against known answers and brute force, and the stage
end to end on tiny data (reward model and DPO implicit reward as verifiers, SFT samples)."""

from __future__ import annotations

import itertools
import math
import random
import re
import statistics
from pathlib import Path

import pytest

from roads.artifacts import ArtifactRef, read_json, read_jsonl, write_json
from roads.config import StageSpec
from roads.settings import (MeasureGapConfig, ModelConfig, OfflineDpoConfig, PrepareDataConfig, RewardModelConfig, SftConfig, TaskConfig)
from roads.data import gold_reward_fn, task_of
from roads.generation import sample
from roads.models import load_policy
from roads.stages import measure_gap, offline_dpo, prepare_data, reward_model, sft
from roads.stages.measure_gap import best_of_n, n_grid


def brute_force(gold, scores, n):
    """Mean over all N-subsets of the gold reward of the top-scoring sample, ties averaged (= uniform tie-break)."""
    values = []
    for subset in itertools.combinations(range(len(gold)), n):
        top = max(scores[i] for i in subset)
        values.append(statistics.fmean(gold[i] for i in subset if scores[i] == top))
    return statistics.fmean(values)


def subset_mean(gold, n, pick):
    return statistics.fmean(pick(gold[i] for i in s) for s in itertools.combinations(range(len(gold)), n))


# --------------------------------------------------------------------------- the estimator


GOLDS = [[0.3, 0.1, 0.7, 0.2, 0.9, 0.4], [1.0, 0.0, 0.0, 0.5, 0.5], [0.25], [0.1, 0.1, 0.2, 0.7, 0.7, 0.0, 0.3]]


@pytest.mark.parametrize("gold", GOLDS)
def test_perfect_verifier_gives_the_expected_max(gold):
    m = len(gold)
    values = best_of_n(gold, gold, range(1, m + 1))
    assert values[0] == statistics.mean(gold)  # N = 1: exactly the mean (correctly rounded)
    assert values[-1] == max(gold)  # N = M: exactly the max
    for n, v in zip(range(1, m + 1), values):
        assert v == pytest.approx(subset_mean(gold, n, max), abs=1e-12)
    assert values == sorted(values)  # more samples never hurt a perfect verifier


@pytest.mark.parametrize("gold", GOLDS)
def test_indifferent_verifier_gives_the_mean_for_every_n(gold):
    assert best_of_n(gold, [0.5] * len(gold), range(1, len(gold) + 1)) == [statistics.mean(gold)] * len(gold)


@pytest.mark.parametrize("gold", GOLDS)
def test_reversed_verifier_gives_the_expected_min(gold):
    m = len(gold)
    values = best_of_n(gold, [-g for g in gold], range(1, m + 1))
    assert values[-1] == min(gold)
    for n, v in zip(range(1, m + 1), values):
        assert v == pytest.approx(subset_mean(gold, n, min), abs=1e-12)


def test_matches_brute_force_with_ties():
    rng = random.Random(0)
    for _ in range(60):
        m = rng.randint(1, 8)
        gold = [rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()]) for _ in range(m)]
        scores = [float(rng.randint(0, 3)) for _ in range(m)]  # many ties
        ns = list(range(1, m + 1))
        assert best_of_n(gold, scores, ns) == pytest.approx([brute_force(gold, scores, n) for n in ns], abs=1e-12)


def test_order_of_samples_does_not_matter():
    gold, scores = [0.1, 0.9, 0.4, 0.4, 0.8], [2.0, 1.0, 2.0, 0.0, 1.0]
    perm = [3, 0, 4, 1, 2]
    assert best_of_n(gold, scores, [1, 2, 3, 5]) == best_of_n([gold[i] for i in perm], [scores[i] for i in perm],
                                                              [1, 2, 3, 5])


def test_n_must_fit_the_samples():
    with pytest.raises(ValueError):
        best_of_n([0.1, 0.2], [1.0, 2.0], [3])
    with pytest.raises(ValueError):
        best_of_n([0.1, 0.2], [1.0, 2.0], [0])
    with pytest.raises(ValueError):
        best_of_n([0.1, 0.2], [1.0], [1])


def test_large_m_does_not_overflow():
    rng = random.Random(1)
    gold = [rng.random() for _ in range(512)]
    values = best_of_n(gold, gold, n_grid(512))
    assert values[0] == pytest.approx(statistics.mean(gold)) and values[-1] == max(gold)
    assert values == sorted(values) and all(math.isfinite(v) for v in values)


def test_n_grid():
    assert n_grid(1) == [1]
    assert n_grid(4) == [1, 2, 4]
    assert n_grid(64) == [1, 2, 4, 8, 16, 32, 64]
    assert n_grid(10) == [1, 2, 4, 8, 10]
    with pytest.raises(ValueError):
        n_grid(0)


# --------------------------------------------------------------------------- the stage on tiny data (an SFT policy
# trained just enough, lr 1e-2, that its samples earn varied gold rewards)

NS = [1, 2, 4]
CFG = MeasureGapConfig(verifiers=["reward_model", "offline_dpo"], policies=["sft"], max_n=4, n_prompts=4, max_new_tokens=10,
                batch_size=64)


def run_stage(module, spec: StageSpec, inputs: dict[str, ArtifactRef], out: Path):
    out.mkdir(parents=True)
    result = module.run(spec, inputs, out)
    return result, ArtifactRef(path=str(out), digest=out.name)


@pytest.fixture(scope="module")
def unit(tmp_path_factory):
    root = tmp_path_factory.mktemp("gap")
    seed = 0
    _, data = run_stage(prepare_data, StageSpec(
        stage="prepare_data", seed=seed, task_name="gap", task=TaskConfig(family="gap"),
        params=PrepareDataConfig(n_sft=128, n_pairs=32, n_val_pairs=8, n_eval_prompts=8).model_dump()),
        {}, root / "data")
    _, sft_ref = run_stage(sft, StageSpec(stage="sft", seed=seed, model=ModelConfig(preset="tiny"),
                                          params=SftConfig(epochs=2, batch_size=16, lr=1e-2).model_dump()),
                           {"data": data}, root / "sft")
    _, rm_ref = run_stage(reward_model, StageSpec(stage="reward_model", seed=seed,
                                                  params=RewardModelConfig(epochs=1, batch_size=16).model_dump()),
                          {"data": data, "sft": sft_ref}, root / "reward_model")
    _, dpo_ref = run_stage(offline_dpo, StageSpec(stage="offline_dpo", seed=seed,
                                                  params=OfflineDpoConfig(epochs=1, batch_size=16).model_dump()),
                           {"data": data, "sft": sft_ref}, root / "offline_dpo")
    inputs = {"data": data, "reference": sft_ref, "verifier.reward_model": rm_ref, "verifier.offline_dpo": dpo_ref,
              "policy.sft": sft_ref}
    spec = StageSpec(stage="measure_gap", seed=seed, params=CFG.model_dump())
    result, out = run_stage(measure_gap, spec, inputs, root / "out")
    return {"inputs": inputs, "result": result, "out": Path(out.path), "root": root}


def test_stage_writes_its_files(unit):
    result, out = unit["result"], unit["out"]
    assert result.files == ["gap.json", "verifier_pairs.jsonl", "best_of_n.jsonl"]
    assert all((out / f).is_file() for f in result.files)
    assert all(re.fullmatch(r"[A-Za-z0-9_/.-]+", k) for k in result.metrics)
    assert all(math.isfinite(v) for v in result.metrics.values())
    for v in ("reward_model", "offline_dpo"):
        assert f"gap/{v}/val_accuracy" in result.metrics and f"gap/{v}/val_loglik" in result.metrics
    for v in ("reward_model", "offline_dpo", "gold"):
        assert f"gap/sft/{v}/bon_at_1" in result.metrics and f"gap/sft/{v}/bon_at_4" in result.metrics


def test_gap_json_describes_verifiers_and_policies(unit):
    summary = read_json(unit["out"] / "gap.json")
    assert summary["task"] == "gap" and summary["seed"] == 0
    assert summary["ns"] == NS and summary["n_prompts"] == 4
    assert set(summary["verifiers"]) == {"reward_model", "offline_dpo"}
    assert summary["verifiers"]["reward_model"]["kind"] == "global"
    assert summary["verifiers"]["offline_dpo"]["kind"] == "implicit"
    for info in summary["verifiers"].values():
        assert 0.0 <= info["val_accuracy"] <= 1.0 and math.isfinite(info["val_accuracy"])
        assert info["val_loglik"] <= 0.0 and math.isfinite(info["val_margin"])
        assert info["parameters"] > 0 and info["train_examples"] in (None, 32)
    assert set(summary["policies"]) == {"sft"}
    assert summary["policies"]["sft"]["parameters"] > 0 and 0.0 <= summary["policies"]["sft"]["gold_mean"] <= 1.0
    assert set(summary["best_of_n"]) == {"sft"}
    assert set(summary["best_of_n"]["sft"]) == {"reward_model", "offline_dpo", "gold"}
    assert all(len(curve) == len(NS) for curve in summary["best_of_n"]["sft"].values())


def test_verifier_pairs_agree_with_the_summary(unit):
    rows = read_jsonl(unit["out"] / "verifier_pairs.jsonl")
    summary = read_json(unit["out"] / "gap.json")["verifiers"]
    for v in ("reward_model", "offline_dpo"):
        mine = [r for r in rows if r["verifier"] == v]
        assert [r["pair_index"] for r in mine] == list(range(8))
        for r in mine:
            assert r["correct"] == (1.0 if r["margin"] > 0 else 0.5 if r["margin"] == 0 else 0.0)
            assert r["loglik"] == pytest.approx(-math.log1p(math.exp(-r["margin"])), abs=2e-6)
        assert statistics.fmean(r["correct"] for r in mine) == pytest.approx(summary[v]["val_accuracy"], abs=1e-6)
        assert statistics.fmean(r["loglik"] for r in mine) == pytest.approx(summary[v]["val_loglik"], abs=1e-5)
        assert unit["result"].metrics[f"gap/{v}/val_accuracy"] == summary[v]["val_accuracy"]


def test_best_of_n_curves_are_bounded_by_gold_and_its_reverse(unit):
    """Re-sample the SFT policy with the stage's seed (sampling is deterministic): the gold curve is the expected max
    over N-subsets, every learnt verifier lies between the expected min and the expected max."""
    out, inputs = unit["out"], unit["inputs"]
    summary = read_json(out / "gap.json")
    rows = read_jsonl(out / "best_of_n.jsonl")
    assert len(rows) == 3 * 4 and all(len(r["values"]) == len(NS) for r in rows)
    data = inputs["data"].path
    gold = gold_reward_fn(task_of(data)[1])
    prompts = [r["prompt"] for r in read_jsonl(Path(data) / "eval_prompts.jsonl")][:4]
    model, tokenizer = load_policy(inputs["policy.sft"].path)
    groups = sample(model, tokenizer, prompts, n=4, max_new_tokens=CFG.max_new_tokens, temperature=CFG.temperature,
                    seed=0, batch_size=CFG.batch_size)
    golds = [[gold(p, c.text) for c in group] for p, group in zip(prompts, groups)]
    assert summary["policies"]["sft"]["gold_mean"] == pytest.approx(
        statistics.fmean(g for group in golds for g in group), abs=1e-6)

    assert len({g for group in golds for g in group}) > 2  # the SFT policy learnt enough for the curves to mean something
    by_key = {(r["verifier"], r["prompt_index"]): r["values"] for r in rows}
    for i, g in enumerate(golds):
        top = best_of_n(g, g, NS)
        bottom = best_of_n(g, [-x for x in g], NS)
        assert by_key[("gold", i)] == pytest.approx(top, abs=1e-6)
        assert by_key[("gold", i)] == sorted(by_key[("gold", i)])  # non-decreasing in N
        assert by_key[("gold", i)][0] == pytest.approx(statistics.fmean(g), abs=1e-6)
        for v in ("reward_model", "offline_dpo"):
            for lo, val, hi in zip(bottom, by_key[(v, i)], top):
                assert lo - 1e-6 <= val <= hi + 1e-6, (v, i)

    curves = summary["best_of_n"]["sft"]
    assert curves["gold"] == sorted(curves["gold"]) and curves["gold"][-1] > curves["gold"][0]
    assert curves["gold"][0] == pytest.approx(summary["policies"]["sft"]["gold_mean"], abs=1e-5)
    for v in ("reward_model", "offline_dpo"):
        assert all(a <= b + 1e-6 for a, b in zip(curves[v], curves["gold"]))
        assert curves[v][0] == pytest.approx(curves["gold"][0], abs=1e-5)  # N = 1 is the policy's mean, any verifier


def test_without_a_gold_reward_only_verification_is_measured(unit, tmp_path):
    """Real preference data has no gold reward: no sampling, no best-of-N, still the held-out metrics."""
    source = Path(unit["inputs"]["data"].path)
    data = tmp_path / "data"
    data.mkdir()
    for f in source.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    write_json(data / "task.json", {"name": "real", "family": "preferences", "source": "some/hub-dataset"})
    inputs = {**unit["inputs"], "data": ArtifactRef(path=str(data), digest="real")}
    spec = StageSpec(stage="measure_gap", seed=0, params=CFG.model_dump())
    result, out = run_stage(measure_gap, spec, inputs, tmp_path / "out")
    summary = read_json(Path(out.path) / "gap.json")
    assert "best_of_n" not in summary and "gold_mean" not in summary["policies"]["sft"]
    assert summary["task"] == "real" and set(summary["verifiers"]) == {"reward_model", "offline_dpo"}
    assert read_jsonl(Path(out.path) / "best_of_n.jsonl") == []
    assert set(result.metrics) == {f"gap/{v}/val_{k}" for v in ("reward_model", "offline_dpo")
                                   for k in ("accuracy", "loglik")}
    # the same verifiers score the same held-out pairs the same way
    assert summary["verifiers"] == read_json(unit["out"] / "gap.json")["verifiers"]
