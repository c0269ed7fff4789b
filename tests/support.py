"""Helpers shared by the unit tests (importable as ``support``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

# the real HH-RLHF file the hh-rlhf pipelines read: ../shared/data beside the clone (absent from a user's own clone)
HH_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


class Recorder:
    """A tracker that keeps what a stage reports: ``logs`` = [(metrics, step)], ``messages`` = progress lines."""

    def __init__(self):
        self.logs: list[tuple[dict, int | None]] = []
        self.messages: list[str] = []

    def log_metrics(self, metrics, step=None):
        self.logs.append((dict(metrics), step))

    def progress(self, message):
        self.messages.append(message)


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved model folder."""
    return load_file(str(Path(path) / "model.safetensors"))


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """True when any tensor of two state dicts with the same keys differs."""
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def tiny_data(store, n_pairs: int, n_val_pairs: int = 4, n_sft: int = 32):
    """A prepare_data output of the gap family (seed 0) in ``store``: its ArtifactRef."""
    from roads.config import StageSpec
    from roads.settings import PrepareDataConfig, TaskConfig
    from roads.runner import execute

    cfg = PrepareDataConfig(n_sft=n_sft, n_pairs=n_pairs, n_val_pairs=n_val_pairs, n_eval_prompts=2)
    spec = StageSpec(stage="prepare_data", params=cfg.model_dump(), seed=0, task=TaskConfig(family="gap"))
    return execute(spec, {}, store).artifact


def tiny_sft(store, data, seed: int = 0):
    """A one-epoch tiny-preset SFT model on ``data``: its ArtifactRef."""
    from roads.config import StageSpec
    from roads.settings import ModelConfig, SftConfig
    from roads.runner import execute

    spec = StageSpec(stage="sft", params=SftConfig(epochs=1, batch_size=16).model_dump(), seed=seed,
                     model=ModelConfig())
    return execute(spec, {"data": data}, store).artifact


def copy_project(dest):
    """A copy of the project's code and study file at ``dest`` (to edit, then run with PYTHONPATH=dest)."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    for part in ("roads", "tasks", "flows"):
        shutil.copytree(root / part, Path(dest) / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "pipelines.yaml", Path(dest) / "pipelines.yaml")
    return Path(dest)
