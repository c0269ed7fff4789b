"""The smoke pipeline through Prefect and MLflow: caching, reruns, MLflow records, failures and kills."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.study import StudyFailed, run_study
from roads.hypotheses import VERDICTS

ROOT = Path(__file__).resolve().parents[2]
GAP_ONLY = ["pipeline.tasks=[gap]"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh ROADS_HOME for this module: the first run of a config is a miss."""
    path = tmp_path_factory.mktemp("home")
    old = os.environ.get("ROADS_HOME")
    os.environ["ROADS_HOME"] = str(path)
    yield path
    os.environ["ROADS_HOME"] = old or ""


@pytest.fixture(scope="module")
def first(home):
    os.chdir(ROOT)
    return run_study("smoke")


@pytest.fixture(scope="module")
def second(first):
    return run_study("smoke")


def cache_states(outcome):
    return {n["node"]: n["cache"] for n in outcome["nodes"]}


def children(client, parent_id, experiment_id):
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=500)


def test_first_run_executes_every_stage(first):
    states = cache_states(first)
    assert len(states) == 12  # 2 tasks x (prepare_data, sft, reward_model, offline_dpo, 2 evaluations)
    assert set(states.values()) == {"miss"}
    policies = {(r["task"], r["policy"]) for r in first["summary"]}
    assert policies == {(t, a) for t in ("gap", "short") for a in ("sft", "offline_dpo")}
    for row in first["summary"]:
        assert 0.0 <= row["gold_reward_mean"] <= 1.0 and 0.0 <= row["win_rate"] <= 1.0
        if row["policy"] == "sft":  # the reference against itself: every comparison is a tie
            assert row["win_rate"] == 0.5 and row["kl_to_reference"] == 0.0


def test_mlflow_has_parent_children_step_metrics_and_artifacts(first):
    client = MlflowClient()
    parent = client.get_run(first["parent_run_id"])
    assert parent.data.tags["roads.pipeline"] == "smoke" and parent.info.status == "FINISHED"
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"resolved_config.json", "summary.md", "nodes.md"} <= parent_files
    runs = children(client, first["parent_run_id"], first["experiment_id"])
    by_node = {r.data.tags["roads.node"]: r for r in runs}
    assert set(by_node) == {n["node"] for n in first["nodes"]}  # one child per stage node
    sft = by_node["gap/seed0/sft"]
    assert sft.data.tags["roads.cache"] == "miss" and sft.data.tags["roads.cache_key"].startswith("sft-")
    assert sft.data.params["lr"] == "0.001" and sft.data.params["model.preset"] == "tiny"
    history = client.get_metric_history(sft.info.run_id, "sft/loss")
    assert len(history) >= 2 and [m.step for m in history] == sorted(m.step for m in history)
    dpo_history = client.get_metric_history(by_node["gap/seed0/offline_dpo"].info.run_id, "offline_dpo/rewards/margins")
    assert len(dpo_history) >= 2
    rm = by_node["gap/seed0/reward_model"].data.metrics
    assert 0.0 <= rm["reward_model/val_accuracy"] <= 1.0 and rm["reward_model/val_loglik"] < 0
    evaluation = by_node["gap/seed0/evaluate[offline_dpo]"]
    files = {f.path for f in client.list_artifacts(evaluation.info.run_id)}
    assert {"samples.jsonl", "metrics.json", "config.json"} <= files
    local = client.download_artifacts(evaluation.info.run_id, "samples.jsonl")
    rows = [json.loads(line) for line in open(local)]
    assert rows and {"prompt", "completion", "gold_reward", "reference_gold_reward", "logp", "ref_logp"} <= set(rows[0])


def test_second_run_is_all_hits_and_reuses_the_record_of_the_first(first, second):
    """A fully cached rerun is decided before Prefect starts, and recorded once: the first run's parent already holds
    this outcome (same results, same params), so no run is added."""
    assert set(cache_states(second).values()) == {"hit"}
    assert second["recorded_before"] and second["parent_run_id"] == first["parent_run_id"]
    client = MlflowClient()
    before = client.search_runs([first["experiment_id"]], max_results=1000)
    assert len(client.search_runs([first["experiment_id"]], max_results=1000)) == len(before)
    again = run_study("smoke")
    assert again["parent_run_id"] == first["parent_run_id"]
    assert len(client.search_runs([first["experiment_id"]], max_results=1000)) == len(before)
    first_ids = {r.data.tags["roads.node"]: r.info.run_id for r in children(client, first["parent_run_id"], first["experiment_id"])}
    assert {n["node"]: n["produced_by"] for n in second["nodes"]} == first_ids  # every hit names its producer
    assert [r["gold_reward_mean"] for r in second["summary"]] == [r["gold_reward_mean"] for r in first["summary"]]


def test_a_cached_run_with_other_params_is_one_parent_without_children(second):
    """Same results asked differently (a setting no stage's result depends on): one new parent run, named as cached,
    with the summary and the node table, and no child runs."""
    outcome = run_study("smoke", ["sft.logging_steps=3"])
    assert set(cache_states(outcome).values()) == {"hit"} and not outcome.get("recorded_before")
    client = MlflowClient()
    parent = client.get_run(outcome["parent_run_id"])
    assert parent.info.status == "FINISHED" and "(cached)" in parent.info.run_name
    assert parent.data.params["sft.logging_steps"] == "3" and parent.data.tags["roads.cache"] == "all hit"
    assert children(client, outcome["parent_run_id"], outcome["experiment_id"]) == []
    assert {"nodes.md", "summary.md", "resolved_config.json"} <= {f.path for f in client.list_artifacts(parent.info.run_id)}


def test_parent_runs_are_named_and_carry_comparable_params_and_standard_tags(first):
    client = MlflowClient()
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.run_name.startswith("smoke · ")
    params = parent.data.params
    assert params["pipeline"] == "smoke" and params["pipeline.tasks"] == "gap,short"
    assert params["model.preset"] == "tiny" and params["prepare_data.n_sft"] == "128"  # set by the smoke pipeline
    assert "sft.lr" not in params  # the file's default: not an axis
    tags = parent.data.tags
    assert tags["mlflow.source.git.commit"] and tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    exp = client.get_experiment(first["experiment_id"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # a classic ML experiment
    config = json.load(open(client.download_artifacts(parent.info.run_id, "resolved_config.json")))
    assert config["tasks"]["gap"]["secret"] == 1234  # a seed named secret is not redacted: reproducible from MLflow


def test_changing_one_parameter_reruns_that_stage_and_downstream_only(second):
    outcome = run_study("smoke", ["offline_dpo.beta=0.3"])
    misses = {n for n, s in cache_states(outcome).items() if s == "miss"}
    assert misses == {f"{t}/seed0/{s}" for t in ("gap", "short") for s in ("offline_dpo", "evaluate[offline_dpo]")}


def test_forced_stage_recomputes_and_dependents_hit_when_output_is_unchanged(second):
    outcome = run_study("smoke", force_stage="sft", only_stage="sft")
    states = cache_states(outcome)
    assert {n for n, s in states.items() if s == "miss"} == {"gap/seed0/sft", "short/seed0/sft"}
    assert states["gap/seed0/offline_dpo"] == "hit" and states["gap/seed0/prepare_data"] == "hit"
    rows = {n["node"]: n for n in outcome["nodes"]}
    assert rows["gap/seed0/sft"]["digest_before"] == rows["gap/seed0/sft"]["digest"]  # deterministic: the same bytes
    name = MlflowClient().get_run(outcome["parent_run_id"]).info.run_name
    assert name.startswith("smoke --force sft · ")


def test_a_hit_whose_folder_is_gone_reruns(first, second, home):
    node = next(n for n in second["nodes"] if n["node"] == "gap/seed0/reward_model")
    client = MlflowClient()
    run = next(r for r in children(client, first["parent_run_id"], first["experiment_id"])
               if r.data.tags["roads.node"] == node["node"])
    shutil.rmtree(run.data.tags["roads.artifact_path"])
    states = cache_states(run_study("smoke"))
    assert states["gap/seed0/reward_model"] == "miss"
    assert {s for n, s in states.items() if n != "gap/seed0/reward_model"} == {"hit"}


def test_nan_loss_fails_the_stage_and_caches_nothing(home, first):
    before_results = set(os.listdir(home / "results"))
    with pytest.raises(StudyFailed) as info:
        run_study("smoke", GAP_ONLY + ["sft.lr=1e12", "sft.epochs=2"])
    message = str(info.value)
    assert "gap/seed0/sft" in message and ("finite" in message or "nan" in message) and "sft.lr" in message
    states = cache_states(info.value.outcome)
    assert states["gap/seed0/sft"] == "failed" and states["gap/seed0/prepare_data"] == "hit"
    new = set(os.listdir(home / "results")) - before_results
    assert not any(name.startswith("sft-") for name in new)
    assert not list((home / "artifacts" / "sft").glob(".tmp-*"))  # no half-written folder left


def wait_until_gone(group: int, timeout: float = 20.0) -> None:
    """Until no process of process group ``group`` is alive (zombies are not)."""
    from flows.cleanup import pid_alive

    deadline = time.time() + timeout
    while time.time() < deadline:
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group:
                members.append(int(stat.parent.name))
        if not any(pid_alive(pid) for pid in members):
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of group {group} still alive after {timeout} s")


def test_sigkill_mid_run_then_rerun_recomputes_only_unfinished_and_cleans_up(first, tmp_path, monkeypatch):
    """kill -9 in the middle of a stage leaves RUNNING MLflow runs and a temporary artifact folder; the next run on the
    store marks those runs KILLED, removes the folder, recomputes only what was not finished, and matches."""
    env = {**os.environ, "ROADS_HOME": str(tmp_path / "home")}
    results = tmp_path / "home" / "results"
    store = tmp_path / "home" / "artifacts"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "smoke"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # a finished SFT and another stage half-written
        if (results.is_dir() and any(p.name.startswith("sft-") for p in results.iterdir())
                and any(p.name.startswith(".tmp-") for p in store.glob("*/.tmp-*"))):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until_gone(proc.pid)  # its worker processes too: a SIGKILLed process lingers a moment (the rerun would rightly
    # leave the folder of a writer still alive)
    finished = {p.name for p in results.iterdir()}
    assert 0 < len(finished) < 12
    client = MlflowClient()
    experiment = client.get_experiment_by_name("smoke").experiment_id
    running = client.search_runs([experiment], "attributes.status = 'RUNNING'", max_results=1000)
    assert running, "the kill left no RUNNING run: nothing to check"
    monkeypatch.setenv("ROADS_HOME", env["ROADS_HOME"])
    rerun = run_study("smoke")
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'", max_results=1000)
    for run in running:
        assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert not list(store.glob("*/.tmp-*")), "a temporary folder of the killed run survived the rerun"
    runs = children(client, rerun["parent_run_id"], rerun["experiment_id"])
    states = cache_states(rerun)
    for run in runs:  # child runs exist for computed stages only; none of them had a record before the kill
        assert run.data.tags["roads.cache"] == "miss" and run.data.tags["roads.cache_key"] not in finished
    assert {r.data.tags["roads.node"] for r in runs} == {n for n, s in states.items() if s == "miss"}
    assert "hit" in states.values()
    first_runs = {r.data.tags["roads.node"]: r.data.tags for r in children(client, first["parent_run_id"], first["experiment_id"])}
    for row in rerun["nodes"]:  # same seed, same results as the uninterrupted run
        assert row["digest"] == first_runs[row["node"]]["roads.artifact_digest"], row["node"]


def test_every_policy_of_the_study_smoke_pipeline_runs_and_reports(home):
    outcome = run_study("study-smoke")
    states = cache_states(outcome)
    assert "failed" not in states.values()
    policies = ["sft", "sft_chosen", "offline_dpo", "offline_dpo_2x", "offline_dpo_gold", "online_dpo_sft",
                "online_dpo_dpo", "online_dpo_gold", "online_rl"]
    for seed in (0, 1):
        assert {f"gap/seed{seed}/evaluate[{policy}]" for policy in policies} <= set(states)
    report = Path(outcome["report"])
    text = (report / "report.md").read_text()
    assert all(f"| {policy} |" in text for policy in policies)
    rows = {(b["task"], b["policy"]): b for b in outcome["budget"]}
    assert rows[("gap", "online_dpo_sft")]["tokens_generated"] > 0 and rows[("gap", "sft")]["tokens_generated"] == 0
    assert rows[("gap", "online_dpo_dpo")]["tokens_trained"] > rows[("gap", "offline_dpo")]["tokens_trained"]
    # the validity section comes first, with the controls of both roads and the rule-chosen DPO settings
    assert text.index("## Validity") < text.index("## Settings chosen by rule") < text.index("## The roads")
    for check in ("sft_converged", "control:online_dpo_gold", "control:offline_dpo_gold", "displacement:offline_dpo",
                  "resolution", "labels_informative", "verifier_headroom", "likelihood_spearman", "greedy_sft"):
        assert f"| gap | gap | {check} |" in text, check
    assert "**DPO settings of both roads**" in text and "**chosen**" in text
    client = MlflowClient()
    parent_files = {f.path for f in client.list_artifacts(outcome["parent_run_id"], "report")}
    assert {"report/report.md", "report/validity.csv", "report/win_rate_by_policy.png",
            "report/gold_vs_kl.png"} <= parent_files
    metrics = client.get_run(outcome["parent_run_id"]).data.metrics
    assert "budget/gap/online_rl/tokens_generated" in metrics
    assert metrics["report/validity/gap/control_online_dpo_gold"] in (0.0, 1.0)


def test_gap_smoke_measures_the_gap_and_tables_the_hypotheses(home, capsys):
    """Issue 4 end to end: local_rm, narrow_data, the hypothesis policies, a learning-curve and a scale policy, the gap
    stage, and the report's gap summary and hypotheses table — in the report folder, in MLflow, and via the CLI."""
    from flows.cli import main

    assert main(["report", "gap-smoke", "--hypotheses", "--out", str(home / "exported")]) == 0
    out = capsys.readouterr().out
    assert "| H1 |" in out and "| H5 |" in out and "| H6-short |" in out and "| H4 |" in out
    assert "| H6-hidden |" not in out  # the pipeline has no hidden-family task: that row is not measurable
    exported = home / "exported"
    for name in ("hypotheses.md", "hypotheses.csv", "gap_summary.md", "best_of_n.png", "gap_vs_online.png",
                 "learning_curves.png", "scale.png", "report.json"):
        assert (exported / name).is_file(), name
    doc = json.loads((exported / "report.json").read_text())
    kinds = {(r["task"], r["verifier"]): r["kind"] for r in doc["verifiers"]}
    assert kinds[("gap", "reward_model")] == "global" and kinds[("gap", "local_rm")] == "local"
    assert kinds[("gap", "offline_dpo")] == "implicit"
    train = {(r["task"], r["verifier"]): r["train_examples"] for r in doc["verifiers"]}
    assert train[("gap", "reward_model_1_2")] * 2 == train[("gap", "reward_model")] == 32
    summary = {r["task"]: r for r in doc["gap_summary"]}
    assert {"gap", "short"} == set(summary)
    for row in summary.values():
        assert {"loglik_global_minus_implicit", "online_minus_offline", "bon_gold"} <= set(row)
    for row in doc["best_of_n"]:
        assert row["ns"] == [1, 2, 4, 8]
        if row["verifier"] == "gold":  # the upper bound never decreases with N
            means = [c["mean"] for c in row["curve"]]
            assert all(b >= a - 1e-9 for a, b in zip(means, means[1:]))
    verdicts = {h["id"]: h["verdict"] for h in doc["hypotheses"]}
    assert {v.split(" (")[0] for v in verdicts.values()} <= set(VERDICTS)
    # gap-smoke runs no positive control: its policy hypotheses cannot be tested, and say which controls are missing
    assert verdicts["H1"].startswith("not testable (") and "control:online_dpo_gold" in verdicts["H1"]
    # a rerun is all hits, and the parent run carries the tables
    outcome = run_study("gap-smoke")
    assert set(cache_states(outcome).values()) == {"hit"}
    client = MlflowClient()
    parent = outcome["parent_run_id"]
    files = {f.path for f in client.list_artifacts(parent, "report")}
    assert {"report/hypotheses.md", "report/gap_summary.md", "report/best_of_n.png"} <= files
    metrics = client.get_run(parent).data.metrics
    assert "report/hypotheses/H5/effect" in metrics and "report/gap/gap/loglik_global_minus_implicit" in metrics


def test_the_other_roads_run_as_policies_and_land_in_the_report(home):
    """Issue 5 end to end: Q-SFT (both return sources), GenRM as a verifier (gap) and as the online DPO labeller,
    inverse value learning on its own base and transferred to a bigger one, each an policy of the report."""
    outcome = run_study("roads-smoke")
    states = cache_states(outcome)
    assert "failed" not in states.values()
    doc = json.loads((Path(outcome["report"]) / "report.json").read_text())
    rows = {(r["task"], r["policy"]): r for r in doc["rows"]}
    for policy in ("q_sft", "q_sft_rm", "online_dpo_genrm", "ivl", "ivl_to_small", "sft_small", "sft_chosen_small"):
        cell = rows[("gap", policy)]["metrics"]["gold_reward_mean"]
        assert cell["lo"] <= cell["mean"] <= cell["hi"] and rows[("gap", policy)]["seeds"] == [0, 1], policy
    kinds = {r["verifier"]: r["kind"] for r in doc["verifiers"]}
    assert kinds["genrm"] == "generative" and kinds["reward_model"] == "global"
    assert {"q_sft", "ivl_to_small"} <= {r["policy"] for r in doc["best_of_n"]}
    text = (Path(outcome["report"]) / "report.md").read_text()
    assert "| q_sft |" in text and "| ivl_to_small |" in text
