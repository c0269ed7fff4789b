"""What a killed study leaves behind, and how the next run tells it from work still going on: processes named by
host, pid and start time (a pid can be reused; a zombie — killed, not yet reaped — is not alive), and the
temporary artifact folders of writers that are gone (``roads.artifacts.new_temp_dir`` puts the writer in the name).
The MLflow side (RUNNING runs whose owner is gone) is ``flows/tracking.py::close_orphans``."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from roads.artifacts import TEMP_PREFIX


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie — killed, not yet reaped — does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc: trust kill(0)
        return True


def remove_orphan_temp_dirs(store: str | Path) -> list[Path]:
    """Remove the temporary folders of this machine whose writing process is gone (killed mid-stage); folders of live
    processes and of other machines are left alone. Returns what was removed."""
    host = socket.gethostname()
    removed = []
    for tmp in Path(store).glob(f"*/{TEMP_PREFIX}*"):
        writer = tmp.name[len(TEMP_PREFIX):].rsplit(".", 2)
        if len(writer) != 3 or writer[0] != host or not writer[1].isdigit() or pid_alive(int(writer[1])):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from /proc): with the pid, it names one process even
    after the pid is reused. Empty where /proc is not there."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner() -> str:
    """``host:pid:start`` of this process: the tag ``roads.owner`` of every run it opens."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}"


def owner_alive(tag: str) -> bool:
    """Whether the process named by a ``roads.owner`` tag still runs (runs of another machine: assumed so)."""
    host, _, rest = tag.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    return pid_alive(int(pid)) and (not start or process_start(int(pid)) == start)
