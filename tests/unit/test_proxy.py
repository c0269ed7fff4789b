"""Real data without a gold reward (issue 14 item 5): the held-out judge's split, the report's proxy-judged table on
evaluate outputs whose answers are known, and the printed summary's columns (only those the tasks have)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roads.artifacts import ArtifactRef, read_jsonl
from roads.config import StageSpec
from roads.errors import DataError
from roads.runner import execute
from roads.settings import PrepareDataConfig, ReportConfig, TaskConfig
from roads.stages.report import run as report
from support import HH_FILE

ROOT = Path(__file__).resolve().parents[2]
HELD_OUT = ("pairs_val", "sft_val", "pairs_select", "eval_prompts")


def prepare(store: Path, task: TaskConfig, **cfg) -> Path:
    spec = StageSpec(stage="prepare_data", params=PrepareDataConfig(n_val_pairs=20, n_eval_prompts=8, n_sft_val=10,
                                                                    n_select_pairs=5, **cfg).model_dump(),
                     seed=0, task=task, task_name="hh")
    return Path(execute(spec, {}, store).artifact.path)


@pytest.fixture(scope="module")
def hh_task():
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is not there")
    return TaskConfig(family="preferences", source=str(HH_FILE), format="hh-rlhf", limit=300, chat_template="plain")


def test_the_judge_split_is_held_out_and_moves_no_held_out_split(hh_task, tmp_path):
    plain, judged = prepare(tmp_path / "a", hh_task), prepare(tmp_path / "b", hh_task, n_judge_pairs=50)
    assert not (plain / "pairs_judge.jsonl").exists()
    judge = read_jsonl(judged / "pairs_judge.jsonl")
    assert len(judge) >= 50 and len({r["prompt"] for r in judge}) <= len(judge)
    for split in HELD_OUT:  # the evaluation and every held-out split are the same with or without a judge
        assert read_jsonl(plain / f"{split}.jsonl") == read_jsonl(judged / f"{split}.jsonl"), split
    judged_prompts = {r["prompt"] for r in judge}
    for split in ("sft", "pairs_train", *HELD_OUT):
        assert not judged_prompts & {r["prompt"] for r in read_jsonl(judged / f"{split}.jsonl")}, split
    # the judge's pairs are exactly what left training: training keeps the plain run's other pairs, in order
    before, after = read_jsonl(plain / "pairs_train.jsonl"), read_jsonl(judged / "pairs_train.jsonl")
    assert after == [r for r in before if r["prompt"] not in judged_prompts]
    assert len(before) - len(after) == len(judge)


def test_a_judge_split_that_takes_every_training_prompt_is_refused(hh_task, tmp_path):
    with pytest.raises(DataError, match="n_judge_pairs 5000 takes every training prompt"):
        prepare(tmp_path, hh_task, n_judge_pairs=5000)


def test_a_synthetic_task_has_no_judge_split(tmp_path):
    with pytest.raises(DataError, match="n_judge_pairs: task 'hh' has a gold reward"):
        prepare(tmp_path, TaskConfig(family="gap"), n_sft=8, n_pairs=8, n_judge_pairs=4)


def write_judged(root: Path, policy: str, seed: int, margins: list[list[float]], accuracy: float = 0.6,
                 trained_on: str = "pairs_judge") -> ArtifactRef:
    """An evaluate folder of a real-data policy whose samples a judge scored: ``margins[prompt][sample]``."""
    folder = root / f"{policy}-{seed}"
    folder.mkdir(parents=True)
    rows = [{"prompt_index": p, "sample_index": s, "prompt": f"p{p}", "completion": "c", "length": 4,
             "finished": s == 0, "logp": -1.0, "ref_logp": -1.0, "reference_completion": "r", "judge_margin": m}
            for p, group in enumerate(margins) for s, m in enumerate(group)]
    info = {"policy": policy, "task": "hh-rlhf", "seed": seed, "judge": "reward_model_judge", "judge_kind": "global",
            "judge_trained_on": trained_on, "judge_train_pairs": 40, "judge_val_accuracy": accuracy,
            "judge_val_loglik": -0.7, "judge_val_pairs": 20}
    (folder / "metrics.json").write_text(json.dumps(info))
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ArtifactRef(path=str(folder), digest=folder.name)


def test_the_report_tables_the_proxy_win_rate_with_its_judge(tmp_path):
    inputs = {f"{policy}{seed}": write_judged(tmp_path / "in", policy, seed, margins)
              for seed in (0, 1) for policy, margins in (("sft", [[0.0, 0.0]] * 4),
                                                          ("offline_dpo", [[1.0, -2.0], [0.5, 0.3], [0.0, -1.0],
                                                                           [2.0, 2.0]]))}
    out = tmp_path / "out"
    out.mkdir()
    spec = StageSpec(stage="report", params=ReportConfig(n_bootstrap=200).model_dump(), seed=0)
    result = report(spec, inputs, out)
    # per prompt: (1 + 0)/2, 1, (0.5 + 0)/2, 1 → 0.6875 in each seed; finished: one sample of two
    rows = {r["policy"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["offline_dpo"]["metrics"]["proxy_win_rate"]["mean"] == pytest.approx(0.6875)
    assert rows["offline_dpo"]["metrics"]["finished_rate"]["mean"] == pytest.approx(0.5)
    assert rows["sft"]["metrics"]["proxy_win_rate"] == {"mean": 0.5, "lo": 0.5, "hi": 0.5}
    assert "gold_reward_mean" not in rows["sft"]["metrics"]
    md = (out / "report.md").read_text()
    assert "## Without a gold reward: the proxy-judged table" in md and "A proxy, not a gold reward" in md
    assert ("judge `reward_model_judge` (global verifier) trained on 40 pairs_judge pairs (held out from every "
            "policy); held-out accuracy 0.600 on 20 pairs_val pairs") in md
    assert "| hh-rlhf | offline_dpo | 2 | 0.000 [0.000, 0.000] | 4.000 [4.000, 4.000] | 0.500 [0.500, 0.500] | " \
           "0.688 [" in md
    header = (out / "report.csv").read_text().splitlines()[0].split(",")
    assert header[-6:] == ["finished_rate", "finished_rate_lo", "finished_rate_hi", "proxy_win_rate",
                           "proxy_win_rate_lo", "proxy_win_rate_hi"]
    assert result.metrics["report/hh_rlhf/offline_dpo/proxy_win_rate"] == pytest.approx(0.6875)


def test_a_judge_that_saw_the_policies_pairs_is_labelled_so(tmp_path):
    inputs = {"a": write_judged(tmp_path / "in", "offline_dpo", 0, [[1.0]], trained_on="pairs_train")}
    out = tmp_path / "out"
    out.mkdir()
    report(StageSpec(stage="report", params=ReportConfig(n_bootstrap=100).model_dump(), seed=0), inputs, out)
    assert "NOT held out: the policies trained on the same pairs" in (out / "report.md").read_text()


def test_the_printed_summary_shows_the_columns_the_tasks_have(capsys):
    from flows.cli import print_outcome

    summary = [{"task": "hh-rlhf", "seed": 0, "policy": p, "gold_reward_mean": None, "win_rate": None,
                "kl_to_reference": kl, "length_mean": 9.0, "finished_rate": 0.25, "proxy_win_rate": w}
               for p, kl, w in (("sft", 0.0, 0.5), ("offline_dpo", 0.1, 0.625))]
    print_outcome({"nodes": [], "summary": summary, "budget": [], "report": None, "pipeline": "p",
                   "parent_run_id": "r", "experiment_id": "1"}, 1.0)
    out = capsys.readouterr().out
    assert "| task | policy | seeds | kl_to_reference | length_mean | finished_rate | proxy_win_rate |" in out
    assert "| hh-rlhf | offline_dpo | 1 | 0.100 | 9.000 | 0.250 | 0.625 |" in out
    assert "gold_reward_mean" not in out and "a proxy, not a gold reward" in out


def test_the_win_rate_chart_plots_the_proxy_without_a_gold_reward(tmp_path, monkeypatch):
    """Real data's report drew an empty "no gold reward: win rates unavailable" chart; it now plots the held-out
    judge's proxy win rate per policy, titled and labelled as a proxy (gold-reward reports keep the gold win rate)."""
    import roads.stages.report as report_module

    drawn = {}
    real = report_module.finish_plot

    def spy(fig, ax, path, title, empty=None):
        drawn[Path(path).name] = (title, empty, [round(p.get_height(), 4) for p in ax.patches], ax.get_ylabel())
        real(fig, ax, path, title, empty)

    monkeypatch.setattr(report_module, "finish_plot", spy)
    inputs = {f"{policy}0": write_judged(tmp_path / "in", policy, 0, margins)
              for policy, margins in (("sft", [[0.0, 0.0]] * 4),
                                      ("offline_dpo", [[1.0, -2.0], [0.5, 0.3], [0.0, -1.0], [2.0, 2.0]]))}
    out = tmp_path / "out"
    out.mkdir()
    report(StageSpec(stage="report", params=ReportConfig(n_bootstrap=100).model_dump(), seed=0), inputs, out)
    title, empty, heights, ylabel = drawn["win_rate_by_policy.png"]
    assert empty is None and title.startswith("Proxy win rate against SFT") and "not a gold reward" in ylabel
    assert sorted(heights) == [0.5, 0.6875]  # SFT against itself, offline DPO's proxy win rate
    assert report_module.win_rate_shown([{"metrics": {"win_rate": {}}}, {"metrics": {}}]) == "win_rate"
