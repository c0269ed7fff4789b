"""What a ``select_dpo`` output holds: the DPO settings its rule chose (``dpo_selection.json``), read by the DPO
roads that name it in ``select`` and by the report. Light on purpose (no torch): the report reads it."""

from __future__ import annotations

from pathlib import Path

from roads.artifacts import read_json
from roads.errors import DataError

SELECTION_FILE = "dpo_selection.json"
CHOSEN = ("beta", "loss_type", "lr")


def selected_settings(folder: str | Path) -> dict:
    """The {beta, loss_type, lr} a select_dpo output chose."""
    path = Path(folder) / SELECTION_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: the `select` entry is not a select_dpo output")
    return dict(read_json(path)["selected"])
