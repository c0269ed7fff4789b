"""The labels' Bayes ceiling (the gold reward as a verifier on Bradley–Terry labels) against hand-computed numbers,
its expectation against a Monte Carlo draw of the labels, and prepare_data's ceiling.json."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from roads.artifacts import read_json, read_jsonl
from roads.config import StageSpec
from roads.data.synthetic import bradley_terry_prefers_first
from roads.settings import PrepareDataConfig, TaskConfig
from roads.stages import prepare_data
from roads import verifiers
from roads.ceiling import CHANCE_ACCURACY, CHANCE_LOGLIK, bayes_ceiling, headroom, label_probability, log_sigmoid
from roads.verifiers import preference_metrics

LN2, LN3 = math.log(2), math.log(3)


def test_noiseless_labels_with_a_tie():
    # Δ = 1, 0 (a tie), 0.2: two strict pairs in gold order and one coin flip
    c = bayes_ceiling([1.0, 0.5, 0.3], [0.0, 0.5, 0.1], 0.0)
    assert c["tau"] == 0.0 and c["n_pairs"] == 3
    assert c["accuracy"] == pytest.approx(5 / 6) and c["expected_accuracy"] == pytest.approx(5 / 6)
    assert c["loglik"] == pytest.approx(-LN2 / 3) and c["expected_loglik"] == pytest.approx(-LN2 / 3)
    assert c["tie_fraction"] == pytest.approx(1 / 3)


def test_noiseless_labels_are_perfect_without_ties():
    c = bayes_ceiling([0.9, 0.4], [0.1, 0.3], 0.0)
    assert (c["accuracy"], c["loglik"], c["expected_accuracy"], c["expected_loglik"], c["tie_fraction"]) == (
        1.0, 0.0, 1.0, 0.0, 0.0)


def test_a_noiseless_label_against_the_gold_order_is_impossible():
    with pytest.raises(ValueError, match="noiseless"):
        bayes_ceiling([0.1], [0.9], 0.0)


def test_noisy_labels_one_with_one_against_the_gold_order():
    # τ = 1, Δ = ±ln 3: σ(ln 3) = 3/4. Realised: one label right, one wrong; expected: 3/4 right per pair
    c = bayes_ceiling([LN3, 0.0], [0.0, LN3], 1.0)
    assert c["accuracy"] == pytest.approx(0.5)
    assert c["loglik"] == pytest.approx((math.log(3 / 4) + math.log(1 / 4)) / 2)  # = (ln 3 − 4 ln 2)/2
    assert c["expected_accuracy"] == pytest.approx(0.75)
    assert c["expected_loglik"] == pytest.approx(0.75 * LN3 - 2 * LN2)  # ¾ log ¾ + ¼ log ¼ ≈ −0.5623
    assert c["tie_fraction"] == 0.0


def test_temperature_scales_the_margin():
    # Δ = ½ ln 3 at τ = ½ is the same label distribution as Δ = ln 3 at τ = 1
    assert bayes_ceiling([0.5 * LN3], [0.0], 0.5)["loglik"] == pytest.approx(math.log(0.75))
    assert bayes_ceiling([0.5 * LN3], [0.0], 0.5)["expected_accuracy"] == pytest.approx(0.75)
    # a high temperature leaves the labels nearly coin flips: the ceiling sinks to chance
    hot = bayes_ceiling([1.0, 0.8], [0.0, 0.1], 1e6)
    assert hot["expected_accuracy"] == pytest.approx(0.5, abs=1e-6)
    assert hot["expected_loglik"] == pytest.approx(CHANCE_LOGLIK, abs=1e-6)


def test_unknown_temperature_gives_the_temperature_free_numbers_only():
    c = bayes_ceiling([1.0, 0.5, 0.2], [0.0, 0.5, 0.4], None)
    assert c["accuracy"] == pytest.approx(0.5) and c["tie_fraction"] == pytest.approx(1 / 3)
    assert c["loglik"] is None and c["expected_accuracy"] is None and c["expected_loglik"] is None


def test_bad_inputs():
    with pytest.raises(ValueError):
        bayes_ceiling([], [], 0.1)
    with pytest.raises(ValueError):
        bayes_ceiling([0.1, 0.2], [0.3], 0.1)
    with pytest.raises(ValueError):
        bayes_ceiling([0.1], [0.3], -1.0)


def test_the_realised_ceiling_is_the_gold_reward_scored_as_a_verifier():
    """Accuracy counts ties half as preference_metrics does; the log-likelihood is that of the verifier r*/τ."""
    rng = random.Random(3)
    chosen = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(40)]
    rejected = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(40)]
    tau = 0.2
    c = bayes_ceiling(chosen, rejected, tau)
    m = preference_metrics(torch.tensor(chosen, dtype=torch.float64) / tau,
                           torch.tensor(rejected, dtype=torch.float64) / tau)
    assert c["accuracy"] == pytest.approx(m["accuracy"]) and c["loglik"] == pytest.approx(m["loglik"])
    assert c["tie_fraction"] == pytest.approx(statistics.fmean(a == b for a, b in zip(chosen, rejected)))


def test_the_expected_ceiling_is_the_mean_over_label_draws():
    """Hold the pairs fixed, draw the labels as prepare_data does many times: the realised ceiling averages to the
    expected one."""
    pairs = [(0.9, 0.1), (0.5, 0.45), (0.3, 0.3), (0.2, 0.6)]
    tau, draws = 0.25, 20000
    rng = random.Random(0)
    acc, ll = [], []
    for _ in range(draws):
        labelled = [(a, b) if bradley_terry_prefers_first(a, b, tau, rng) else (b, a) for a, b in pairs]
        c = bayes_ceiling([a for a, _ in labelled], [b for _, b in labelled], tau)
        acc.append(c["accuracy"])
        ll.append(c["loglik"])
    expected = bayes_ceiling([a for a, _ in pairs], [b for _, b in pairs], tau)
    assert statistics.fmean(acc) == pytest.approx(expected["expected_accuracy"], abs=0.005)
    assert statistics.fmean(ll) == pytest.approx(expected["expected_loglik"], abs=0.005)


def test_no_other_scale_of_the_gold_reward_expects_more_log_likelihood():
    """The label model r*/τ maximises the expected log-likelihood (Gibbs' inequality): k·r*/τ for k ≠ 1 does worse."""
    deltas, tau = [0.8, 0.3, 0.05, 0.5], 0.2
    best = bayes_ceiling(deltas, [0.0] * 4, tau)["expected_loglik"]
    for k in (0.25, 0.5, 0.9, 1.1, 2.0, 5.0):
        value = statistics.fmean(label_probability(d, tau) * log_sigmoid(k * d / tau)
                                 + (1 - label_probability(d, tau)) * log_sigmoid(-k * d / tau) for d in deltas)
        assert value < best


def test_the_verifiers_module_offers_the_ceiling():
    assert verifiers.bayes_ceiling is bayes_ceiling and verifiers.headroom is headroom


def test_label_probability():
    assert label_probability(LN3, 1.0) == pytest.approx(0.75)
    assert label_probability(-LN3, 1.0) == pytest.approx(0.75)  # of the label agreeing with the gold order
    assert label_probability(0.0, 1.0) == 0.5 and label_probability(0.0, 0.0) == 0.5
    assert label_probability(0.3, 0.0) == 1.0
    assert label_probability(1.0, 1e-6) == 1.0  # no overflow


def test_headroom():
    assert headroom(0.75, 1.0, CHANCE_ACCURACY) == pytest.approx(0.5)
    assert headroom(0.5, 0.9, CHANCE_ACCURACY) == 0.0
    assert headroom(0.9, 0.9, CHANCE_ACCURACY) == pytest.approx(1.0)
    assert headroom(-0.5, -0.25, CHANCE_LOGLIK) == pytest.approx((-0.5 + LN2) / (-0.25 + LN2))
    assert headroom(0.7, 0.5, CHANCE_ACCURACY) is None  # the ceiling at chance: nothing to learn
    assert headroom(None, 0.9, CHANCE_ACCURACY) is None and headroom(0.7, None, CHANCE_ACCURACY) is None


def test_log_sigmoid_is_stable():
    assert log_sigmoid(0.0) == pytest.approx(-LN2)
    assert log_sigmoid(800.0) == 0.0 and log_sigmoid(-800.0) == pytest.approx(-800.0)
    assert log_sigmoid(LN3) == pytest.approx(math.log(0.75))


# --------------------------------------------------------------------------- prepare_data writes it


@pytest.mark.parametrize("tau", [0.1, 0.0])
def test_prepare_data_writes_the_ceiling_of_pairs_val(tmp_path, tau):
    cfg = PrepareDataConfig(n_sft=8, n_pairs=8, n_val_pairs=50, n_sft_val=4, n_eval_prompts=4, bt_temperature=tau)
    spec = StageSpec(stage="prepare_data", seed=0, task_name="gap", task=TaskConfig(family="gap"),
                     params=cfg.model_dump())
    result = prepare_data.run(spec, {}, tmp_path)
    assert "ceiling.json" in result.files and (tmp_path / "ceiling.json").is_file()
    written = read_json(tmp_path / "ceiling.json")
    val = read_jsonl(tmp_path / "pairs_val.jsonl")
    again = bayes_ceiling([r["chosen_gold"] for r in val], [r["rejected_gold"] for r in val], tau)
    assert written == pytest.approx({"split": "pairs_val", **again})
    assert written["tau"] == tau and written["n_pairs"] == 50
    assert result.metrics["prepare_data/ceiling_accuracy"] == pytest.approx(written["accuracy"])
    assert result.metrics["prepare_data/ceiling_loglik"] == pytest.approx(written["loglik"])
    assert CHANCE_ACCURACY < written["expected_accuracy"] <= 1.0 and CHANCE_LOGLIK < written["expected_loglik"] <= 0.0
    if tau == 0:  # noiseless: every strict pair right, every tie a coin
        assert written["accuracy"] == pytest.approx(1 - 0.5 * written["tie_fraction"])
        assert written["loglik"] == pytest.approx(written["tie_fraction"] * CHANCE_LOGLIK)


def test_real_data_has_no_ceiling(tmp_path):
    source = tmp_path / "prefs.jsonl"
    source.write_text("".join(f'{{"prompt": "q{i}", "chosen": " a", "rejected": " b"}}\n' for i in range(20)))
    cfg = PrepareDataConfig(n_sft=8, n_pairs=8, n_val_pairs=2, n_sft_val=2, n_eval_prompts=2)
    spec = StageSpec(stage="prepare_data", seed=0, task_name="real",
                     task=TaskConfig(family="preferences", source=str(source)), params=cfg.model_dump())
    out = tmp_path / "out"
    out.mkdir()
    result = prepare_data.run(spec, {}, out)
    assert "ceiling.json" not in result.files and not (out / "ceiling.json").exists()
    assert not any("ceiling" in k for k in result.metrics)


def test_a_pair_of_identical_texts_is_a_tie_whatever_the_float_noise_of_its_scores():
    """The same text scored in two batches of different padding differs in the last bits; on 2-token responses a
    sixth of the pairs are such, and counting their noise as wins and losses moved an accuracy by 0.04 between two
    trainings that differed only in float rounding. Marked identical, each pair is a tie: half a win, log ½."""
    chosen = torch.tensor([1.0, 0.5 + 1e-6, 2.0, 0.25 + 1e-6])
    rejected = torch.tensor([0.0, 0.5, 3.0, 0.25])
    texts = ([" a b", " c d", " e f", " g h"], [" b a", " c d", " f e", " g h"])
    identical = verifiers.same_text(*texts)
    assert identical == [False, True, False, True]
    noisy = preference_metrics(chosen, rejected)
    assert noisy["accuracy"] == pytest.approx(0.75)  # the noise counted as two wins
    tied = preference_metrics(chosen, rejected, identical)
    assert tied["accuracy"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert tied["loglik"] == pytest.approx((log_sigmoid(1.0) + 2 * CHANCE_LOGLIK + log_sigmoid(-1.0)) / 4)
    assert preference_metrics(chosen, rejected, [False] * 4) == noisy
    flipped = torch.tensor([1.0, 0.5 - 1e-6, 2.0, 0.25 - 1e-6])
    assert preference_metrics(flipped, rejected)["accuracy"] == pytest.approx(0.25)  # the same noise, other sign
    assert preference_metrics(flipped, rejected, identical) == tied  # the noise's sign no longer matters
