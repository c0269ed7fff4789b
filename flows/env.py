"""Local defaults, set before Prefect or MLflow is imported: state inside the project, telemetry off, and a
Prefect API for worker processes. Every variable is only a default: a user's own setting wins."""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

from roads.artifacts import state_home
from roads.errors import RoadsError


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
        # the console shows warnings and the progress view; every INFO line still reaches the Prefect API, the log
        # file (log_file()) and MLflow. `roads run -v` sets it to 0 (everything).
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
        # TRL's and datasets' own progress bars (reference log-probs, map) would tear the progress view
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return home


def log_file() -> str:
    """This study process's log file, ``$ROADS_HOME/logs/<time>-<pid>.log``: every Prefect and roads line of the flow
    and of its worker processes (the per-step lines the console leaves out). One per state folder the process uses."""
    return _log_file(str(state_home()))


@lru_cache(maxsize=None)
def _log_file(home: str) -> str:
    folder = Path(home) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


def log_to_file(path: str | None) -> None:
    """Add a handler writing INFO and above to ``path`` on the root logger (after Prefect configured logging, which
    replaces the root's handlers)."""
    if not path:
        return
    import prefect  # noqa: F401 # pyflakes: ignore - configures logging first

    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in root.handlers):
        return
    for old in [h for h in root.handlers if getattr(h, "roads_log", False)]:  # an earlier study's, in another home
        root.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path)
    handler.roads_log = True
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(process)d | %(levelname)-7s | %(name)s - %(message)s"))
    root.addHandler(handler)
    for name in ("prefect", "roads"):
        if logging.getLogger(name).level in (logging.NOTSET,) or logging.getLogger(name).level > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)


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
    """Worker processes must report to the same Prefect API as the flow. With no server configured
    (PREFECT_API_URL, or a test harness), use roads' persistent local server for this state folder — started on first
    use and reused by every later run (``roads server`` shows, starts and stops it) — or, with
    ROADS_PREFECT_SERVER=temporary, a temporary server that stops when this process exits (as Prefect itself would)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    if "prefect.settings" in sys.modules:
        url = sys.modules["prefect.settings"].get_current_settings().api.url  # e.g. set by prefect_test_harness
        if url:
            os.environ["PREFECT_API_URL"] = str(url)
            return
    if os.environ.get("ROADS_PREFECT_SERVER", "persistent") == "temporary":
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")))
        os.environ["PREFECT_API_URL"] = server.api_url
        atexit.register(server.stop)  # registered before Prefect's log workers, so they flush first (LIFO)
    else:
        os.environ["PREFECT_API_URL"] = start_server()["api_url"]
    if "prefect.context" in sys.modules:  # Prefect read its settings when imported: make it see this server
        sys.modules["prefect.context"].refresh_global_settings_context()  # (else it starts one of its own)


# --- the persistent local Prefect server --------------------------------------------------------------------------
def server_file() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or state_home() / "prefect") / "roads-server.json"


def _healthy(api_url: str, timeout: float = 1.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _server_record() -> dict | None:
    """What ``start_server`` wrote ({api_url, ui_url, pid, log}), if anything."""
    try:
        return json.loads(server_file().read_text())
    except (OSError, ValueError):
        return None


def server_status() -> dict | None:
    """The persistent server of this state folder when it answers, else None."""
    info = _server_record()
    return info if info and _healthy(info.get("api_url", "")) else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(timeout: float | None = None) -> dict:
    """The running persistent server, or a new one: ``prefect server start`` on 127.0.0.1 in its own session (it
    outlives this command), its database in PREFECT_HOME, its output in ``$ROADS_HOME/logs/prefect-server.log``."""
    info = server_status()
    if info:
        return info
    configure()
    print(f"starting a local Prefect server for {state_home()} (once: later runs reuse it; `roads server stop` ends "
          "it) ...", file=sys.stderr, flush=True)
    port = _free_port()
    log = state_home() / "logs" / "prefect-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--no-scheduler", "--no-late-runs", "--analytics-off"]
    environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ,
                                start_new_session=True)
    info = {"api_url": f"http://127.0.0.1:{port}/api", "ui_url": f"http://127.0.0.1:{port}", "pid": proc.pid,
            "log": str(log)}
    deadline = time.time() + (timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")))
    while not _healthy(info["api_url"], 0.5):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RoadsError(f"the local Prefect server did not start (see {log}); or set PREFECT_API_URL to a "
                             "running server, or ROADS_PREFECT_SERVER=temporary")
        time.sleep(0.2)
    server_file().parent.mkdir(parents=True, exist_ok=True)
    server_file().write_text(json.dumps(info))
    return info


def stop_server() -> dict | None:
    """Stop the persistent server of this state folder; returns what was stopped (None: none was running)."""
    info = _server_record()
    if info is None:
        return None
    try:
        os.killpg(info["pid"], signal.SIGTERM)
        for _ in range(50):
            try:  # our own child (started by this process): reap it, or it stays a zombie that "exists"
                if os.waitpid(info["pid"], os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                os.kill(info["pid"], 0)
            time.sleep(0.1)
        else:
            os.killpg(info["pid"], signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    server_file().unlink(missing_ok=True)
    return info
