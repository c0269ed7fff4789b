"""Test-wide settings: offline, no telemetry, all state in a temporary folder (never the project's .roads)."""

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

_STATE = Path(tempfile.mkdtemp(prefix="roads-tests-"))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # a `roads` command a test starts gets a temporary Prefect server that ends with it (not the persistent one)
    "ROADS_PREFECT_SERVER": "temporary",
    "ROADS_HOME": str(_STATE / "home"),
    "PREFECT_HOME": str(_STATE / "prefect"),
    "MLFLOW_TRACKING_URI": f"sqlite:///{_STATE / 'mlflow.db'}",
}.items():
    os.environ[key] = value


# Tiny models on 2 cores run 5-10x faster on one intra-op thread (measured; the flow's workers use one each).
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def pipelines_file() -> Path:
    return ROOT / "pipelines.yaml"


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture
def hh_file() -> Path:
    """The real HH-RLHF file the hh-rlhf pipelines read (``../shared/data``, beside the clone); the test skips, saying
    so, where a clone has no shared/ beside it (a user's own clone)."""
    from support import HH_FILE

    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is not there: the hh-rlhf pipelines cannot be loaded")
    return HH_FILE
