"""Integration tests against real servers: PostgreSQL, an MLflow tracking server backed by it, a Prefect server backed
by it. `make test` starts them on loopback (scripts/services.py) and exports where they are; without that the tests
skip. The test-wide tests/conftest.py points MLFLOW_TRACKING_URI at a local sqlite file: these tests pass the server
URIs explicitly (to subprocesses in their environment, to MlflowClient as tracking_uri)."""

import os
import urllib.request

import pytest

NO_SERVERS = ("no test servers: run `make test`, or `python scripts/services.py start` and source "
              ".roads-services/services.env")
ENV = {
    "mlflow": "ROADS_TEST_MLFLOW_URI",  # http://127.0.0.1:PORT
    "prefect": "ROADS_TEST_PREFECT_API_URL",  # http://127.0.0.1:PORT/api
    "postgres": "ROADS_TEST_POSTGRES_URI",  # postgresql+psycopg2://roads:PASSWORD@127.0.0.1:PORT/mlflow
    "dir": "ROADS_TEST_SERVICES_DIR",  # the services' folder (logs, MLflow's artifact store in mlartifacts/)
}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def servers() -> dict[str, str]:
    """Where the test servers are: keys mlflow, prefect, postgres, dir. Skips when they are not configured; fails
    when they are configured but do not answer (started, then gone: that is a bug, not a reason to skip)."""
    found = {key: os.environ.get(name, "") for key, name in ENV.items()}
    if not all(found[key] for key in ("mlflow", "prefect", "postgres")):
        pytest.skip(NO_SERVERS)
    for key, health in (("mlflow", "/health"), ("prefect", "/health")):
        assert _answers(found[key] + health), f"{ENV[key]}={found[key]} is set but {found[key]}{health} does not answer"
    return found
