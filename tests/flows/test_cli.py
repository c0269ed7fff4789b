"""The README's commands through the real CLI: run, stage --force, ui, and the Makefile targets."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]
GAP = ["--set", "pipeline.tasks=[gap]"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("ROADS_HOME", str(tmp_path / "home"))
    return tmp_path


def node_lines(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and "/seed" in cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def test_run_then_stage_force_via_the_cli(project, capsys):
    assert main(["run", "smoke", *GAP]) == 0
    out = capsys.readouterr().out
    assert set(node_lines(out).values()) == {"miss"}
    assert "| gap | offline_dpo | 1 |" in out and "gold_reward_mean" in out  # the summary table
    assert main(["stage", "offline_dpo", "--pipeline", "smoke", "--force", *GAP]) == 0
    states = node_lines(capsys.readouterr().out)
    assert states.pop("gap/seed0/offline_dpo") == "miss"  # recomputed
    assert set(states.values()) == {"hit"}  # same output digest: the evaluation of it is a hit
    assert "gap/seed0/reward_model" not in states  # not needed by, and not depending on, offline_dpo


def test_ui_serves_the_tracking_store_on_loopback(project):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, status = time.time() + 90, None
        while time.time() < deadline and status != 200:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status
            except OSError:
                time.sleep(0.5)
        assert status == 200
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_make_targets_call_the_cli():
    dry = subprocess.run(["make", "-n", "-W", "pyproject.toml", "run", "test"], cwd=ROOT, capture_output=True,
                         text=True).stdout
    assert ".venv/bin/roads run default" in dry and "pytest" in dry


def test_ui_with_a_tracking_server_points_at_it(project, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:pw-123@mlflow.example.org")
    assert main(["ui"]) == 0
    out = capsys.readouterr().out
    assert "tracking server https://user:***@mlflow.example.org" in out and "pw-123" not in out
