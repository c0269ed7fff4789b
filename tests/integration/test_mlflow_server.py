"""A study through the real services: the `roads` CLI logs to an MLflow tracking server backed by PostgreSQL (artifacts
through the server's artifact store) and reports to a Prefect server; everything is read back from the servers and
from the database itself. And the servers listen on loopback only."""

import ipaddress
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
ROADS = ROOT / ".venv" / "bin" / "roads"
PIPELINE = "smoke"
OVERRIDES = ["--set", "pipeline.tasks=[gap]"]  # 6 nodes on tiny data: ~25 s on 2 CPU cores with the servers


def node_ids(out: str) -> set[str]:
    """The node column of the run's node table (| node | cache | seconds | error |)."""
    rows = set()
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and "/seed" in cells[0]:
            rows.add(cells[0])
    return rows


def prefect_get(api: str, path: str, body: dict | None = None):
    request = urllib.request.Request(api + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def psycopg2_dsn(uri: str) -> str:
    return uri.replace("postgresql+psycopg2://", "postgresql://", 1)


@pytest.fixture(scope="module")
def study(servers, tmp_path_factory):
    """One `roads run` through the servers; what it logged, read back with a client of the MLflow server."""
    if not ROADS.exists():
        pytest.skip(f"{ROADS} not installed (make test builds .venv)")
    tmp = tmp_path_factory.mktemp("server-study")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROADS_TEST_")}
    env.update({
        "MLFLOW_TRACKING_URI": servers["mlflow"],
        "PREFECT_API_URL": servers["prefect"],  # the real Prefect server, not a temporary one
        "ROADS_HOME": str(tmp / "home"),
        "PREFECT_HOME": str(tmp / "prefect"),
    })
    started = int(time.time() * 1000) - 1000
    proc = subprocess.run([str(ROADS), "run", PIPELINE, *OVERRIDES], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"roads run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    client = MlflowClient(tracking_uri=servers["mlflow"])
    experiment = client.get_experiment_by_name(PIPELINE)
    assert experiment is not None, f"no experiment {PIPELINE!r} on {servers['mlflow']}"
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`roads.kind` = 'study' and attributes.start_time >= {started}")
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {"client": client, "experiment": experiment, "parent": parent, "children": children,
            "nodes": node_ids(proc.stdout), "home": tmp / "home", "tmp": tmp}


@pytest.mark.slow
def test_a_study_is_logged_to_the_tracking_server(study):
    parent, children = study["parent"], study["children"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["roads.pipeline"] == PIPELINE
    assert parent.data.params, "the parent run has no params"
    assert parent.data.metrics, "the parent run has no metrics"
    assert study["nodes"], "the run printed no node table"
    assert {c.info.run_name for c in children} == study["nodes"]  # one child run per stage node
    for child in children:
        tags = child.data.tags
        assert tags["roads.kind"] == "stage" and tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED", child.info.run_name
        assert child.data.params["stage"] == tags["roads.stage"]
        assert f"{tags['roads.stage']}/wall_seconds" in child.data.metrics, child.info.run_name


@pytest.mark.slow
def test_stage_artifacts_go_through_the_servers_artifact_store(study, servers):
    """The artifacts are the server's: a mlflow-artifacts: URI (not a file path of the client's machine), stored
    under the server's --artifacts-destination, and downloaded back through the server."""
    client, experiment = study["client"], study["experiment"]
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    sft = next(c for c in study["children"] if c.data.tags["roads.stage"] == "sft")
    uri = client.get_run(sft.info.run_id).info.artifact_uri
    assert uri.startswith("mlflow-artifacts:"), f"artifacts bypass the server: {uri}"
    assert "config.json" in {f.path for f in client.list_artifacts(sft.info.run_id)}
    local = client.download_artifacts(sft.info.run_id, "config.json", str(study["tmp"] / "download"))
    config = json.loads(Path(local).read_text())
    assert config["stage"] == "sft" and config["task_name"] == "gap"
    if servers.get("dir") and Path(servers["dir"]).is_dir():  # the server's store is on this machine: look inside
        stored = (Path(servers["dir"]) / "mlartifacts" / experiment.experiment_id / sft.info.run_id / "artifacts"
                  / "config.json")
        assert json.loads(stored.read_text()) == config
    assert not (study["home"] / "mlruns").exists(), "artifacts were also written to the client's local store"


@pytest.mark.slow
def test_the_runs_are_rows_in_postgresql(study, servers):
    import psycopg2

    parent, children = study["parent"], study["children"]
    ids = [parent.info.run_id] + [c.info.run_id for c in children]
    with psycopg2.connect(psycopg2_dsn(servers["postgres"])) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s AND run_uuid = ANY(%s)",
                    (int(study["experiment"].experiment_id), ids))
        assert cur.fetchone()[0] == len(ids)
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (parent.info.run_id,))
        assert cur.fetchone()[0] == "FINISHED"
        cur.execute("SELECT count(*) FROM params WHERE run_uuid = %s", (parent.info.run_id,))
        assert cur.fetchone()[0] == len(parent.data.params)
        cur.execute("SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId' AND value = %s", (parent.info.run_id,))
        assert cur.fetchone()[0] == len(children)
    conn.close()


@pytest.mark.slow
def test_the_flow_ran_on_the_prefect_server(study, servers):
    flow_run_id = study["parent"].data.tags["roads.prefect_flow_run_id"]
    assert flow_run_id, "the parent run names no Prefect flow run"
    flow_run = prefect_get(servers["prefect"], f"/flow_runs/{flow_run_id}")
    assert flow_run["state_type"] == "COMPLETED"
    task_runs = prefect_get(servers["prefect"], "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert {t["name"] for t in task_runs} == study["nodes"]
    assert {t["state_type"] for t in task_runs} == {"COMPLETED"}
    import psycopg2  # and the Prefect server keeps it in its PostgreSQL database

    dsn = psycopg2_dsn(servers["postgres"]).rsplit("/", 1)[0] + "/prefect"
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM task_run WHERE flow_run_id = %s", (flow_run_id,))
        assert cur.fetchone()[0] == len(study["nodes"])
    conn.close()


# --- loopback only ------------------------------------------------------------------------------------------------

def _listening(port: int) -> list[str]:
    """Local addresses of the listening TCP sockets on ``port`` (Linux /proc/net/tcp{,6}); None elsewhere."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if width == 8:
                found.append(str(ipaddress.IPv4Address(raw[::-1])))
            else:  # four little-endian 32-bit words
                found.append(str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))))
    return found


def _non_loopback_address() -> str | None:
    candidates = []
    try:
        candidates.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    try:  # the address of the default route's interface (a UDP connect sends nothing)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            candidates.append(s.getsockname()[0])
    except OSError:
        pass
    for address in candidates:
        if not ipaddress.ip_address(address).is_loopback and address != "0.0.0.0":
            return address
    return None


def test_the_servers_listen_on_loopback_only(servers):
    ports = {}
    for key in ("mlflow", "prefect", "postgres"):
        url = urlparse(servers[key])
        assert url.hostname == "127.0.0.1", f"{key} is not on loopback: {url.hostname}"
        ports[key] = url.port
        with socket.create_connection(("127.0.0.1", url.port), timeout=5):
            pass
    if Path("/proc/net/tcp").exists():
        for key, port in ports.items():
            assert _listening(port) == ["127.0.0.1"], f"{key} listens on {_listening(port)} (port {port})"
    address = _non_loopback_address()
    if address is None:  # nothing to connect from: the listening addresses above are the check
        return
    for key, port in ports.items():
        with pytest.raises(OSError):  # refused (nothing listens there), never accepted
            socket.create_connection((address, port), timeout=3).close()
