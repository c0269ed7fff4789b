"""The study's progress in the terminal: stages done of all, cache hits, what is running with its latest step,
elapsed and estimated time left.

``live``: one rich progress view redrawn in place (an interactive terminal). ``lines``: a line per finished stage,
for CI logs and pipes. ``None``: nothing. Stage tasks (in other processes) report what they are doing by writing
``<folder>/<node>.json`` (``tasks/steps.py``), removed when they end; the view reads the
folder twice a second. The per-step lines themselves go to the log file, Prefect and MLflow (``roads run -v`` also
prints them).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tasks.steps import STEP_FILE_SUFFIX

class StudyProgress:
    def __init__(self, mode: str | None, total: int, known: int, home: Path):
        self.mode, self.total = mode, total
        self.done, self.hits, self.misses, self.failed = known, known, 0, 0
        self.folder = str(home / "progress" / uuid.uuid4().hex) if mode else None
        self.started = time.time()
        self._stop = threading.Event()
        self._live: Any = None

    @classmethod
    def of(cls, mode: str | None, nodes: list, known: dict, home: Path) -> "StudyProgress":
        return cls(mode, len(nodes), len(known), home)

    # --- what the flow reports ------------------------------------------------------------------------------------
    def finished(self, node_id: str, cache: str, seconds: float | None = None) -> None:
        self.done += 1
        self.hits += cache == "hit"
        self.misses += cache == "miss"
        self.failed += cache == "failed"
        if self.mode == "lines":
            took = f" {seconds:.1f} s" if seconds is not None else ""
            print(f"[{self.done}/{self.total}] {node_id}: {cache}{took} ({time.time() - self.started:.0f} s elapsed)",
                  flush=True)

    def running(self) -> list[tuple[str, str]]:
        """(node, latest message) of every stage running now."""
        out = []
        for path in sorted(Path(self.folder).glob(f"*{STEP_FILE_SUFFIX}")) if self.folder else []:
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            out.append((doc["node"], doc["message"]))
        return out

    # --- the view ---------------------------------------------------------------------------------------------------
    def __enter__(self) -> "StudyProgress":
        if self.folder:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
        if self.mode == "lines":
            print(f"{self.total} stages, {self.hits} known cache hits; running the rest", flush=True)
        elif self.mode == "live":
            self._start_live()
        return self

    def _start_live(self) -> None:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.text import Text

        bar = Progress(TextColumn("[bold]stages"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                       TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
        task = bar.add_task("", total=self.total, completed=self.done)

        def view() -> Group:
            bar.update(task, completed=self.done,
                       description=f"{self.hits} hits, {self.misses} ran" + (f", {self.failed} failed" if self.failed else ""))
            lines = [Text(f"  running {node}: {message}"[:160], style="dim") for node, message in self.running()]
            return Group(bar, *lines)

        self._live = Live(view(), console=Console(file=sys.stderr), refresh_per_second=4, transient=False)
        self._live.start()

        def refresh() -> None:
            while not self._stop.wait(0.5):
                self._live.update(view())
            self._live.update(view())

        self._thread = threading.Thread(target=refresh, name="roads-progress", daemon=True)
        self._thread.start()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._live is not None:
            self._thread.join(timeout=2)
            self._live.stop()
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
