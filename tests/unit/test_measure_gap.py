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
    assert result.files == ["gap.json", "verifier_pairs.jsonl", "best_of_n.jsonl", "onpolicy_pairs.jsonl",
                            "likelihood.jsonl", "greedy.jsonl"]
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
    for f in ("best_of_n.jsonl", "onpolicy_pairs.jsonl", "likelihood.jsonl", "greedy.jsonl"):
        assert read_jsonl(Path(out.path) / f) == []
    assert not {"ceiling", "onpolicy", "relative_gap", "likelihood_spearman", "greedy_gold"} & set(summary)
    pair_rows = read_jsonl(Path(out.path) / "verifier_pairs.jsonl")
    assert {r["verifier"] for r in pair_rows} == {"reward_model", "offline_dpo"}  # no ceiling rows
    assert set(result.metrics) == {f"gap/{v}/val_{k}" for v in ("reward_model", "offline_dpo")
                                   for k in ("accuracy", "loglik")}
    # the same verifiers score the same held-out pairs the same way (the gold-only keys aside)
    synthetic = read_json(unit["out"] / "gap.json")["verifiers"]
    assert summary["verifiers"] == {v: {k: info[k] for k in summary["verifiers"][v]} for v, info in synthetic.items()}
    assert set(summary["verifiers"]["reward_model"]) == {"kind", "parameters", "train_examples", "val_accuracy",
                                                         "val_loglik", "val_margin"}


# --------------------------------------------------------------------------- validity numbers: the ceiling, on-policy
# verification, the relative gap, the likelihood–reward rank correlation, greedy gold


@pytest.fixture(scope="module")
def resampled(unit):
    """The SFT policy's samples of the stage, drawn again with its seed (sampling is deterministic)."""
    data = unit["inputs"]["data"].path
    gold = gold_reward_fn(task_of(data)[1])
    prompts = [r["prompt"] for r in read_jsonl(Path(data) / "eval_prompts.jsonl")][:4]
    model, tokenizer = load_policy(unit["inputs"]["policy.sft"].path)
    groups = sample(model, tokenizer, prompts, n=4, max_new_tokens=CFG.max_new_tokens, temperature=CFG.temperature,
                    seed=0, batch_size=CFG.batch_size)
    texts = [[c.text for c in g] for g in groups]
    greedy = sample(model, tokenizer, prompts, n=1, max_new_tokens=CFG.max_new_tokens, temperature=0.0, seed=0)
    return {"prompts": prompts, "texts": texts, "golds": [[gold(p, c) for c in g] for p, g in zip(prompts, texts)],
            "greedy_golds": [gold(p, g[0].text) for p, g in zip(prompts, greedy)], "model": model,
            "tokenizer": tokenizer}


def test_the_ceiling_comes_from_the_data_folder_and_bounds_the_headroom(unit):
    out, data = unit["out"], Path(unit["inputs"]["data"].path)
    summary, metrics = read_json(out / "gap.json"), unit["result"].metrics
    written = read_json(data / "ceiling.json")
    ceiling = summary["ceiling"]
    assert ceiling["source"] == "ceiling.json" and ceiling["tau"] == 0.1 == written["tau"]
    assert {k: ceiling[k] for k in written} == pytest.approx(written)
    assert metrics["gap/ceiling/accuracy"] == pytest.approx(written["accuracy"], abs=1e-6)
    assert metrics["gap/ceiling/loglik"] == pytest.approx(written["loglik"], abs=1e-6)
    # the gold reward r*/τ as a verifier on the held-out pairs: its rows in verifier_pairs.jsonl are the ceiling
    rows = [r for r in read_jsonl(out / "verifier_pairs.jsonl") if r["verifier"] == "gold"]
    val = read_jsonl(data / "pairs_val.jsonl")
    assert [r["pair_index"] for r in rows] == list(range(len(val)))
    for r, v in zip(rows, val):
        assert r["margin"] == pytest.approx((v["chosen_gold"] - v["rejected_gold"]) / 0.1, abs=1e-6)
        assert r["loglik"] == pytest.approx(-math.log1p(math.exp(-r["margin"])), abs=2e-6)
    assert statistics.fmean(r["correct"] for r in rows) == pytest.approx(written["accuracy"])
    assert statistics.fmean(r["loglik"] for r in rows) == pytest.approx(written["loglik"], abs=1e-5)
    for v in ("reward_model", "offline_dpo"):
        info = summary["verifiers"][v]
        if written["accuracy"] > 0.5:
            assert info["val_accuracy_headroom"] == pytest.approx(
                (info["val_accuracy"] - 0.5) / (written["accuracy"] - 0.5), abs=1e-5)
            assert metrics[f"gap/{v}/val_accuracy_headroom"] == info["val_accuracy_headroom"]
        assert info["val_loglik_headroom"] == pytest.approx(
            (info["val_loglik"] + math.log(2)) / (written["loglik"] + math.log(2)), abs=1e-4)


def test_onpolicy_pairs_are_the_sft_samples_ordered_by_gold(unit, resampled):
    out, summary = unit["out"], read_json(unit["out"] / "gap.json")
    golds = resampled["golds"]
    expected = [(i, a, b) if g[a] > g[b] else (i, b, a) for i, g in enumerate(golds) for a, b in ((0, 1), (2, 3))
                if g[a] != g[b]]
    on = summary["onpolicy"]
    assert on["policy"] == "sft" and on["tau"] == 0.1
    assert on["n_pairs"] == len(expected) and on["n_pairs"] + on["n_gold_ties"] == 4 * 2
    rows = read_jsonl(out / "onpolicy_pairs.jsonl")
    assert on["n_pairs"] > 0 and {r["verifier"] for r in rows} == {"reward_model", "offline_dpo"}
    assert on["ceiling"]["accuracy"] == 1.0
    assert on["ceiling"]["expected_accuracy"] == pytest.approx(
        statistics.fmean(1 / (1 + math.exp(-(golds[i][a] - golds[i][b]) / 0.1)) for i, a, b in expected), abs=1e-6)
    for v in ("reward_model", "offline_dpo"):
        mine = [r for r in rows if r["verifier"] == v]
        assert [(r["prompt_index"], r["better"], r["worse"]) for r in mine] == expected
        for r in mine:
            i, a, b = r["prompt_index"], r["better"], r["worse"]
            assert r["gold_margin"] == pytest.approx(golds[i][a] - golds[i][b], abs=1e-6) and r["gold_margin"] > 0
            p, c, m = r["label_p"], r["correct"], r["margin"]
            assert c == (1.0 if m > 0 else 0.5 if m == 0 else 0.0)
            assert r["expected_correct"] == pytest.approx(p * c + (1 - p) * (1 - c), abs=1e-6)
            assert r["loglik"] == pytest.approx(p * -math.log1p(math.exp(-m)) + (1 - p) * -math.log1p(math.exp(m)),
                                                abs=1e-5)
        info = summary["verifiers"][v]
        assert info["onpolicy_accuracy"] == pytest.approx(statistics.fmean(r["correct"] for r in mine), abs=1e-6)
        assert info["onpolicy_expected_accuracy"] == pytest.approx(
            statistics.fmean(r["expected_correct"] for r in mine), abs=1e-5)
        assert info["onpolicy_loglik"] == pytest.approx(statistics.fmean(r["loglik"] for r in mine), abs=1e-5)
        assert info["onpolicy_accuracy_headroom"] == pytest.approx(
            (info["onpolicy_expected_accuracy"] - 0.5) / (on["ceiling"]["expected_accuracy"] - 0.5), abs=1e-4)
        assert info["onpolicy_loglik_headroom"] == pytest.approx(
            (info["onpolicy_loglik"] + math.log(2)) / (on["ceiling"]["expected_loglik"] + math.log(2)), abs=1e-4)
        assert unit["result"].metrics[f"gap/{v}/onpolicy_accuracy"] == info["onpolicy_accuracy"]


def test_relative_gap_is_the_share_of_the_gold_improvement(unit):
    summary = read_json(unit["out"] / "gap.json")
    rows = read_jsonl(unit["out"] / "best_of_n.jsonl")
    for r in rows:
        assert r["gain_at_max_n"] == pytest.approx(r["values"][-1] - r["values"][0], abs=2e-6)
    gain = lambda v: sum(r["gain_at_max_n"] for r in rows if r["verifier"] == v)  # noqa: E731
    curves = summary["best_of_n"]["sft"]
    assert gain("gold") > 0
    assert set(summary["relative_gap"]["sft"]) == {"reward_model", "offline_dpo"}
    for v in ("reward_model", "offline_dpo"):
        value = summary["relative_gap"]["sft"][v]
        assert value == pytest.approx(gain(v) / gain("gold"), abs=1e-4)
        assert value == pytest.approx((curves[v][-1] - curves[v][0]) / (curves["gold"][-1] - curves["gold"][0]),
                                      abs=1e-4)
        assert value <= 1 + 1e-6
        assert unit["result"].metrics[f"gap/sft/{v}/relative_gap"] == value


def test_likelihood_spearman_on_the_sft_samples(unit, resampled):
    from scipy.stats import spearmanr

    from roads.verifiers import summed_logps

    summary = read_json(unit["out"] / "gap.json")
    rows = read_jsonl(unit["out"] / "likelihood.jsonl")
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(4) for j in range(4)]
    flat_prompts = [p for p in resampled["prompts"] for _ in range(4)]
    logps = summed_logps(resampled["model"], resampled["tokenizer"], flat_prompts,
                         [c for g in resampled["texts"] for c in g]).tolist()
    assert [r["logp"] for r in rows] == pytest.approx(logps, abs=1e-4)
    assert [r["gold"] for r in rows] == pytest.approx([g for gs in resampled["golds"] for g in gs], abs=1e-6)
    rho = summary["likelihood_spearman"]
    assert rho["policy"] == "sft" and rho["n_samples"] == 16
    assert rho["pooled"] == pytest.approx(spearmanr([r["logp"] for r in rows], [r["gold"] for r in rows]).statistic,
                                          abs=1e-5)
    within = [spearmanr(lp, g).statistic for lp, g in
              ((logps[4 * i:4 * i + 4], resampled["golds"][i]) for i in range(4))
              if len(set(g)) > 1 and len(set(lp)) > 1]
    assert rho["within_prompt_n"] == len(within)
    if within:
        assert rho["within_prompt_mean"] == pytest.approx(statistics.fmean(within), abs=1e-5)
        assert unit["result"].metrics["gap/likelihood_spearman_within"] == rho["within_prompt_mean"]


def test_greedy_gold_of_each_policy(unit, resampled):
    summary = read_json(unit["out"] / "gap.json")
    rows = read_jsonl(unit["out"] / "greedy.jsonl")
    assert [(r["policy"], r["prompt_index"]) for r in rows] == [("sft", i) for i in range(4)]
    assert [r["gold"] for r in rows] == pytest.approx(resampled["greedy_golds"], abs=1e-6)
    assert summary["greedy_gold"] == {"sft": pytest.approx(statistics.fmean(resampled["greedy_golds"]), abs=1e-6)}
    assert unit["result"].metrics["gap/sft/greedy_gold"] == summary["greedy_gold"]["sft"]


# --------------------------------------------------------------------------- the helpers on known answers


def test_onpolicy_pairs_leave_gold_ties_out():
    pairs, ties = measure_gap.onpolicy_pairs([[0.1, 0.9, 0.5, 0.5, 0.3], [0.7, 0.2, 0.4, 0.6]])
    assert pairs == [(0, 1, 0), (1, 0, 1), (1, 3, 2)] and ties == 1  # the fifth sample has no partner


def test_onpolicy_metrics_by_hand():
    ln3 = math.log(3)
    # noiseless labels: agreement and log σ(m)
    summary, rows = measure_gap.onpolicy_metrics([2.0, 0.0, -1.0], [0.5, 0.1, 0.2], 0.0)
    assert summary["accuracy"] == pytest.approx(0.5) and summary["expected_accuracy"] == pytest.approx(0.5)
    assert summary["loglik"] == pytest.approx((-math.log1p(math.exp(-2)) - math.log(2) - math.log1p(math.exp(1))) / 3,
                                              abs=1e-6)
    assert [r["correct"] for r in rows] == [1.0, 0.5, 0.0] and [r["label_p"] for r in rows] == [1.0, 1.0, 1.0]
    # τ = 1, gold margins ln 3: each label agrees with the gold order with probability ¾
    summary, rows = measure_gap.onpolicy_metrics([ln3, 0.0, -ln3], [ln3] * 3, 1.0)
    assert [r["expected_correct"] for r in rows] == pytest.approx([0.75, 0.5, 0.25])
    best, worst = 0.75 * math.log(0.75) + 0.25 * math.log(0.25), 0.75 * math.log(0.25) + 0.25 * math.log(0.75)
    assert [r["loglik"] for r in rows] == pytest.approx([best, -math.log(2), worst], abs=1e-6)
    assert summary["accuracy"] == pytest.approx(0.5) and summary["expected_accuracy"] == pytest.approx(0.5)
    # τ unknown: only the agreement
    summary, rows = measure_gap.onpolicy_metrics([1.0], [0.3], None)
    assert summary == {"accuracy": 1.0, "expected_accuracy": None, "loglik": None}
    assert measure_gap.onpolicy_metrics([], [], 0.1)[0] == {"accuracy": None, "expected_accuracy": None, "loglik": None}


def test_likelihood_spearman_by_hand():
    rho = measure_gap.likelihood_spearman([[-1.0, -2.0, -3.0], [-1.0, -1.0, -2.0]], [[0.9, 0.5, 0.1], [0.2, 0.2, 0.2]])
    # within: the second prompt's gold is constant (left out), the first is perfectly monotone
    assert rho["within_prompt_mean"] == 1.0 and rho["within_prompt_n"] == 1 and rho["n_samples"] == 6
    # pooled, by hand: ranks x (5, 2.5, 1, 5, 5, 2.5) and y (6, 5, 1, 3, 3, 3): Σdxdy 7.5, Σdx² 15, Σdy² 15.5
    assert rho["pooled"] == pytest.approx(7.5 / math.sqrt(15 * 15.5), abs=1e-6)
    assert measure_gap.likelihood_spearman([[0.0, 0.0]], [[0.1, 0.2]])["pooled"] is None


def test_ceiling_from_a_folder_without_ceiling_json(tmp_path):
    """narrow_data copies pairs_val but not ceiling.json: the ceiling is recomputed from the pairs, τ unknown."""
    val = [{"chosen_gold": 1.0, "rejected_gold": 0.0}, {"chosen_gold": 0.5, "rejected_gold": 0.5}]
    c = measure_gap.load_ceiling(tmp_path, val)
    assert c["source"] == "pairs_val" and c["tau"] is None and c["loglik"] is None
    assert c["accuracy"] == 0.75 and c["tie_fraction"] == 0.5
    assert measure_gap.load_ceiling(tmp_path, [{"prompt": "x", "chosen": "a", "rejected": "b"}]) is None
    write_json(tmp_path / "ceiling.json", {"tau": 0.0, "accuracy": 0.75})
    assert measure_gap.load_ceiling(tmp_path, val) == {"source": "ceiling.json", "tau": 0.0, "accuracy": 0.75}


def test_ceiling_rows_by_hand():
    val = [{"chosen_gold": 0.6, "rejected_gold": 0.4}, {"chosen_gold": 0.3, "rejected_gold": 0.3},
           {"chosen_gold": 0.1, "rejected_gold": 0.5}]
    rows = measure_gap.ceiling_rows(val, 0.1)
    assert [r["margin"] for r in rows] == pytest.approx([2.0, 0.0, -4.0])
    assert [r["correct"] for r in rows] == [1.0, 0.5, 0.0]
    assert [r["loglik"] for r in rows] == pytest.approx([-math.log1p(math.exp(-2)), -math.log(2),
                                                         -math.log1p(math.exp(4))], abs=1e-6)
    noiseless = measure_gap.ceiling_rows(val[:2], 0.0)
    assert [r["loglik"] for r in noiseless] == pytest.approx([0.0, -math.log(2)])


# --------------------------------------------------------------------------- the report's validity columns
# (roads.gap_report on hand-made gap folders)


def fake_gap(folder: Path, seed: int, ceiling_rows: bool = True) -> Path:
    """Two verifiers on four held-out pairs and a gold ceiling; best-of-N on two prompts; on-policy pairs."""
    import json

    folder.mkdir(parents=True)
    info = {"task": "gap", "seed": seed, "ns": [1, 4], "n_prompts": 2,
            "verifiers": {"rm": {"kind": "global", "parameters": 10, "train_examples": 8},
                          "dpo": {"kind": "implicit", "parameters": 10, "train_examples": 8}},
            "policies": {"sft": {"parameters": 10, "train_examples": 8}},
            "ceiling": {"accuracy": 0.75, "loglik": -0.4, "expected_accuracy": 0.8, "expected_loglik": -0.35,
                        "tie_fraction": 0.25, "tau": 0.1},
            "likelihood_spearman": {"pooled": 0.2 + seed, "within_prompt_mean": 0.1},
            "greedy_gold": {"sft": 0.5 + 0.1 * seed}}
    (folder / "gap.json").write_text(json.dumps(info))
    rows = [{"verifier": v, "pair_index": i, "margin": 0.0, "correct": c, "loglik": ll}
            for v, cs, lls in (("rm", [1, 1, 0, 0.5], [-0.5] * 4), ("dpo", [1, 0, 0, 0.5], [-0.6] * 4),
                               *((("gold", [1, 1, 0.5, 0.5], [-0.4] * 4),) if ceiling_rows else ()))
            for i, (c, ll) in enumerate(zip(cs, lls))]
    (folder / "verifier_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = {"gold": [[0.4, 0.8], [0.5, 0.7]], "rm": [[0.4, 0.6], [0.5, 0.6]], "dpo": [[0.4, 0.4], [0.5, 0.5]]}
    (folder / "best_of_n.jsonl").write_text("".join(
        json.dumps({"policy": "sft", "verifier": v, "prompt_index": i, "values": vals}) + "\n"
        for v, per in curves.items() for i, vals in enumerate(per)))
    (folder / "onpolicy_pairs.jsonl").write_text("".join(  # label_p 0.9: expected correct 0.9 (right) or 0.1 (wrong)
        json.dumps({"verifier": v, "pair_index": k, "correct": c, "expected_correct": 0.9 * c + 0.1 * (1 - c),
                    "loglik": -0.5, "label_p": 0.9}) + "\n"
        for v, cs in (("rm", [1.0, 0.0]), ("dpo", [1.0, 1.0])) for k, c in enumerate(cs)))
    return folder


def test_report_validity_columns_on_known_inputs(tmp_path):
    from types import SimpleNamespace

    from roads import gap_report

    cfg = SimpleNamespace(n_bootstrap=200, confidence=0.95, bootstrap_seed=0, series={})
    data = gap_report.load_gap({"a": fake_gap(tmp_path / "a", 0), "b": fake_gap(tmp_path / "b", 1)})
    vrows = {r["verifier"]: r for r in gap_report.verifier_rows(data, cfg)}
    assert set(vrows) == {"rm", "dpo", "gold"} and vrows["gold"]["kind"] == "gold"
    # accuracy headroom: Σ(correct − ½)/Σ(ceiling − ½) = (½ + ½ − ½ + 0)/(½ + ½ + 0 + 0) = ½ for rm,
    # (½ − ½ − ½ + 0)/1 = −½ for dpo
    assert vrows["rm"]["accuracy_headroom"]["mean"] == pytest.approx(0.5)
    assert vrows["dpo"]["accuracy_headroom"]["mean"] == pytest.approx(-0.5)
    ln2 = math.log(2)
    assert vrows["rm"]["loglik_headroom"] == pytest.approx({"mean": (ln2 - 0.5) / (ln2 - 0.4)} | {
        "lo": (ln2 - 0.5) / (ln2 - 0.4), "hi": (ln2 - 0.5) / (ln2 - 0.4)}, abs=1e-5)  # constant over pairs
    assert vrows["gold"]["accuracy_headroom"] is None
    # on-policy: agreement, and the expected accuracy (0.9 or 0.1) against the expected ceiling (0.9)
    assert vrows["rm"]["onpolicy_accuracy"]["mean"] == pytest.approx(0.5)
    assert vrows["rm"]["onpolicy_accuracy_headroom"]["mean"] == pytest.approx(0.0)  # (0.4 − 0.4)/(0.4 + 0.4)
    assert vrows["dpo"]["onpolicy_accuracy_headroom"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0}
    # relative gap: Σ gain / Σ gold gain = (0.2 + 0.1)/(0.4 + 0.2) = ½ for rm, 0 for dpo
    brows = gap_report.bon_rows(data, cfg)
    rel = {r["verifier"]: r["relative_gap"] for r in brows}
    assert rel["gold"] is None and rel["rm"]["mean"] == pytest.approx(0.5) and rel["dpo"]["mean"] == pytest.approx(0.0)
    assert rel["rm"]["lo"] <= 0.5 <= rel["rm"]["hi"]
    (row,) = gap_report.gap_summary(data, gap_report.verifier_diffs(data, cfg), brows, lambda task: None)
    assert row["relative_gap_global"] == rel["rm"] and row["headroom_global"] == pytest.approx(0.5)
    assert row["ceiling_accuracy"] == 0.75 and row["ceiling_expected_loglik"] == -0.35 and row["ceiling_tau"] == 0.1
    assert row["likelihood_spearman"] == pytest.approx(0.7) and row["likelihood_spearman_within"] == pytest.approx(0.1)
    assert row["greedy_gold"] == {"sft": pytest.approx(0.55)}
    gap_report.write_gap_markdown(tmp_path / "gap.md", [row], list(vrows.values()), [], brows, cfg)
    text = (tmp_path / "gap.md").read_text()
    assert "## Validity per task" in text and "| gap | 0.1 | 0.250 | 0.750 (0.800) |" in text
    assert "| gap | gold (Bayes ceiling) | gold |" in text and "sft 0.550" in text


def test_report_reads_gap_outputs_without_the_validity_files(tmp_path):
    """An older gap output (no ceiling rows, no on-policy pairs, no validity keys) still reports, without them."""
    from types import SimpleNamespace

    import json

    from roads import gap_report

    folder = fake_gap(tmp_path / "old", 0, ceiling_rows=False)
    (folder / "onpolicy_pairs.jsonl").unlink()
    info = json.loads((folder / "gap.json").read_text())
    for key in ("ceiling", "likelihood_spearman", "greedy_gold"):
        del info[key]
    (folder / "gap.json").write_text(json.dumps(info))
    cfg = SimpleNamespace(n_bootstrap=200, confidence=0.95, bootstrap_seed=0, series={})
    data = gap_report.load_gap({"old": folder})
    vrows = gap_report.verifier_rows(data, cfg)
    assert all(r["accuracy_headroom"] is None and r["onpolicy_accuracy"] is None for r in vrows)
    brows = gap_report.bon_rows(data, cfg)
    (row,) = gap_report.gap_summary(data, [], brows, lambda task: None)
    assert not any(k.startswith(("ceiling_", "likelihood_spearman", "greedy_gold")) for k in row)
    gap_report.write_gap_markdown(tmp_path / "gap.md", [row], vrows, [], brows, cfg)
    assert "## Verifiers on held-out pairs" in (tmp_path / "gap.md").read_text()
