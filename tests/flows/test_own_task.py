"""Bring your own task (issue 16): a gold-reward family written outside roads — ``tests/flows/own_family``, a package
with the family class in one module and its reward in another — runs through the study by ``roads run`` as a user runs
it (a project folder holding the package and a study file naming ``own_family.family:Reverse``), beside a built-in
family. The report and MLflow name it by its path; an edit to its reward reruns its stages, and the built-in family's
stages stay cache hits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FAMILY = "own_family.family:Reverse"
STAGES = ["prepare_data", "sft", "reward_model", "evaluate", "report"]
SMALL = {"model.preset": "tiny", "prepare_data.n_sft": 32, "prepare_data.n_pairs": 32, "prepare_data.n_val_pairs": 8,
         "prepare_data.n_sft_val": 8, "prepare_data.n_select_pairs": 8, "prepare_data.n_eval_prompts": 8,
         "sft.epochs": 1, "reward_model.epochs": 1, "evaluate.samples_per_prompt": 1, "evaluate.max_new_tokens": 6,
         "report.n_bootstrap": 100}


def user_project(folder: Path) -> Path:
    """A user's project folder: their package (a copy of tests/flows/own_family) and a study file using it."""
    folder.mkdir()
    shutil.copytree(Path(__file__).parent / "own_family", folder / "own_family",
                    ignore=shutil.ignore_patterns("__pycache__"))
    study = {"tasks": {"mine": {"family": FAMILY, "min_len": 3, "max_len": 4},
                       "other": {"family": "short", "alphabet": 6, "min_len": 3, "max_len": 5}},
             "pipelines": {"own": {"tasks": ["mine", "other"], "seeds": [0], "stages": STAGES, "set": SMALL}}}
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return folder


def roads(project: Path, home: Path, *args: str) -> str:
    """``roads ARGS --file study.yaml`` in the project folder (the CLI as a user runs it), its stdout."""
    environ = {**os.environ, "ROADS_HOME": str(home), "PYTHONPATH": str(ROOT)}
    environ.pop("MLFLOW_TRACKING_URI", None)  # the store in ROADS_HOME
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--file", "study.yaml", "--progress", "none"],
                          cwd=project, env=environ, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def node_states(out: str) -> dict[str, str]:
    """node -> hit / miss, from the run's node table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and ("/seed" in cells[0] or cells[0] == "report") and cells[1] in ("hit", "miss"):
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.slow
def test_own_family_runs_through_roads_run_and_an_edit_to_its_reward_reruns_only_its_stages(tmp_path):
    project, home = user_project(tmp_path / "project"), tmp_path / "home"

    first = node_states(roads(project, home, "run", "own"))
    assert first and set(first.values()) == {"miss"}, first
    assert {"mine/seed0/reward_model", "mine/seed0/evaluate[sft]", "other/seed0/sft", "report"} <= set(first)

    # the report names the family by its path, with the class its gap_class declares
    reports = list((home / "artifacts" / "report").glob("*/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["families"] == {"mine": FAMILY, "other": "short"}
    assert report["classes"]["mine"] == "closed (generation)"
    mine = next(r for r in report["rows"] if r["task"] == "mine" and r["policy"] == "sft")
    assert 0.0 <= mine["metrics"]["gold_reward_mean"]["mean"] <= 1.0  # scored by its own gold reward
    markdown = (reports[0].parent / "report.md").read_text()
    assert f"`mine`: family `{FAMILY}`, class closed (generation)" in markdown
    # the data records the family's source digest; MLflow names the family on its prepare_data run
    data = next(p for p in (home / "artifacts" / "prepare_data").glob("*/task.json")
                if json.loads(p.read_text())["name"] == "mine")
    task = json.loads(data.read_text())
    assert task["family"] == FAMILY and len(task["family_source"]) == 64 and task["settings"]["max_len"] == 4

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("own")
    runs = client.search_runs([experiment.experiment_id], "tags.`roads.node` = 'mine/seed0/prepare_data'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["task.family"] == FAMILY
    assert runs[0].data.params["task.settings.max_len"] == "4"

    # nothing changed: every stage is a hit
    assert set(node_states(roads(project, home, "run", "own")).values()) == {"hit"}

    # the researcher edits the reward (a module the family's module imports): its task's stages rerun, the report
    # with them; the built-in family's stages are hits
    reward = project / "own_family" / "reward.py"
    text = reward.read_text()
    assert "return hits / max(len(target), len(ys))" in text
    reward.write_text(text.replace("return hits / max(len(target), len(ys))",
                                   "return 0.5 + 0.5 * hits / max(len(target), len(ys))  # edited"))
    again = node_states(roads(project, home, "run", "own"))
    assert again.keys() == first.keys()
    for node, state in again.items():
        assert state == ("hit" if node.startswith("other/") else "miss"), (node, state)
    assert again["report"] == "miss"
    edited = json.loads(next(p for p in (home / "artifacts" / "prepare_data").glob("*/task.json")
                             if json.loads(p.read_text())["name"] == "mine" and p != data).read_text())
    assert edited["family_source"] != task["family_source"]


@pytest.mark.slow
def test_the_worked_example_runs_as_the_readme_says(tmp_path):
    """README "Your own task": `roads run subset-sum-smoke --file examples/pipelines.yaml` from the project folder —
    both roads, the gold-oracle controls, measure_gap and the report on examples/subset_sum.py's family."""
    home = tmp_path / "home"
    environ = {**os.environ, "ROADS_HOME": str(home)}
    environ.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "subset-sum-smoke", "--file",
                           "examples/pipelines.yaml", "--progress", "none"],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    states = node_states(proc.stdout)
    assert {"subset-sum/seed0/online_dpo_gold", "subset-sum/seed0/offline_dpo_gold", "subset-sum/seed0/measure_gap",
            "report"} <= set(states)
    assert "Tasks: `subset-sum`: family `examples.subset_sum:SubsetSum`, class gap." in proc.stdout
    report, = (home / "artifacts" / "report").glob("*/report.json")
    doc = json.loads(report.read_text())
    assert doc["families"] == {"subset-sum": "examples.subset_sum:SubsetSum"} and doc["classes"]["subset-sum"] == "gap"
    checks = {c["name"] for c in doc["validity"]}
    assert {"control:online_dpo_gold", "control:offline_dpo_gold", "likelihood_spearman", "greedy_sft"} <= checks
    assert all(c["value"] != "not run" for c in doc["validity"] if c["name"] in ("likelihood_spearman", "greedy_sft"))
    assert (report.parent / "hypotheses.md").is_file() and (report.parent / "gap_summary.md").is_file()
