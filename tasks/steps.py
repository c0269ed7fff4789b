"""What a running stage is doing now, for the study's progress view (``flows/progress.py``): one small JSON file per
running node in the study's progress folder, written atomically and removed when the stage ends. Prefect-free."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

STEP_FILE_SUFFIX = ".json"


def step_file(folder: str, node_id: str) -> Path:
    return Path(folder) / (node_id.replace("/", "__") + STEP_FILE_SUFFIX)


def write_step(folder: str | None, node_id: str, message: str) -> None:
    """What a running stage is doing now (atomic: the view never reads half a file)."""
    if not folder:
        return
    path = step_file(folder, node_id)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        tmp.write_text(json.dumps({"node": node_id, "message": message, "time": time.time()}))
        tmp.replace(path)
    except OSError:  # the study ended (folder removed) or the disk is full: progress is not worth failing for
        tmp.unlink(missing_ok=True)


def clear_step(folder: str | None, node_id: str) -> None:
    if folder:
        step_file(folder, node_id).unlink(missing_ok=True)
