"""No secret is logged as a param, tag or config artifact: a study logged straight into the PostgreSQL database with
a password in MLFLOW_TRACKING_URI, a Prefect API URL with credentials, and a token in the environment that the user
also pasted into an override. Every param, tag and artifact is then searched for the three secrets, in the database
itself."""

import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import psycopg2
import pytest

ROOT = Path(__file__).resolve().parents[2]
ROADS = ROOT / ".venv" / "bin" / "roads"
pytestmark = pytest.mark.slow


def test_no_secret_reaches_params_tags_or_artifacts(servers, tmp_path):
    if not ROADS.exists():
        pytest.skip(f"{ROADS} not installed (make test builds .venv)")
    db_uri = servers["postgres"]  # postgresql+psycopg2://roads:PASSWORD@127.0.0.1:PORT/mlflow
    db_password = urlparse(db_uri).password
    prefect = urlparse(servers["prefect"])
    prefect_password = "prefect-pw-7f3a9c"
    token = "hf_TestTokenNeverLogged_51b2"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROADS_TEST_")}
    env.update(
        MLFLOW_TRACKING_URI=db_uri,  # MLflow's SQLAlchemy store, straight into PostgreSQL
        PREFECT_API_URL=f"{prefect.scheme}://roads-user:{prefect_password}@{prefect.netloc}{prefect.path}",
        HF_TOKEN=token,
        ROADS_HOME=str(tmp_path / "home"),
        PREFECT_HOME=str(tmp_path / "prefect"),
    )
    started = int(time.time() * 1000)
    # its own experiment (sweep-smoke): one the MLflow server made would keep its artifacts behind the server
    proc = subprocess.run([str(ROADS), "run", "sweep-smoke",
                           "--set", f"pipeline.description=smoke with hub token {token}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    secrets = {"database password": db_password, "Prefect API password": prefect_password, "HF token": token}

    with psycopg2.connect(db_uri.replace("postgresql+psycopg2://", "postgresql://", 1)) as conn, conn.cursor() as cur:
        cur.execute("SELECT experiment_id FROM experiments WHERE name = 'sweep-smoke'")
        (experiment,) = cur.fetchone()
        cur.execute("SELECT run_uuid, artifact_uri FROM runs WHERE experiment_id = %s AND start_time >= %s",
                    (experiment, started))
        run_ids, artifact_uris = zip(*cur.fetchall())
        run_ids = list(run_ids)
        assert len(run_ids) == 6  # the study's run and its 5 stage runs
        cur.execute("SELECT key, value FROM params WHERE run_uuid = ANY(%s)", (run_ids,))
        params = cur.fetchall()
        cur.execute("SELECT key, value FROM tags WHERE run_uuid = ANY(%s)", (run_ids,))
        tags = dict(cur.fetchall())
        cur.execute("SELECT key, value FROM experiment_tags WHERE experiment_id = %s", (experiment,))
        logged = params + list(tags.items()) + cur.fetchall()
    assert len(params) > 50
    for what, secret in secrets.items():
        leaks = [key for key, value in logged if secret in f"{key}={value}"]
        assert not leaks, f"the {what} was logged in {leaks}"
    # the places they would have been, redacted
    assert tags["roads.tracking_uri"] == db_uri.replace(db_password, "***")
    assert tags["roads.prefect_api_url"] == servers["prefect"].replace("://", "://roads-user:***@")
    assert dict(params)["overrides"] == "pipeline.description=smoke with hub token ***"
    artifacts = [p for uri in artifact_uris for p in Path(urlparse(uri).path).rglob("*") if p.is_file()]
    assert any(p.name == "resolved_config.json" for p in artifacts) and any(p.name == "config.json" for p in artifacts)
    for path in artifacts:
        text = path.read_bytes().decode("utf-8", "replace")
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} is in the artifact {path}"
