"""The code part of the cache key (tasks/keys.py): a stage's key covers the library modules it reaches, not the whole
library — checked on the digests of a temporary copy of the package, and end to end by rerunning a small study from
a temporary copy of the project after editing one module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import copy_project

from roads.stage_table import STAGE_NAMES
from tasks.keys import ROOT, code_digest, code_files



def reached(stage: str, root: Path = ROOT) -> set[str]:
    return {str(f.relative_to(root)) for f in code_files(stage, root)}


def test_each_stage_reaches_its_own_module_and_the_runner_but_not_everything():
    for stage in STAGE_NAMES:
        files = reached(stage)
        assert f"stages/{stage}.py" in files and "runner.py" in files and "artifacts.py" in files, stage
        assert "config.py" not in files, stage  # its effect is the settings' values: the fingerprint
    assert {"gap_report.py", "hypotheses.py", "metrics.py"} <= reached("report")
    assert not any("gap_report.py" in reached(s) for s in STAGE_NAMES if s != "report")
    assert "generation.py" in reached("evaluate") and "generation.py" not in reached("sft")
    assert "data/synthetic.py" in reached("prepare_data") and "data/preferences.py" not in reached("sft")


def test_imports_inside_functions_and_relative_imports_are_followed(tmp_path):
    root = tmp_path / "roads"
    (root / "stages").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "runner.py").write_text("")
    (root / "stages" / "__init__.py").write_text("")
    (root / "helper.py").write_text("X = 1\n")
    (root / "deep.py").write_text("Y = 2\n")
    (root / "unused.py").write_text("Z = 3\n")
    (root / "stages" / "demo.py").write_text(
        'VERSION = 1\n\ndef run():\n    from ..helper import X\n    from roads import (\n        deep,  # a module\n    )\n')
    assert reached("demo", root) == {"__init__.py", "runner.py", "stages/__init__.py", "stages/demo.py", "helper.py",
                                     "deep.py"}


@pytest.fixture
def package_copy(tmp_path) -> Path:
    root = tmp_path / "roads"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def digests(root: Path) -> dict[str, str]:
    return {stage: code_digest(stage, root) for stage in STAGE_NAMES}


def test_the_copy_has_the_same_digests_as_the_package(package_copy):
    assert digests(package_copy) == digests(ROOT)  # paths are relative: a clone elsewhere hits the same cache


def edited(root: Path, relative: str) -> dict[str, str]:
    code_digest.cache_clear()
    with open(root / relative, "a") as fh:
        fh.write("\n# an edit\n")
    return digests(root)


def test_editing_the_report_code_changes_only_the_report_digest(package_copy):
    before = digests(package_copy)
    after = edited(package_copy, "gap_report.py")
    assert {s for s in STAGE_NAMES if before[s] != after[s]} == {"report"}


def test_editing_the_sampler_changes_exactly_the_stages_that_reach_it(package_copy):
    before = digests(package_copy)
    after = edited(package_copy, "generation.py")
    changed = {s for s in STAGE_NAMES if before[s] != after[s]}
    assert changed == {s for s in STAGE_NAMES if "generation.py" in reached(s)}
    assert {"evaluate", "online_dpo", "measure_gap"} <= changed
    assert not changed & {"sft", "prepare_data", "report"}


def test_editing_config_changes_no_digest(package_copy):
    before = digests(package_copy)
    assert edited(package_copy, "config.py") == before


# ----------------------------------------------------------------------------------- end to end, through `roads run`
SMALL = ["pipeline.tasks=[gap]", "pipeline.stages=[prepare_data,sft,offline_dpo,evaluate,report]",
         "prepare_data.n_sft=32", "prepare_data.n_pairs=32", "prepare_data.n_val_pairs=8", "prepare_data.n_eval_prompts=8",
         "report.n_bootstrap=100"]


def roads_run(project: Path, home: Path) -> dict[str, str]:
    """``roads run smoke`` (made smaller) in a fresh process from the copy; node -> hit/miss."""
    command = [sys.executable, "-m", "flows.cli", "run", "smoke", "--progress", "none",
               *[x for item in SMALL for x in ("--set", item)]]
    environ = {**os.environ, "ROADS_HOME": str(home), "PYTHONPATH": str(project)}
    proc = subprocess.run(command, cwd=project, env=environ, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "/" in line.split("|")[1]
            or line.startswith("| report |")]
    return {cells[1].strip(): cells[2].strip() for cells in rows if len(cells) > 3 and cells[2].strip() in
            ("hit", "miss", "failed")}


@pytest.mark.slow
def test_a_rerun_after_an_edit_recomputes_only_what_the_edit_reaches(tmp_path):
    project = copy_project(tmp_path / "project")
    home = tmp_path / "home"
    first = roads_run(project, home)
    assert set(first.values()) == {"miss"} and "report" in first, first
    assert set(roads_run(project, home).values()) == {"hit"}  # nothing edited: nothing reruns

    with open(project / "roads" / "gap_report.py", "a") as fh:  # only the report imports it
        fh.write("\n# a typo fixed in the report\n")
    after_report_edit = roads_run(project, home)
    assert {n for n, s in after_report_edit.items() if s == "miss"} == {"report"}, after_report_edit

    with open(project / "roads" / "generation.py", "a") as fh:  # the sampler
        fh.write("\n# the sampler edited\n")
    after_sampler_edit = roads_run(project, home)
    misses = {n for n, s in after_sampler_edit.items() if s == "miss"}
    # evaluate samples; offline_dpo reaches the sampler through roads.verifiers (module granularity). SFT and the data
    # do not reach it: hits. The edit is a comment, so the recomputed outputs are the same bytes and the report,
    # which follows from them, is a hit too: dependents rerun only when an input's digest changed.
    assert misses == {"gap/seed0/offline_dpo", "gap/seed0/evaluate[sft]", "gap/seed0/evaluate[offline_dpo]"}
    assert after_sampler_edit["gap/seed0/sft"] == after_sampler_edit["gap/seed0/prepare_data"] == "hit"
    assert after_sampler_edit["report"] == "hit"
