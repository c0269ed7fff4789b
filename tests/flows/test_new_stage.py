"""Adding a stage is a settings class, a stage module and one row of the stage table — nothing else. In a copy of the
project a trivial policy stage is added that way and run through `roads run`: it is planned, run as a Prefect task,
recorded as an MLflow child run, evaluated like every policy, and listed in the report in its pipeline's order."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import copy_project


SETTINGS = '''

class CopyPolicyConfig(Strict):
    """A trivial policy for the test: the SFT policy, copied."""

    note: str = Field("copied", description="a setting, so the stage has a section of its own")
'''

MODULE = '''"""copy_policy: the SFT policy, copied (a stage added by a test)."""

from __future__ import annotations

import shutil
from pathlib import Path

from roads.artifacts import StageResult

VERSION = 1


def run(spec, inputs, out_dir: Path, tracker) -> StageResult:
    shutil.copytree(inputs["sft"].path, out_dir, dirs_exist_ok=True)
    files = sum(1 for p in Path(out_dir).rglob("*") if p.is_file())
    tracker.progress(f"copied {files} files ({spec.params['note']})")
    return StageResult(metrics={"copy_policy/files": float(files)}, files=[])
'''

ROW = '''    Stage("copy_policy", CopyPolicyConfig, "policy", roles=("policy",), inputs={"sft": REFERENCE}),
'''

SMALL = ["pipeline.tasks=[gap]", "pipeline.stages=[prepare_data,sft,copy_policy,offline_dpo,evaluate,report]",
         "prepare_data.n_sft=32", "prepare_data.n_pairs=32", "prepare_data.n_val_pairs=8",
         "prepare_data.n_eval_prompts=8", "report.n_bootstrap=100", "copy_policy.note=from-the-cli"]


def add_stage(project: Path) -> None:
    with open(project / "roads" / "settings.py", "a") as fh:
        fh.write(SETTINGS)
    (project / "roads" / "stages" / "copy_policy.py").write_text(MODULE)
    table = project / "roads" / "stage_table.py"
    text = table.read_text()
    assert text.count('    Stage("report", ReportConfig, "report"),\n') == 1
    text = text.replace('    Stage("report", ReportConfig, "report"),\n', ROW + '    Stage("report", ReportConfig, "report"),\n')
    text = text.replace("from roads.settings import (", "from roads.settings import (CopyPolicyConfig, ", 1)
    table.write_text(text)


@pytest.mark.slow
def test_a_stage_added_as_settings_module_and_row_runs_through_roads_run(tmp_path):
    project = copy_project(tmp_path / "project")
    add_stage(project)
    home = tmp_path / "home"
    environ = {**os.environ, "ROADS_HOME": str(home), "PYTHONPATH": str(project)}
    environ.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "smoke", "--progress", "none",
                           *[x for item in SMALL for x in ("--set", item)]],
                          cwd=project, env=environ, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gap/seed0/copy_policy" in proc.stdout and "evaluate[copy_policy]" in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], "tags.`roads.node` = 'gap/seed0/copy_policy'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["copy_policy/files"] > 0
    assert runs[0].data.params.get("copy_policy.note", runs[0].data.params.get("note")) == "from-the-cli"

    reports = list((home / "artifacts" / "report").glob("*/report.csv"))
    assert len(reports) == 1
    with open(reports[0]) as fh:
        policies = [row["policy"] for row in csv.DictReader(fh)]
    assert policies == ["sft", "copy_policy", "offline_dpo"]  # the pipeline's order
