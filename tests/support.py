"""Helpers shared by the unit tests (importable as ``support``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


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
