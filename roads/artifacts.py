"""The content-addressed artifact store: a stage writes into a temporary folder, which is renamed to
``<store>/<stage>/<digest>`` only when complete, so a killed run leaves nothing that looks finished."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def state_home() -> Path:
    """Where roads keeps its state (artifact store, cached results, Prefect home, MLflow store): $ROADS_HOME, or
    ``.roads`` in the current folder."""
    return Path(os.environ.get("ROADS_HOME") or ".roads").resolve()


@dataclass(frozen=True)
class ArtifactRef:
    """A finished stage output: where it is and the digest of its contents."""

    path: str
    digest: str

    def exists(self) -> bool:
        return Path(self.path).is_dir()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ArtifactRef":
        return cls(path=data["path"], digest=data["digest"])


@dataclass
class StageResult:
    """What a stage returns: scalar metrics, files worth showing (paths relative to the output folder) and, once the
    runner has committed the folder, its ``ArtifactRef``."""

    metrics: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    artifact: ArtifactRef | None = None

    def to_json(self) -> dict:
        return {"artifact": self.artifact.to_json(), "metrics": self.metrics, "files": self.files}

    @classmethod
    def from_json(cls, data: dict) -> "StageResult":
        return cls(dict(data["metrics"]), list(data["files"]), ArtifactRef.from_json(data["artifact"]))


def digest_dir(path: str | Path) -> str:
    """sha256 over every file's relative path, size and bytes, in sorted order (sizes keep it unambiguous)."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(root)).encode() + b"\0" + str(file.stat().st_size).encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


TEMP_PREFIX = ".tmp-"


def new_temp_dir(store: str | Path, stage: str) -> Path:
    """``<store>/<stage>/.tmp-<host>.<pid>.<uuid>``: the writer is in the name, so a later run can tell a folder
    whose writer was killed (removed by ``flows/cleanup.py``) from one still being written."""
    tmp = Path(store) / stage / f"{TEMP_PREFIX}{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, store: str | Path, stage: str) -> ArtifactRef:
    """Move a finished temporary folder to its content address (identical content already there: keep that)."""
    digest = digest_dir(tmp)
    final = Path(store) / stage / digest[:24]
    if final.is_dir():
        shutil.rmtree(tmp)
    else:
        try:
            os.rename(tmp, final)
        except OSError:  # another writer committed the same content first
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return ArtifactRef(path=str(final.resolve()), digest=digest)


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True, default=float) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
