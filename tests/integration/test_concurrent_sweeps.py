"""Two sweeps at once on one artifact store (one ROADS_HOME) and one MLflow server lose nothing and corrupt nothing.

Two `roads sweep` processes start at the same moment: sweep-smoke and sweep-smoke-lr, each on the process runner with
one worker (2 CPUs in all; not Ray: a local Ray cluster takes ~35 s to warm up on 2 cores, by when the other sweep
has finished and nothing is raced for). They share prepare_data, SFT and evaluate[sft], and sweep-smoke-lr's
point offline_dpo.lr=5e-05 is sweep-smoke's point offline_dpo.beta=0.1 (the same cache keys), so the two race for the
very same cache records and artifact folders. Afterwards: every point is one finished MLflow run with its stage child
runs, every cache record parses and names an artifact folder that exists, every artifact folder holds what its name
(a digest prefix) says, nothing temporary is left; and rerunning both sweeps is all cache hits. A stage may be
computed by both sweeps (both miss before either has written its record): allowed, and printed with -s.

Cache keys include a digest of the roads package's source: if roads/*.py is edited while the test runs (a shared
working tree), the rerun cannot hit, and the test skips that check rather than fail."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from roads.artifacts import digest_dir
from roads.sweep import point_plans, load_sweep
from roads.stage_table import STAGE_NAMES
from tasks.keys import code_digest

ROOT = Path(__file__).resolve().parents[2]
ROADS = ROOT / ".venv" / "bin" / "roads"
FILE = ROOT / "pipelines.yaml"
# (sweep, runner): the two processes started at once
SWEEPS = (("sweep-smoke", "process"), ("sweep-smoke-lr", "process"))
SUMMARY = re.compile(r"(\d+) points, (\d+) distinct stages \((\d+) stage runs: (\d+) ran, (\d+) hits\)")
TIMEOUT = 600

pytestmark = pytest.mark.slow


def _env(servers: dict, home: Path, prefect_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROADS_TEST_") and k != "RAY_ADDRESS"}
    env.update({
        "ROADS_HOME": str(home),  # the same store for both processes
        "MLFLOW_TRACKING_URI": servers["mlflow"],
        "PREFECT_API_URL": servers["prefect"],
        "PREFECT_HOME": str(prefect_home),  # one per process
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    return env


def _start(sweep: str, runner: str, env: dict, log: Path) -> tuple[subprocess.Popen, object]:
    out = open(log, "w")
    proc = subprocess.Popen([str(ROADS), "sweep", sweep, "--runner", runner, "--workers", "1"], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    return proc, out


def _finish(proc: subprocess.Popen, out, log: Path, what: str) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    text = log.read_text()
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{text[-6000:]}"
    return text


def _summary(text: str) -> dict[str, int]:
    found = SUMMARY.findall(text)
    assert found, f"no summary line in the output:\n{text[-3000:]}"
    points, stages, runs, ran, hits = map(int, found[-1])
    return {"points": points, "stages": stages, "runs": runs, "ran": ran, "hits": hits}


def _expected() -> dict[str, dict]:
    """Per sweep: point name -> (swept values, node id -> cache-relevant plan key)."""
    out = {}
    for sweep, _ in SWEEPS:
        _, studies = load_sweep(FILE, sweep)
        out[sweep] = {point.name: (point.values, keys) for point, _study, _nodes, keys in point_plans(studies)}
    return out


def _study_runs(client: MlflowClient, sweep: str, since_ms: int, until_ms: int | None = None) -> list:
    exp = client.get_experiment_by_name(f"sweep/{sweep}")
    assert exp is not None, f"no experiment sweep/{sweep}"
    query = f"tags.`roads.kind` = 'study' and attributes.start_time >= {since_ms}"
    if until_ms is not None:
        query += f" and attributes.start_time < {until_ms}"
    return client.search_runs([exp.experiment_id], filter_string=query, max_results=1000)


def _library() -> str:
    """The code digests in the cache keys, now (not the cached values of this process)."""
    return "".join(code_digest.__wrapped__(stage) for stage in STAGE_NAMES)


def _children(client: MlflowClient, run) -> list:
    return client.search_runs([run.info.experiment_id], max_results=1000,
                              filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")


@pytest.fixture(scope="module")
def concurrent(servers, tmp_path_factory):
    if not ROADS.exists():
        pytest.skip(f"{ROADS} not installed (make test builds .venv)")
    tmp = tmp_path_factory.mktemp("concurrent-sweeps")
    home = tmp / "home"
    library = _library()
    started_ms = int(time.time() * 1000) - 1000
    procs, timings = [], {}
    t0 = time.time()
    for i, (sweep, runner) in enumerate(SWEEPS):  # back to back: both start at the same moment
        log = tmp / f"{sweep}.log"
        procs.append((sweep, runner, log, *_start(sweep, runner, _env(servers, home, tmp / f"prefect-{i}"), log)))
    outputs = {}
    for sweep, runner, log, proc, out in procs:
        outputs[sweep] = _finish(proc, out, log, f"roads sweep {sweep} --runner {runner}")
        timings[sweep] = time.time() - t0
    concurrent_s = time.time() - t0
    ended_ms = int(time.time() * 1000) + 1000
    summaries = {sweep: _summary(text) for sweep, text in outputs.items()}
    print(f"\n[concurrent sweeps] both done in {concurrent_s:.1f} s; "
          + "; ".join(f"{s} ({r}) exited after {timings[s]:.1f} s: {summaries[s]}" for s, r in SWEEPS))
    return {"home": home, "tmp": tmp, "since": started_ms, "until": ended_ms, "outputs": outputs,
            "summaries": summaries, "client": MlflowClient(tracking_uri=servers["mlflow"]),
            "expected": _expected(), "servers": servers, "library": library, "library_after": _library()}


def test_every_point_is_one_finished_run_with_its_params_and_finished_stage_children(concurrent):
    client, expected = concurrent["client"], concurrent["expected"]
    flow_runs = {}
    misses: dict[str, list] = {}  # cache key -> the child runs that computed it
    for sweep, runner in SWEEPS:
        summary = concurrent["summaries"][sweep]
        points = expected[sweep]
        assert summary["points"] == len(points) and summary["runs"] == sum(len(k) for _, k in points.values())
        runs = _study_runs(client, sweep, concurrent["since"], concurrent["until"])
        by_point = {}
        for run in runs:
            assert run.data.tags["roads.sweep"] == sweep
            point = run.data.tags["roads.sweep_point"]
            assert point not in by_point, f"{sweep}: point {point} has two runs (duplicated)"
            by_point[point] = run
        assert set(by_point) == set(points), f"{sweep}: points logged {sorted(by_point)} != {sorted(points)}"
        flow_runs[sweep] = {r.data.tags["roads.sweep_flow_run_id"] for r in runs}
        assert len(flow_runs[sweep]) == 1 and "" not in flow_runs[sweep], flow_runs[sweep]
        for point, run in by_point.items():
            values, keys = points[point]
            assert run.info.status == "FINISHED", f"{sweep}/{point}: {run.info.status}"
            assert run.data.tags["roads.runner"] == runner
            assert run.data.params["sweep"] == sweep
            for key, value in values.items():
                assert float(run.data.params[f"sweep.{key}"]) == float(value), (sweep, point, key)
                assert float(run.data.tags[f"sweep.{key}"]) == float(value), (sweep, point, key)
            assert any(k.endswith("/offline_dpo/gold_reward_mean") for k in run.data.metrics), (sweep, point)
            children = _children(client, run)
            names = [c.info.run_name for c in children]
            assert sorted(names) == sorted(keys), f"{sweep}/{point}: stage runs {sorted(names)} != {sorted(keys)}"
            for child in children:
                tags = child.data.tags
                assert child.info.status == "FINISHED", f"{sweep}/{point}/{child.info.run_name}: {child.info.status}"
                assert tags["roads.kind"] == "stage" and tags["roads.cache"] in ("hit", "miss")
                path = Path(tags["roads.artifact_path"])
                assert path.is_dir(), f"{sweep}/{point}/{child.info.run_name}: artifact {path} is gone"
                assert path.parent.parent == (concurrent["home"] / "artifacts").resolve()
                assert path.name == tags["roads.artifact_digest"][:24]
                if tags["roads.cache"] == "miss":
                    misses.setdefault(tags["roads.cache_key"], []).append(f"{sweep}/{point}/{child.info.run_name}")
                    assert tags["roads.produced_by"] == child.info.run_id
    assert flow_runs[SWEEPS[0][0]] != flow_runs[SWEEPS[1][0]]
    twice = {key: who for key, who in misses.items() if len(who) > 1}
    print(f"\n[concurrent sweeps] {len(misses)} stages computed, {sum(len(w) for w in misses.values())} computations; "
          f"computed more than once: {twice or 'none'}")
    # every distinct stage of the two sweeps was computed (a stage computed twice with different bytes would give its
    # dependants other cache keys: more keys, never fewer), each by at most one run per sweep, and each has its record
    distinct = {k for points in concurrent["expected"].values() for _, keys in points.values() for k in keys.values()}
    assert len(misses) >= len(distinct), (len(misses), len(distinct))
    assert all(len(who) <= 2 for who in misses.values()), twice
    results = concurrent["home"] / "results"
    lost = sorted(key for key in misses if not (results / key).is_file())
    assert not lost, f"stages computed but without a cache record: {lost}"


def test_the_flow_runs_completed_on_the_prefect_server(concurrent):
    import urllib.request

    client, api = concurrent["client"], concurrent["servers"]["prefect"]
    for sweep, _ in SWEEPS:
        ids = {r.data.tags["roads.sweep_flow_run_id"]
               for r in _study_runs(client, sweep, concurrent["since"], concurrent["until"])}
        for flow_run_id in ids:
            with urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}", timeout=30) as response:
                assert json.load(response)["state_type"] == "COMPLETED", (sweep, flow_run_id)


def test_every_cache_record_parses_and_names_an_artifact_that_exists(concurrent):
    results = concurrent["home"] / "results"
    records = sorted(p for p in results.iterdir() if not p.name.startswith("."))
    leftovers = sorted(p.name for p in results.iterdir() if p.name.startswith("."))
    assert not leftovers, f"temporary cache records left behind: {leftovers}"
    distinct = {k for points in concurrent["expected"].values() for _, keys in points.values() for k in keys.values()}
    assert len(records) >= len(distinct), [p.name for p in records]
    print(f"\n[concurrent sweeps] {len(records)} cache records for {len(distinct)} distinct stages")
    for record in records:
        doc = json.loads(record.read_text())
        result = doc["result"]
        result = json.loads(result) if isinstance(result, str) else result
        assert result["cache_key"] == record.name, record.name
        path = Path(result["artifact"]["path"])
        assert path.is_dir(), f"{record.name} names {path}, which does not exist"
        assert path.name == result["artifact"]["digest"][:24]
        assert digest_dir(path) == result["artifact"]["digest"], f"{path} does not hold what {record.name} says"


def test_every_artifact_folder_is_complete_and_nothing_temporary_is_left(concurrent):
    store = concurrent["home"] / "artifacts"
    folders, leftovers = [], []
    for stage in sorted(p for p in store.iterdir() if p.is_dir()):
        for entry in sorted(stage.iterdir()):
            (leftovers if entry.name.startswith(".") else folders).append(entry)
    assert not leftovers, f"temporary folders left behind: {[str(p.relative_to(store)) for p in leftovers]}"
    assert folders
    for folder in folders:
        assert folder.is_dir(), folder
        assert digest_dir(folder)[:24] == folder.name, f"{folder.relative_to(store)}: contents do not match its name"
    by_stage = {}
    for folder in folders:
        by_stage[folder.parent.name] = by_stage.get(folder.parent.name, 0) + 1
    print(f"\n[concurrent sweeps] artifact folders by stage: {by_stage}")


def test_rerunning_both_sweeps_is_all_cache_hits(concurrent):
    client, tmp = concurrent["client"], concurrent["tmp"]
    if not concurrent["library"] == concurrent["library_after"] == _library():
        pytest.skip("roads/*.py changed while the test ran (cache keys include the source digest): rerun it")
    for i, (sweep, _) in enumerate(SWEEPS):
        since = int(time.time() * 1000) - 1000
        log = tmp / f"{sweep}-rerun.log"
        t0 = time.time()
        proc, out = _start(sweep, "process", _env(concurrent["servers"], concurrent["home"], tmp / f"prefect-re{i}"),
                           log)
        summary = _summary(_finish(proc, out, log, f"rerun of roads sweep {sweep}"))
        if _library() != concurrent["library"]:
            pytest.skip("roads/*.py changed while the test ran (cache keys include the source digest): rerun it")
        print(f"\n[concurrent sweeps] rerun of {sweep}: {time.time() - t0:.1f} s, {summary}")
        assert summary["ran"] == 0 and summary["hits"] == summary["runs"] > 0, summary
        runs = _study_runs(client, sweep, since)
        assert len(runs) == summary["points"]
        for run in runs:
            assert run.info.status == "FINISHED"
            # every stage was cached when the rerun started: the point's run holds the summary, no child runs
            # (its nodes.md names the run that produced each stage)
            assert not _children(client, run), [c.info.run_name for c in _children(client, run)]
    results = concurrent["home"] / "results"
    assert not [p.name for p in results.iterdir() if p.name.startswith(".")]
