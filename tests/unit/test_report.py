"""Stage `report` on synthetic evaluate outputs whose answers are known: constants, i.i.d. draws with a known
mean and spread, exactly shifted policies, SFT against itself, real data without gold reward, determinism."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from roads.artifacts import ArtifactRef, read_json
from roads.config import StageSpec
from roads.settings import ReportConfig
from roads.errors import DataError
from roads.stages.report import FILES, bootstrap_interval, run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Z95 = 1.959964


def spec(**overrides) -> StageSpec:
    return StageSpec(stage="report", params=ReportConfig(**overrides).model_dump(), seed=0)


def write_eval(root: Path, task: str, policy: str, seed: int, gold=None, ref_gold=None, n_prompts: int = 4,
               samples: int = 2, kl: float = 0.0, length: float = 5.0, extra: dict | None = None) -> ArtifactRef:
    """A fake evaluate folder. ``gold``/``ref_gold``: arrays of shape (n_prompts, samples), or None (real data)."""
    folder = root / f"{task}-{seed}-{policy}"
    folder.mkdir(parents=True)
    rows = []
    for p in range(n_prompts):
        for s in range(samples):
            row = {"prompt_index": p, "sample_index": s, "prompt": f"p{p}", "completion": "c", "length": length,
                   "finished": True, "logp": -1.0 + kl, "ref_logp": -1.0, "reference_completion": "r"}
            if gold is not None:
                row["gold_reward"] = float(gold[p][s])
                row["reference_gold_reward"] = float(ref_gold[p][s])
            rows.append(row)
    metrics = {"policy": policy, "task": task, "seed": seed, "kl_to_reference": kl, "length_mean": length,
               "finished_rate": 1.0}
    if gold is not None:
        metrics["gold_reward_mean"] = float(np.mean(gold))
    metrics.update(extra or {})
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ArtifactRef(path=str(folder), digest=folder.name)


def run_report(tmp_path: Path, inputs: dict, **cfg):
    out = tmp_path / "out"
    out.mkdir()
    return run(spec(**cfg), inputs, out), out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- bootstrap_interval


def test_constant_values_give_a_zero_width_interval():
    mean, lo, hi = bootstrap_interval([np.full(50, 0.7)] * 3, n_bootstrap=200, rng=1)
    assert mean == pytest.approx(0.7) and lo == pytest.approx(0.7) and hi == pytest.approx(0.7)


def test_one_seed_width_matches_the_normal_interval():
    """One seed: only prompts are resampled, so the interval is the usual one, ±1.96 σ/√n around the mean."""
    rng = np.random.default_rng(7)
    n = 1200
    for values, true_mean, sigma in [(rng.uniform(size=n), 0.5, math.sqrt(1 / 12)),
                                     (rng.binomial(1, 0.3, size=n).astype(float), 0.3, math.sqrt(0.21))]:
        mean, lo, hi = bootstrap_interval([values], n_bootstrap=2000, rng=0)
        assert lo <= true_mean <= hi
        assert lo < mean < hi
        assert (hi - lo) == pytest.approx(2 * Z95 * sigma / math.sqrt(n), rel=0.3)


def test_three_seeds_iid_interval_contains_the_mean_and_has_the_hierarchical_width():
    """3 seeds × 400 prompts of i.i.d. Uniform(0, 1). Resampling seeds, then prompts, has bootstrap variance
    s_b²/S + σ²/(S·P) (s_b² the between-seed variance of seed means, divisor S): prompt noise enters twice, so the
    interval is conservative — on average √(1 + (S−1)/S) times the i.i.d. width, never narrower."""
    rng = np.random.default_rng(3)
    S, P = 3, 400
    seeds = [rng.uniform(size=P) for _ in range(S)]
    mean, lo, hi = bootstrap_interval(seeds, n_bootstrap=4000, rng=0)
    assert lo <= 0.5 <= hi
    assert mean == pytest.approx(np.mean(np.concatenate(seeds)))
    seed_means = np.array([s.mean() for s in seeds])
    within = np.mean([s.var() for s in seeds]) / (S * P)
    expected = 2 * Z95 * math.sqrt(seed_means.var() / S + within)
    assert (hi - lo) == pytest.approx(expected, rel=0.1)
    iid = 2 * Z95 * math.sqrt(1 / 12) / math.sqrt(S * P)
    assert 0.9 * iid <= hi - lo <= 1.3 * math.sqrt(2) * iid


def test_bootstrap_interval_handles_several_metrics_and_unequal_seeds():
    a = np.stack([np.zeros(10), np.ones(10)], axis=1)
    b = np.stack([np.ones(3), np.ones(3)], axis=1)
    mean, lo, hi = bootstrap_interval([a, b], n_bootstrap=300, rng=0)
    assert mean.shape == lo.shape == hi.shape == (2,)
    assert mean[0] == pytest.approx(0.5) and mean[1] == pytest.approx(1.0)
    assert lo[0] == pytest.approx(0.0) and hi[0] == pytest.approx(1.0)  # seeds {a,a} or {b,b} are drawn
    assert lo[1] == pytest.approx(1.0) and hi[1] == pytest.approx(1.0)


def test_bootstrap_interval_is_deterministic():
    values = [np.random.default_rng(i).normal(size=30) for i in range(3)]
    assert bootstrap_interval(values, rng=5) == bootstrap_interval(values, rng=5)
    assert bootstrap_interval(values, rng=5)[1] != bootstrap_interval(values, rng=6)[1]


# --------------------------------------------------------------------------- the stage


def test_constant_policy_and_sft_against_itself(tmp_path):
    inputs = {}
    for seed in range(3):
        const = np.full((6, 2), 0.7)
        inputs[f"gap/seed{seed}/evaluate[sft]"] = write_eval(tmp_path, "gap", "sft", seed, const, const, 6)
        ref = np.random.default_rng(seed).uniform(size=(6, 2))
        inputs[f"gap/seed{seed}/evaluate[dpo]"] = write_eval(tmp_path, "gap", "offline_dpo", seed, const, ref, 6)
    result, out = run_report(tmp_path, inputs, n_bootstrap=200)
    rows = {r["policy"]: r for r in read_csv(out / "report.csv")}
    for policy in ("sft", "offline_dpo"):
        for col in ("gold_reward_mean", "gold_reward_mean_lo", "gold_reward_mean_hi"):
            assert float(rows[policy][col]) == pytest.approx(0.7)
    for col in ("win_rate", "win_rate_lo", "win_rate_hi"):
        assert float(rows["sft"][col]) == 0.5  # gold == reference gold everywhere: every sample ties
    assert result.metrics["report/gap/sft/win_rate"] == 0.5
    assert result.metrics["report/gap/offline_dpo/gold_reward_mean"] == pytest.approx(0.7)
    assert rows["sft"]["seeds"] == "3" and rows["sft"]["n_prompts"] == "6"


def test_iid_policy_through_the_stage_contains_the_true_mean(tmp_path):
    rng = np.random.default_rng(11)
    inputs = {f"e{s}": write_eval(tmp_path, "gap", "online_rl", s, rng.binomial(1, 0.4, size=(400, 1)),
                                  np.zeros((400, 1)), 400, samples=1) for s in range(3)}
    result, out = run_report(tmp_path, inputs)
    row = read_json(out / "report.json")["rows"][0]["metrics"]["gold_reward_mean"]
    assert row["lo"] <= 0.4 <= row["hi"]
    assert 0.5 * 2 * Z95 * math.sqrt(0.24 / 1200) < row["hi"] - row["lo"] < 2.5 * 2 * Z95 * math.sqrt(0.24 / 1200)


def test_paired_difference_exact_shift_and_independent_noise(tmp_path):
    inputs = {}
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        a = rng.uniform(0, 0.8, size=(50, 2))
        ref = rng.uniform(size=(50, 2))
        inputs[f"a{seed}"] = write_eval(tmp_path, "gap", "offline_dpo", seed, a, ref, 50)
        inputs[f"b{seed}"] = write_eval(tmp_path, "gap", "online_dpo_sft", seed, a + 0.1, ref, 50)
        noise = rng.uniform(0, 0.8, size=(50, 2))  # same mean as a, independent of it
        inputs[f"c{seed}"] = write_eval(tmp_path, "gap", "online_rl", seed, noise, ref, 50)
    result, out = run_report(tmp_path, inputs, n_bootstrap=500)
    pairs = {(r["policy"], r["metric"]): r for r in read_csv(out / "paired.csv")}
    assert set(pairs) == {(policy, m) for policy in ("online_dpo_sft", "online_rl") for m in ("gold_reward_mean", "win_rate")}
    shift = pairs[("online_dpo_sft", "gold_reward_mean")]
    assert shift["baseline"] == "offline_dpo"
    assert float(shift["diff"]) == pytest.approx(0.1, abs=1e-6)
    assert float(shift["lo"]) == pytest.approx(0.1, abs=1e-6) and float(shift["hi"]) == pytest.approx(0.1, abs=1e-6)
    assert shift["excludes_zero"] == "True"
    noise = pairs[("online_rl", "gold_reward_mean")]
    assert float(noise["lo"]) < 0 < float(noise["hi"]) and noise["excludes_zero"] == "False"
    assert result.metrics["report/gap/online_dpo_sft/gold_reward_diff"] == pytest.approx(0.1, abs=1e-6)
    assert "report/gap/offline_dpo/gold_reward_diff" not in result.metrics


def test_outputs_tables_and_plots(tmp_path):
    policies = ["online_rl", "sft", "offline_dpo", "zeta", "online_dpo_sft", "alpha"]
    inputs = {}
    for task in ("hidden", "gap", "short"):
        for seed in range(2):
            for policy in policies:
                rng = np.random.default_rng(hash((task, seed, policy)) % 2**32)
                ref = rng.uniform(size=(5, 2))
                gold = ref if policy == "sft" else rng.uniform(size=(5, 2))
                inputs[f"{task}/seed{seed}/evaluate[{policy}]"] = write_eval(tmp_path, task, policy, seed, gold, ref, 5,
                                                                          kl=0.1 * len(policy), length=len(policy))
    listed = ["sft", "offline_dpo", "online_dpo_sft", "online_rl"]  # report.policies: the pipeline's order
    result, out = run_report(tmp_path, inputs, n_bootstrap=200, policies=listed)
    assert sorted(result.files) == sorted([*FILES, "hypotheses.md", "hypotheses.csv"])
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    for png in ("win_rate_by_policy.png", "gold_vs_kl.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE
    rows = read_csv(out / "report.csv")
    metrics = ("gold_reward_mean", "win_rate", "kl_to_reference", "length_mean")
    columns = [f"{m}{s}" for m in metrics for s in ("", "_lo", "_hi")]
    assert list(rows[0]) == ["task", "policy", "seeds", "n_prompts", *columns]
    order = [*listed, "zeta", "alpha"]  # then the policies it does not list, in the order first seen
    assert [(r["task"], r["policy"]) for r in rows] == [(t, a) for t in ("gap", "short", "hidden") for a in order]
    assert float(rows[0]["kl_to_reference"]) == pytest.approx(0.3)
    assert float(rows[0]["length_mean"]) == pytest.approx(3.0)
    paired_rows = read_csv(out / "paired.csv")
    assert list(paired_rows[0]) == ["task", "policy", "baseline", "metric", "diff", "lo", "hi", "excludes_zero"]
    assert len(paired_rows) == 3 * 4 * 2  # every policy but sft and the baseline, per task, two metrics
    md = (out / "report.md").read_text()
    assert "| task | policy | seeds | gold reward [lo, hi] | win rate vs SFT [lo, hi] | KL | length |" in md
    assert "percentile bootstrap" in md and "95%" in md
    for policy in policies:
        assert f"| {policy} |" in md
    assert all(k.startswith("report/") and all(c.isalnum() or c in "/_" for c in k) for k in result.metrics)
    assert all(isinstance(v, float) for v in result.metrics.values())


def test_real_data_without_gold_reward(tmp_path):
    inputs = {f"hh/seed{s}/evaluate[{policy}]": write_eval(tmp_path, "hh-rlhf", policy, s, kl=kl, length=7.0)
              for s in range(2) for policy, kl in (("sft", 0.0), ("offline_dpo", 0.2), ("online_dpo_sft", 0.4))}
    result, out = run_report(tmp_path, inputs, n_bootstrap=200)
    rows = {r["policy"]: r for r in read_csv(out / "report.csv")}
    assert rows["offline_dpo"]["gold_reward_mean"] == "" and rows["offline_dpo"]["win_rate_hi"] == ""
    assert float(rows["online_dpo_sft"]["kl_to_reference"]) == pytest.approx(0.4)
    assert float(rows["online_dpo_sft"]["kl_to_reference_lo"]) == pytest.approx(0.4)
    assert float(rows["sft"]["length_mean"]) == pytest.approx(7.0)
    assert read_csv(out / "paired.csv") == []
    md = (out / "report.md").read_text()
    assert "| hh-rlhf | offline_dpo | 2 | – | – | 0.200 [0.200, 0.200] | 7.000 [7.000, 7.000] |" in md
    assert (out / "gold_vs_kl.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not any("gold" in k or "win" in k for k in result.metrics)
    assert "report/hh_rlhf/online_dpo_sft/kl_to_reference" in result.metrics


def test_same_inputs_same_seed_identical_report(tmp_path):
    inputs = {}
    for seed in range(2):
        rng = np.random.default_rng(seed)
        for policy in ("sft", "offline_dpo", "online_rl"):
            inputs[f"{seed}{policy}"] = write_eval(tmp_path / "in", "gap", policy, seed, rng.uniform(size=(20, 2)),
                                                rng.uniform(size=(20, 2)), 20)
    outs = []
    for i, seed in enumerate((3, 3, 4)):
        out = tmp_path / f"out{i}"
        out.mkdir()
        run(spec(n_bootstrap=300, bootstrap_seed=seed), inputs, out)
        outs.append((out / "report.json").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_bad_inputs_fail_with_a_clear_message(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="metrics.json is missing"):
        run_report(tmp_path, {"x": ArtifactRef(str(empty), "d")})
    a = write_eval(tmp_path / "a", "gap", "sft", 0)
    b = write_eval(tmp_path / "b", "gap", "sft", 0)
    with pytest.raises(DataError, match="seed 0 appears twice"):
        run(spec(), {"a": a, "b": b}, tmp_path)


# --------------------------------------------------------------------------- the gap section and the hypotheses


def write_gap(root: Path, task: str, seed: int, verifiers: dict[str, tuple[str, float, float]],
              curves: dict[tuple[str, str], list[float]], ns=(1, 2, 4), n_pairs: int = 6, n_prompts: int = 3,
              train: dict | None = None, extra: dict | None = None) -> ArtifactRef:
    """A fake gap folder. ``verifiers``: entry -> (kind, per-pair correct, per-pair loglik), constant over pairs;
    ``curves``: (policy, verifier) -> best-of-N values, the same for every prompt."""
    folder = root / f"gap-{task}-{seed}"
    folder.mkdir(parents=True)
    train = train or {}
    info = {"task": task, "seed": seed, "ns": list(ns), "n_prompts": n_prompts,
            "verifiers": {v: {"kind": k, "parameters": 1000, "train_examples": train.get(v, 100), "val_accuracy": c,
                              "val_loglik": ll, "val_margin": 0.0} for v, (k, c, ll) in verifiers.items()},
            "policies": {p: {"parameters": 1000, "train_examples": 50} for p, _ in curves}, **(extra or {})}
    (folder / "gap.json").write_text(json.dumps(info))
    (folder / "verifier_pairs.jsonl").write_text("".join(
        json.dumps({"verifier": v, "pair_index": i, "margin": 0.0, "correct": c, "loglik": ll}) + "\n"
        for v, (_, c, ll) in verifiers.items() for i in range(n_pairs)))
    (folder / "best_of_n.jsonl").write_text("".join(
        json.dumps({"policy": p, "verifier": v, "prompt_index": i, "values": values}) + "\n"
        for (p, v), values in curves.items() for i in range(n_prompts)))
    return ArtifactRef(path=str(folder), digest=folder.name)


VERIFIERS = {"reward_model": ("global", 1.0, -0.5), "local_rm": ("local", 0.5, -0.9), "offline_dpo": ("implicit", 0.75, -0.7)}
CURVES = {("sft", "gold"): [0.5, 0.7, 0.9], ("sft", "reward_model"): [0.5, 0.6, 0.7],
          ("sft", "local_rm"): [0.5, 0.5, 0.5], ("sft", "offline_dpo"): [0.5, 0.55, 0.6]}


CONVERGED = {"selection": {"candidates": [1.0, 2.0, 3.0], "values": [2.0, 1.5, 1.6], "selected": 2.0}}
NOT_DISPLACED = {"train_chosen_logp_change": 0.1}
CEILING = {"ceiling": {"accuracy": 0.8, "loglik": -0.4}}


def study_inputs(tmp_path: Path, online_gold: float = 0.7, offline_gold: float = 0.7, sft_extra=CONVERGED,
                 gap_extra=CEILING, controls: bool = True) -> dict:
    """A two-seed run on the gap family: SFT 0.5, offline DPO 0.5, online DPO 0.6, the gold-oracle controls."""
    inputs = {}
    for seed in (0, 1):
        inputs[f"gap/seed{seed}/measure_gap"] = write_gap(tmp_path, "gap", seed, VERIFIERS, CURVES, extra=gap_extra)
        ones = np.ones((4, 2))
        inputs[f"e-sft-{seed}"] = write_eval(tmp_path, "gap", "sft", seed, 0.5 * ones, 0.5 * ones, extra=sft_extra)
        inputs[f"e-off-{seed}"] = write_eval(tmp_path, "gap", "offline_dpo", seed, 0.5 * ones, 0.5 * ones,
                                             extra=NOT_DISPLACED)
        inputs[f"e-on-{seed}"] = write_eval(tmp_path, "gap", "online_dpo_sft", seed, 0.6 * ones, 0.5 * ones,
                                            extra=NOT_DISPLACED)
        if controls:
            inputs[f"e-ong-{seed}"] = write_eval(tmp_path, "gap", "online_dpo_gold", seed, online_gold * ones,
                                                 0.5 * ones)
            inputs[f"e-offg-{seed}"] = write_eval(tmp_path, "gap", "offline_dpo_gold", seed, offline_gold * ones,
                                                  0.5 * ones)
    return inputs


def test_gap_summary_and_hypotheses_on_known_inputs(tmp_path):
    result, out = run_report(tmp_path, study_inputs(tmp_path), n_bootstrap=200)
    assert {"gap_summary.md", "hypotheses.md", "best_of_n.png", "gap_vs_online.png"} <= set(result.files)
    assert "learning_curves.png" not in result.files and "scale.png" not in result.files  # nothing varies
    doc = read_json(out / "report.json")
    (row,) = doc["gap_summary"]
    assert row["loglik_global_minus_implicit"] == {"mean": 0.2, "lo": 0.2, "hi": 0.2}
    assert row["loglik_global_minus_local"]["mean"] == pytest.approx(0.4)
    assert row["online_minus_offline"]["mean"] == pytest.approx(0.1)
    # headroom = (verifier pick at the largest N − a random sample) / (gold pick − a random sample)
    assert row["headroom_global"] == pytest.approx(0.5) and row["headroom_local"] == pytest.approx(0.0)
    assert row["headroom_implicit"] == pytest.approx(0.25)
    verdicts = {h["id"]: (h["mean"], h["verdict"]) for h in doc["hypotheses"]}
    assert set(verdicts) == {"H2", "H5", "H5b"}  # only what this run's policies can measure
    assert verdicts["H2"] == (pytest.approx(0.1), "refuted")  # predicted no difference; the interval excludes 0
    assert verdicts["H5"] == (pytest.approx(0.2), "supported")
    assert result.metrics["report/hypotheses/H5/effect"] == pytest.approx(0.2)
    text = (out / "hypotheses.md").read_text()
    assert "| H5 |" in text and "**supported**" in text and "| H1 |" not in text
    assert (out / "best_of_n.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "[gap_summary.md](gap_summary.md)" in (out / "report.md").read_text()
    checks = {c["name"]: c for c in doc["validity"]}
    assert all(checks[n]["passed"] for n in ("sft_converged", "control:online_dpo_gold", "control:offline_dpo_gold",
                                             "displacement:offline_dpo", "displacement:online_dpo_sft", "resolution",
                                             "labels_informative"))
    assert checks["control:online_dpo_gold"]["value"] == "+0.200 [+0.200, +0.200]"
    text = (out / "report.md").read_text()
    assert text.index("## Validity") < text.index("| task | policy | seeds |")  # the validity section comes first
    assert read_csv(out / "validity.csv")[0]["check"] == "sft_converged"


@pytest.mark.parametrize("case, failed", [
    ({"online_gold": 0.5}, "control:online_dpo_gold"),  # the online oracle does not beat SFT
    ({"offline_gold": 0.4}, "control:offline_dpo_gold"),
    ({"controls": False}, "control:online_dpo_gold, control:offline_dpo_gold"),  # not run: not checked
    ({"sft_extra": {"selection": {"candidates": [1.0, 2.0], "values": [2.0, 1.5], "selected": 2.0}}},
     "sft_converged"),  # still improving at its last epoch
])
def test_a_failed_control_makes_the_policy_hypotheses_not_testable(tmp_path, case, failed):
    result, out = run_report(tmp_path, study_inputs(tmp_path, **case), n_bootstrap=200)
    doc = read_json(out / "report.json")
    verdicts = {h["id"]: h["verdict"] for h in doc["hypotheses"]}
    assert verdicts["H2"] == f"not testable ({failed} failed)"  # the interval alone would say "refuted"
    assert verdicts["H5"] == "supported"  # a verifier effect: gated by the labels' ceiling, not the policy controls
    assert "**FAIL**" in (out / "report.md").read_text()
    assert "not testable" in (out / "hypotheses.md").read_text()
    assert result.metrics[f"report/validity/gap/{failed.split(',')[0].replace(':', '_')}"] == 0.0


def test_uninformative_labels_make_the_verifier_hypotheses_not_testable(tmp_path):
    _, out = run_report(tmp_path, study_inputs(tmp_path, gap_extra={"ceiling": {"accuracy": 0.52, "loglik": -0.69}}),
                        n_bootstrap=200)
    verdicts = {h["id"]: h["verdict"] for h in read_json(out / "report.json")["hypotheses"]}
    assert verdicts["H5"] == verdicts["H5b"] == "not testable (labels_informative failed)"
    assert verdicts["H2"] == "refuted"


def test_learning_curves_and_scale_plots_appear_when_the_run_varies_them(tmp_path):
    verifiers = {**VERIFIERS, "reward_model_1_2": ("global", 0.75, -0.6)}
    curves = {**CURVES, ("sft_small", "gold"): [0.6, 0.8, 0.9], ("sft_small", "reward_model"): [0.6, 0.7, 0.8]}
    inputs = {"g": write_gap(tmp_path, "gap", 0, verifiers, curves, train={"reward_model_1_2": 50})}
    info = json.loads((Path(inputs["g"].path) / "gap.json").read_text())
    info["policies"]["sft_small"]["parameters"] = 8000
    (Path(inputs["g"].path) / "gap.json").write_text(json.dumps(info))
    result, out = run_report(tmp_path, inputs, n_bootstrap=200, series={"reward_model_1_2": "reward_model"})
    assert {"learning_curves.png", "scale.png"} <= set(result.files)
    doc = read_json(out / "report.json")
    assert doc["hypotheses"] and not doc["rows"]  # a report from gap outputs alone
    (row,) = doc["gap_summary"]
    assert row["accuracy_global"] == 1.0  # the full-data reward model speaks for its kind, not the 1/2 policy


def test_gap_outputs_with_different_n_grids_are_refused(tmp_path):
    inputs = {"a": write_gap(tmp_path / "a", "gap", 0, VERIFIERS, CURVES),
              "b": write_gap(tmp_path / "b", "gap", 1, VERIFIERS, {k: v + [1.0] for k, v in CURVES.items()},
                             ns=(1, 2, 4, 8))}
    with pytest.raises(DataError, match="different N grids"):
        run_report(tmp_path, inputs, n_bootstrap=200)
