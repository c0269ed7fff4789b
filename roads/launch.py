"""Run one Trainer-based stage (``LAUNCH_STAGES``) on several processes through ``accelerate launch``.

The stage's own process (a Prefect task, or a test) stays a plain process: it writes an accelerate config for
``spec.launch`` and a job file into a scratch folder, then runs::

    python -m accelerate.commands.launch --config_file accelerate.yaml --num_processes N -m roads.launched job.json

and streams the children's output, line by line, into the stage's progress log. Every rank runs the stage's
``run(spec, inputs, out, tracker)`` (``roads/launched.py``); rank 0 writes into the stage's real temporary output
folder and its result (metrics, files) as JSON, which :func:`launch` returns as the StageResult; the other ranks
write into scratch folders that are deleted. Rank 0 logs per-step metrics through what the caller chose: the job
carries ``rank_metrics``, the import path (``"package.module:name"``) of a callable that rank 0 calls with
``run_id`` to get an object with ``log_metrics(metrics, step)`` (the task layer's logs into the stage's MLflow child
run; the store comes from the environment). The library names neither the caller's packages nor a tracking system.
``launch.json`` in the output records backend, world size and each rank's device.

``batch_size`` stays the *global* batch: each process takes ``batch_size / num_processes`` examples per step
(``roads.training.per_device_batch``), so a launched stage takes the same optimiser steps on the same examples
as one process.

On CPU (``cpu: true``) the config says ``distributed_type: MULTI_GPU`` with ``use_cpu: true`` and the children get
``ACCELERATE_USE_CPU=true``, so they come up as accelerate's MULTI_CPU over gloo. ``distributed_type: MULTI_CPU``
itself does not work here: accelerate 1.15 starts multi-process MULTI_CPU only through ``mpirun``
(``mpirun_hostfile``); without it ``simple_launcher`` starts one process and that process is not distributed
(measured: world size 1, DistributedType.NO). ``MULTI_GPU`` selects accelerate's torchrun launcher, which starts
``num_processes`` processes on any device.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import yaml

from roads import errors, launched
from roads.artifacts import ArtifactRef, StageResult, read_json, write_json
from roads.config import StageSpec
from roads.settings import LaunchConfig
from roads.errors import ConfigError, RoadsError
from roads.launched import LAUNCH_FILE
from roads.training import NullTracker, Tracker

TAIL_LINES = 20  # lines of the children's output a failure message carries

DISTRIBUTED_TYPE = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}


def accelerate_config(launch: LaunchConfig) -> dict[str, Any]:
    """The accelerate config (as ``accelerate config`` writes it, on one machine) for ``launch``."""
    if launch.backend == "none":
        raise ValueError("launch.backend is 'none': nothing to launch")
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        # MULTI_GPU even on CPU: accelerate's torchrun launcher; see the module docstring
        "distributed_type": DISTRIBUTED_TYPE[launch.backend],
        "mixed_precision": launch.mixed_precision,
        "num_processes": launch.num_processes,
        "num_machines": 1,
        "machine_rank": 0,
        "main_process_port": 0,  # a free port per launch: stages launched side by side on one machine do not collide
        "rdzv_backend": "static",
        "same_network": True,
        "gpu_ids": "all",  # the GPUs CUDA_VISIBLE_DEVICES leaves visible (Ray sets it for a task with num_gpus)
        "use_cpu": launch.cpu,
        "main_training_function": "main",
    }
    if launch.backend == "fsdp":
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": launch.fsdp_auto_wrap_policy,
            "fsdp_reshard_after_forward": launch.fsdp_reshard_after_forward,
            "fsdp_state_dict_type": "FULL_STATE_DICT",  # save_model gathers a model from_pretrained can load
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": False,  # every rank builds or loads the whole model (same seed)
            "fsdp_activation_checkpointing": False,
        }
    if launch.backend == "deepspeed":
        stage3 = launch.deepspeed_stage == 3
        cfg["deepspeed_config"] = {
            "zero_stage": launch.deepspeed_stage,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": False,  # the stages build their models before the trainer: partitioned at prepare
            "deepspeed_multinode_launcher": "standard",
        }
        if stage3:
            cfg["deepspeed_config"]["zero3_save_16bit_model"] = True  # save_model gathers the weights (16-bit)
    return cfg


def write_accelerate_config(launch: LaunchConfig, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(accelerate_config(launch), sort_keys=True))
    return path


def check_runnable(spec: StageSpec) -> None:
    """What only the machine that runs the stage can tell (the config may be written for another one)."""
    launch = spec.launch
    if launch.problem():  # a spec built by hand; loaded studies are checked at load time
        raise ConfigError(f"{spec.stage}: launch.{launch.problem()}")
    if launch.backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise RoadsError(f"{spec.stage}: launch.backend is deepspeed but the deepspeed package is not installed here; "
                         "pip install deepspeed (or use launch.backend=ddp or fsdp)")
    if not launch.cpu:
        import torch

        visible = torch.cuda.device_count()
        if visible < launch.num_processes:
            raise RoadsError(f"{spec.stage}: launch.num_processes={launch.num_processes} ({launch.backend}) needs "
                             f"{launch.num_processes} GPUs and {visible} are visible here; run it where they are, "
                             "or set launch.cpu=true (ddp on CPU) or launch.backend=none")


def project_root() -> Path:
    """The folder holding the ``roads`` package (the project, or site-packages when installed): the ranks import
    ``roads.launched`` and the caller's ``rank_metrics`` from it, as this process does."""
    return Path(__file__).resolve().parents[1]


def child_env(launch: LaunchConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(project_root()), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the progress log as they are printed
    if launch.cpu:
        env["ACCELERATE_USE_CPU"] = "true"  # the ranks come up as MULTI_CPU over gloo
    return env


def launch_command(config_file: Path, num_processes: int, job_file: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_processes", str(num_processes), "-m", launched.__name__, str(job_file)]


def _stream(command: list[str], env: dict[str, str], tracker: Tracker) -> tuple[int, list[str]]:
    """Run ``command``; every non-empty output line (stdout and stderr) goes to ``tracker.progress``. Returns the
    exit code and the last lines. If this process is interrupted, the launcher and its ranks are terminated."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                tracker.progress(line)
        return proc.wait(), list(tail)
    except BaseException:
        _terminate(proc)
        raise
    finally:
        proc.stdout.close()


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM to the launcher's process group (torchrun and the ranks), then SIGKILL if it does not go."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _failure(spec: StageSpec, job_dir: Path, code: int, tail: list[str]) -> RoadsError:
    """The error a rank raised (its type and message, written by roads.launched), or the launcher's last lines."""
    reports = sorted(job_dir.glob("error-rank*.json"), key=lambda p: int(p.stem.split("rank")[-1]))
    if reports:
        doc = read_json(reports[0])
        cls = getattr(errors, doc.get("type", ""), RoadsError)
        if not (isinstance(cls, type) and issubclass(cls, RoadsError)):
            cls = RoadsError
        return cls(doc["message"])
    launch = spec.launch
    return RoadsError(f"{spec.stage}: accelerate launch ({launch.backend}, {launch.num_processes} processes) exited "
                      f"with code {code}; nothing was cached. Last lines:\n" + "\n".join(tail))


def launch(spec: StageSpec, inputs: dict[str, ArtifactRef], out_dir: str | Path, tracker: Tracker = NullTracker(),
           *, rank_metrics: str | None = None, run_id: str | None = None) -> StageResult:
    """Run ``spec`` (whose ``launch`` is set) on ``launch.num_processes`` processes; rank 0 writes ``out_dir``,
    its progress lines go to ``tracker.progress`` and its per-step metrics to ``rank_metrics`` (an import path,
    ``"package.module:name"``, of a callable taking ``run_id``; None: they are dropped; see the module docstring).
    Returns rank 0's StageResult (without artifact: the runner commits ``out_dir``)."""
    if not spec.launched:
        raise ValueError(f"{spec.stage}: spec.launch is not set; run the stage in-process")
    check_runnable(spec)
    if rank_metrics:
        pkgutil.resolve_name(rank_metrics)  # a wrong path fails here, before any process starts
    launch_cfg = spec.launch
    with tempfile.TemporaryDirectory(prefix=f"roads-launch-{spec.stage}-") as scratch:
        job_dir = Path(scratch)
        config_file = write_accelerate_config(launch_cfg, job_dir / "accelerate.yaml")
        job_file = job_dir / "job.json"
        write_json(job_file, {
            "spec": spec.model_dump(mode="json"),
            "inputs": {name: ref.to_json() for name, ref in inputs.items()},
            "out_dir": str(Path(out_dir).resolve()),
            "result": str(job_dir / "result.json"),
            "errors": str(job_dir),
            "rank_metrics": rank_metrics,
            "run_id": run_id,
        })
        tracker.progress(f"accelerate launch: {launch_cfg.backend} on {launch_cfg.num_processes} "
                         f"{'CPU processes' if launch_cfg.cpu else 'GPUs'}")
        code, tail = _stream(launch_command(config_file, launch_cfg.num_processes, job_file),
                             child_env(launch_cfg), tracker)
        if code != 0 or not (job_dir / "result.json").is_file():
            raise _failure(spec, job_dir, code, tail)
        doc = read_json(job_dir / "result.json")
    return StageResult(metrics={k: float(v) for k, v in doc["metrics"].items()}, files=list(doc["files"]))
