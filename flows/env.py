"""Local defaults, set before Prefect or MLflow is imported: state inside the project, telemetry off, and a
Prefect API for worker processes. Every variable is only a default: a user's own setting wins."""

from __future__ import annotations

import atexit
import os
from pathlib import Path

from roads.artifacts import state_home


def configure() -> Path:
    """Point Prefect and MLflow at project-local state (unless told otherwise); return the state folder."""
    home = state_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["ROADS_HOME"] = str(home)
    defaults = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return home


# what a stage task on another machine (a Ray worker) needs to reach the same store, tracking server and Prefect API
FORWARDED = ("ROADS_HOME", "PREFECT_API_URL", "PREFECT_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
             "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "HF_HOME", "HF_HUB_OFFLINE",
             "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY",
             "TRL_EXPERIMENTAL_SILENCE", "TOKENIZERS_PARALLELISM")


def run_environment() -> dict[str, str]:
    """Tags that make a run reproducible elsewhere: library versions, devices, and where it logged (credentials
    are redacted by the tracker before anything is logged)."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {}
    for package in ("torch", "transformers", "trl", "accelerate", "prefect", "mlflow", "ray", "vllm", "deepspeed"):
        try:
            tags[f"roads.version.{package}"] = version(package)
        except PackageNotFoundError:
            continue
    tags["roads.tracking_uri"] = os.environ.get("MLFLOW_TRACKING_URI", "")
    tags["roads.prefect_api_url"] = os.environ.get("PREFECT_API_URL", "")
    tags["roads.cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    tags["roads.ray_address"] = os.environ.get("RAY_ADDRESS", "")
    return tags


def ray_worker_setup() -> None:
    """Run by every Ray worker when it starts (``worker_process_setup_hook``): import the stage code and its heavy
    libraries then, so all workers warm up at once instead of on their first task."""
    import importlib

    for module in ("torch", "transformers", "trl", "mlflow.tracking", "prefect.task_engine", "roads.stages", "tasks",
                   "roads.stages.sft", "roads.stages.reward_model", "roads.stages.offline_dpo"):
        importlib.import_module(module)  # the stage modules import TRL's trainers


def artifact_store() -> Path:
    return state_home() / "artifacts"


def mlflow_artifact_root() -> Path:
    return state_home() / "mlruns"


def ensure_prefect_api() -> None:
    """Worker processes must report to the same Prefect API as the flow. With no server configured, start one local
    temporary server (as Prefect itself would) and export its URL; it stops when this process exits."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url  # e.g. set by prefect_test_harness
    if url:
        os.environ["PREFECT_API_URL"] = str(url)
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")))
    os.environ["PREFECT_API_URL"] = server.api_url
    atexit.register(server.stop)  # registered before Prefect's log workers, so they flush first (LIFO)
