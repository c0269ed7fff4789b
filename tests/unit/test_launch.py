"""Multi-process training stages through ``accelerate launch`` (roads.launch, roads/launched.py): the accelerate
config of each backend (checked by accelerate's own parser), the ``launch`` section and its one-line errors, which
stages get it and that nobody else's fingerprint moves, the run-time checks, that the launch modules name no upper
layer, and one real launch: an SFT stage on 2 CPU processes (DDP over gloo) whose weights match the same stage run
in one process (the global batch is kept), with rank 0's per-step metrics logged through the task layer's sink.
And in-process mixed precision (backend none with ``mixed_precision``): a real bf16 SFT stage in this process."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

import roads.launch
from roads.artifacts import ArtifactRef, read_json
from roads.config import StageSpec, _result_fields, load_study
from roads.settings import LaunchConfig, ModelConfig, SftConfig
from roads.stage_table import LAUNCH_STAGES
from roads.errors import ConfigError, RoadsError
from roads.launch import child_env, launch_command, write_accelerate_config
from roads.plan import build_plan
from roads.runner import execute
from support import Recorder, differs, tiny_data, weights
from tasks.metrics import RANK_METRICS

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines.yaml"
DDP2 = ["launch.backend=ddp", "launch.num_processes=2"]


# --------------------------------------------------------------------------- the accelerate config


def parsed(launch: LaunchConfig, tmp_path: Path):
    """The written YAML as a dict, and as accelerate 1.15 itself loads it (ClusterConfig)."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = write_accelerate_config(launch, tmp_path / "accelerate.yaml")
    return yaml.safe_load(path.read_text()), load_config_from_file(str(path))


def test_ddp_config(tmp_path):
    doc, cluster = parsed(LaunchConfig(backend="ddp", num_processes=8, mixed_precision="bf16"), tmp_path)
    assert doc["distributed_type"] == "MULTI_GPU" and str(cluster.distributed_type).endswith("MULTI_GPU")
    assert doc["num_processes"] == cluster.num_processes == 8 and doc["num_machines"] == 1
    assert doc["mixed_precision"] == "bf16" and doc["use_cpu"] is False
    assert doc["main_process_port"] == 0  # a free port per launch
    assert "fsdp_config" not in doc and "deepspeed_config" not in doc


def test_fsdp_config(tmp_path):
    launch = LaunchConfig(backend="fsdp", num_processes=4, fsdp_auto_wrap_policy="SIZE_BASED_WRAP",
                          fsdp_reshard_after_forward=False)
    doc, cluster = parsed(launch, tmp_path)
    assert doc["distributed_type"] == "FSDP" and str(cluster.distributed_type).endswith("FSDP")
    assert doc["num_processes"] == 4
    fsdp = cluster.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_auto_wrap_policy"] == "SIZE_BASED_WRAP" and fsdp["fsdp_reshard_after_forward"] is False
    assert "deepspeed_config" not in doc


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config(stage, tmp_path):
    doc, cluster = parsed(LaunchConfig(backend="deepspeed", num_processes=2, deepspeed_stage=stage), tmp_path)
    assert doc["distributed_type"] == "DEEPSPEED" and str(cluster.distributed_type).endswith("DEEPSPEED")
    ds = cluster.deepspeed_config
    assert ds["zero_stage"] == stage and ds["offload_param_device"] == "none"
    assert ds.get("zero3_save_16bit_model", False) is (stage == 3)  # save_model gathers ZeRO-3 weights
    assert "fsdp_config" not in doc


def test_cpu_config_uses_the_torchrun_launcher_and_gloo(tmp_path):
    """MULTI_CPU through accelerate launch starts one process without mpirun (see roads.launch): the CPU config
    asks for the multi-process launcher and the environment makes the ranks CPU ranks."""
    launch = LaunchConfig(backend="ddp", num_processes=2, cpu=True)
    doc, _ = parsed(launch, tmp_path)
    assert doc["distributed_type"] == "MULTI_GPU" and doc["use_cpu"] is True
    env = child_env(launch)
    assert env["ACCELERATE_USE_CPU"] == "true"
    assert str(ROOT) in env["PYTHONPATH"].split(":")
    assert "ACCELERATE_USE_CPU" not in child_env(LaunchConfig(backend="ddp", num_processes=2))


def test_launch_command(tmp_path):
    command = launch_command(tmp_path / "a.yaml", 2, tmp_path / "job.json")
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "a.yaml")]
    assert command[5:] == ["--num_processes", "2", "-m", "roads.launched", str(tmp_path / "job.json")]


def _names(path: Path) -> tuple[set[str], set[str]]:
    """The top-level packages a file imports (anywhere in it), and the dotted names its strings start with."""
    tree = ast.parse(path.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    strings = {node.value.split(".")[0].split(":")[0] for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value}
    return imported, strings


def test_the_launch_modules_name_no_upper_layer():
    """The library's launch path imports neither Prefect nor MLflow and names no module of tasks/ or flows/ (the
    rank entry is roads.launched; the metrics sink is the caller's, by import path); rank 0's sink imports no
    Prefect (tasks/common.py does) and nothing of the task layer."""
    for name in ("launch.py", "launched.py", "runner.py"):
        imported, strings = _names(ROOT / "roads" / name)
        assert not imported & {"prefect", "mlflow", "tasks", "flows"}, name
        assert not strings & {"tasks", "flows"}, name
    imported, _ = _names(ROOT / "tasks" / "metrics.py")
    assert not imported & {"prefect", "tasks", "flows"}
    assert RANK_METRICS == "tasks.metrics:MlflowMetrics"


def test_a_wrong_rank_metrics_path_fails_before_launching(tmp_path):
    spec = sft_spec(LaunchConfig(backend="ddp", num_processes=2, cpu=True))
    with pytest.raises((ImportError, AttributeError)):
        roads.launch.launch(spec, {}, tmp_path, rank_metrics="tasks.metrics:NoSuchSink")


# --------------------------------------------------------------------------- the launch section


@pytest.mark.parametrize("overrides, section, launched", [
    (DDP2, LaunchConfig(backend="ddp", num_processes=2), True),
    (["launch.mixed_precision=bf16"], LaunchConfig(mixed_precision="bf16"), False),  # in-process autocast
])
def test_launch_reaches_only_the_trainer_stages(overrides, section, launched):
    plain = {n.id: n.spec for n in build_plan(load_study(PIPELINES, "study-smoke"))}
    launched_specs = {n.id: n.spec for n in build_plan(load_study(PIPELINES, "study-smoke", overrides))}
    assert plain.keys() == launched_specs.keys()
    stages = set()
    for node_id, spec in launched_specs.items():
        assert plain[node_id].launch is None
        if spec.stage in LAUNCH_STAGES:
            assert spec.launch == section and spec.launched == launched, node_id
            assert spec.fingerprint() != plain[node_id].fingerprint(), node_id
            stages.add(spec.stage)
        else:  # online_dpo, evaluate, …: in-process, fingerprint untouched
            assert spec.launch is None, node_id
            assert spec.fingerprint() == plain[node_id].fingerprint(), node_id
    assert stages == set(LAUNCH_STAGES)


def test_fingerprint_without_launch_leaves_the_key_out():
    """In-process specs hash exactly as before the launch field existed."""
    spec = StageSpec(stage="sft", params=SftConfig().model_dump(), seed=0, model=ModelConfig())
    data = _result_fields(spec)
    data["params"] = _result_fields(spec.config())
    del data["launch"]
    data["arm"] = data.pop("policy")  # and the evaluated policy under its old name `arm`
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    assert spec.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()


def test_the_multi_gpu_pipeline_loads_anywhere():
    """Written for 8 GPUs; loading it needs none (the GPUs are checked where it runs)."""
    study = load_study(PIPELINES, "multi-gpu")
    assert study.defaults.launch.backend == "ddp" and study.defaults.launch.num_processes == 8
    specs = {n.stage: n.spec for n in build_plan(study)}
    assert specs["offline_dpo"].launch.num_processes == 8 and specs["online_dpo"].launch is None


def test_deepspeed_loads_without_the_package():
    study = load_study(PIPELINES, "smoke", ["launch.backend=deepspeed", "launch.num_processes=2"])
    assert study.defaults.launch.deepspeed_stage == 2


@pytest.mark.parametrize("overrides, words", [
    (["launch.backend=ddp"], ["launch.num_processes", "at least 2"]),
    (["launch.num_processes=4"], ["launch.num_processes", "backend"]),
    (["launch.backend=fsdp", "launch.num_processes=2", "launch.cpu=true"], ["launch.cpu", "ddp"]),
    (["launch.backend=ddp", "launch.num_processes=2", "launch.cpu=true", "launch.mixed_precision=fp16"],
     ["launch.mixed_precision", "fp16"]),
    (["launch.backend=horovod"], ["launch.backend"]),
    (["launch.deepspeed_stage=1"], ["launch.deepspeed_stage"]),
    (["launch.gpus=2"], ["launch.gpus", "unknown key"]),
    (["launch.backend=ddp", "launch.num_processes=3"], ["sft.batch_size 32", "launch.num_processes (3)"]),
])
def test_launch_errors_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_study(PIPELINES, "smoke", overrides)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_online_rl_batch_counts_whole_prompt_groups():
    # batch 6 with 4 generations is 8 completions per step: fine on 2 or 4 processes, not on 3
    base = ["pipeline.stages=[prepare_data, sft, reward_model, online_rl]", "online_rl.batch_size=6",
            "sft.batch_size=12", "reward_model.batch_size=12"]
    load_study(PIPELINES, "smoke", [*base, "launch.backend=ddp", "launch.num_processes=4"])
    with pytest.raises(ConfigError, match=r"online_rl.batch_size 8 is not a multiple of launch.num_processes \(3\)"):
        load_study(PIPELINES, "smoke", [*base, "launch.backend=ddp", "launch.num_processes=3"])


def sft_spec(launch: LaunchConfig | None, batch_size: int = 16) -> StageSpec:
    return StageSpec(stage="sft", params=SftConfig(epochs=1, batch_size=batch_size, logging_steps=1).model_dump(),
                     seed=0, model=ModelConfig(), launch=launch)


def test_deepspeed_missing_is_a_run_time_error(tmp_path, monkeypatch):
    monkeypatch.setattr(roads.launch.importlib.util, "find_spec", lambda name: None)
    spec = sft_spec(LaunchConfig(backend="deepspeed", num_processes=2))
    with pytest.raises(RoadsError, match="pip install deepspeed"):
        execute(spec, {}, tmp_path)
    assert not (tmp_path / "sft").exists()  # nothing half-written


def test_too_few_gpus_is_a_run_time_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RoadsError, match=r"needs 2 GPUs and 1 are visible.*launch.cpu=true"):
        execute(sft_spec(LaunchConfig(backend="ddp", num_processes=2)), {}, tmp_path)


# --------------------------------------------------------------------------- a real launch: DDP on 2 CPU processes


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> ArtifactRef:
    return tiny_data(tmp_path_factory.mktemp("store"), n_pairs=8, n_sft=32)


@pytest.fixture(scope="module")
def mlflow_run():
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.create_experiment("test-launch")
    return client, client.create_run(experiment).info.run_id


def test_sft_on_two_cpu_processes_matches_one_process(data, mlflow_run, tmp_path):
    client, run_id = mlflow_run
    tracker = Recorder()
    tracker.run_id, tracker.rank_metrics = run_id, RANK_METRICS  # as tasks.common.MlflowTracker carries them
    launched = execute(sft_spec(LaunchConfig(backend="ddp", num_processes=2, cpu=True)), {"data": data},
                       tmp_path, tracker)
    out = Path(launched.artifact.path)

    record = read_json(out / "launch.json")
    assert record["world_size"] == 2 and record["distributed_type"] == "MULTI_CPU" and record["backend"] == "ddp"
    assert [r["rank"] for r in record["ranks"]] == [0, 1] and all(r["device"].startswith("cpu") for r in record["ranks"])
    assert record["global_batch_size"] == 16 and record["per_device_batch_size"] == 8
    assert launched.metrics["launch/world_size"] == 2.0 and "launch.json" in launched.files
    assert math.isfinite(launched.metrics["sft/train_loss"])

    from roads.models import load_policy

    model, tokenizer = load_policy(out)  # rank 0 saved a loadable policy
    assert model.config.vocab_size == len(tokenizer)
    assert not list(out.parent.glob(".tmp-*"))

    # rank 0 logged per step into the MLflow run, and its progress lines reached the parent's tracker
    assert [m.step for m in client.get_metric_history(run_id, "sft/loss")] == [1, 2]
    assert any(line.startswith("step 2/2 loss") for line in tracker.messages)

    # the global batch is kept: the same steps on the same examples as one process, so the same weights
    single = execute(sft_spec(None), {"data": data}, tmp_path)
    assert single.metrics["sft/num_tokens"] == launched.metrics["sft/num_tokens"]
    a, b = weights(out), weights(single.artifact.path)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_an_error_in_the_ranks_reaches_the_caller(data, tmp_path):
    """A RoadsError raised in the ranks is raised again, same type and message, and nothing is cached."""
    spec = sft_spec(LaunchConfig(backend="ddp", num_processes=2, cpu=True), batch_size=15)  # not split evenly
    with pytest.raises(ConfigError, match="batch_size 15 is not a multiple of the 2 launched processes"):
        execute(spec, {"data": data}, tmp_path)
    assert not (tmp_path / "sft").exists()


# --------------------------------------------------------------------------- in-process mixed precision


def test_sft_in_process_under_bf16(data, tmp_path, monkeypatch):
    """backend none with mixed_precision bf16: the stage trains in this process (no launch.json) under bf16 autocast —
    its weights are not float32's, and stay float32 tensors — and ACCELERATE_MIXED_PRECISION left in the shell does not
    reach a stage whose key says float32; the variable is given back after each stage."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # left in the user's shell
    stray = execute(sft_spec(None), {"data": data}, tmp_path / "stray")
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    fp32 = execute(sft_spec(None), {"data": data}, tmp_path / "fp32")
    bf16 = execute(sft_spec(LaunchConfig(mixed_precision="bf16")), {"data": data}, tmp_path / "bf16")
    assert "ACCELERATE_MIXED_PRECISION" not in os.environ
    assert not differs(weights(stray.artifact.path), weights(fp32.artifact.path))
    a, b = weights(bf16.artifact.path), weights(fp32.artifact.path)
    assert "launch.json" not in bf16.files and all(t.dtype == torch.float32 for t in a.values())
    assert differs(a, b), "bf16 did not reach training"
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.05  # the same training, in lower precision
    assert abs(bf16.metrics["sft/train_loss"] - fp32.metrics["sft/train_loss"]) < 0.05


def test_fp16_in_process_without_a_gpu_is_a_run_time_error(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="launch.mixed_precision: fp16 needs a GPU.*use bf16"):
        execute(sft_spec(LaunchConfig(mixed_precision="fp16")), {"data": data}, tmp_path)
    assert not (tmp_path / "sft").exists()  # nothing half-written
