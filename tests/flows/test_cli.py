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


def test_stage_force_says_whether_the_output_changed_and_which_dependents_reran(project, capsys):
    assert main(["run", "sweep-smoke"]) == 0
    capsys.readouterr()
    assert main(["stage", "sft", "--force", "--pipeline", "sweep-smoke", "--progress", "lines"]) == 0
    out = capsys.readouterr().out
    assert "gap/seed0/sft: recomputed in" in out and "output unchanged (the same bytes)" in out
    assert "dependents that reran: none" in out
    assert main(["stage", "sft", "--force", "--pipeline", "sweep-smoke", "--set", "sft.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "output new (nothing was cached before)" in out  # other settings: no earlier result to compare with
    assert "dependents that reran: gap/seed0/offline_dpo, gap/seed0/evaluate[sft], gap/seed0/evaluate[offline_dpo]" in out


def test_stage_without_pipeline_says_which_it_uses(project, capsys):
    assert main(["stage", "no_such_stage"]) == 2  # fails before anything runs, after naming the pipeline it used
    captured = capsys.readouterr()
    assert "pipeline: default" in captured.out and "pipeline 'default' has no stage 'no_such_stage'" in captured.err


def test_the_persistent_prefect_server_starts_once_is_reused_and_stops(project):
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PREFECT_API_URL", "ROADS_PREFECT_SERVER")}
    env.update(ROADS_HOME=str(project / "home"), PREFECT_HOME=str(project / "prefect"))

    def roads(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    assert "no local Prefect server is running" in roads("server")
    try:
        started = roads("server", "start")
        ui = next(line.split(": ", 1)[1] for line in started.splitlines() if line.startswith("Prefect UI"))
        assert urllib.request.urlopen(ui, timeout=10).status == 200  # the Prefect UI, with the flow runs
        api = started.split("Prefect server: ", 1)[1].split(" ", 1)[0]
        probe = ("import os; from flows import env; env.configure(); env.ensure_prefect_api(); "
                 "print(os.environ['PREFECT_API_URL'])")
        used = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60).stdout.strip()
        assert used == api  # a later run reuses it rather than starting its own
        assert api in roads("server", "status")
    finally:
        stopped = roads("server", "stop")
    assert "stopped the Prefect server" in stopped
    assert "no local Prefect server is running" in roads("server")


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


def test_print_forced_tells_dependents_from_inputs_computed_beside_them(capsys):
    """A forced stage whose own inputs were not cached (a fresh store, or an edit upstream) computes them too: they
    are named as such, not as its dependents."""
    from flows.cli import print_forced

    def row(node, stage, cache, inputs=()):
        return {"node": node, "stage": stage, "cache": cache, "inputs": list(inputs), "seconds": 1.0,
                "digest": "d", "digest_before": None}

    outcome = {"nodes": [row("t/prepare_data", "prepare_data", "miss"),
                         row("t/sft", "sft", "miss", ["t/prepare_data"]),
                         row("t/reward_model", "reward_model", "miss", ["t/prepare_data", "t/sft"]),
                         row("t/online_dpo", "online_dpo", "miss", ["t/sft", "t/reward_model"]),
                         row("t/offline_dpo", "offline_dpo", "hit", ["t/sft"])]}
    print_forced(outcome, "reward_model")
    out = capsys.readouterr().out
    assert "dependents that reran: t/online_dpo; 1 other stages were cache hits" in out
    assert "also computed, not cached before (inputs of the forced stage or beside it): t/prepare_data, t/sft" in out
