"""The settings half of every cache key is recorded: a change to a default, a settings class, the stage table or the
planner that moves a fingerprint (and so reruns stages) must be deliberate. The record holds the `default`
pipeline's fingerprint per node and, per pipeline, one digest over all its nodes' ids, inputs and fingerprints.

After a deliberate change, write the record anew and say in the commit (and the README, if users' caches are hit)
which fingerprints moved and why:

    .venv/bin/python tests/unit/test_fingerprints.py --write
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORD = Path(__file__).with_name("fingerprints.json")


def absent_data() -> dict[str, str]:
    """Pipelines whose local data file is not on this machine (the hh-rlhf ones read ../shared/data, beside the
    clone), each with the file: they cannot be loaded, so their fingerprints cannot be taken. Paths from the working
    folder, as `load_study` reads them."""
    from roads.config import _looks_local, load_study_file

    study = load_study_file(ROOT / "pipelines.yaml")
    out = {}
    for name, pipeline in study.pipelines.items():
        for task in pipeline.tasks or []:
            source = study.tasks[task].source
            if source and _looks_local(source) and not Path(source).expanduser().exists():
                out[name] = source
    return out


def current(skip: tuple[str, ...] = ()) -> dict:
    from roads.config import load_study, load_study_file
    from roads.plan import build_plan

    path = ROOT / "pipelines.yaml"
    out: dict = {"default": {}, "pipelines": {}}
    for name in sorted(set(load_study_file(path).pipelines) - set(skip)):
        nodes = build_plan(load_study(path, name))
        lines = [json.dumps([n.id, n.inputs, n.spec.fingerprint()], sort_keys=True) for n in nodes]
        out["pipelines"][name] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        if name == "default":
            out["default"] = {n.id: n.spec.fingerprint() for n in nodes}
    return out


def test_fingerprints_are_those_recorded(monkeypatch):
    monkeypatch.chdir(ROOT)  # pipelines.yaml names data files relative to the project
    absent = absent_data()
    recorded, now = json.loads(RECORD.read_text()), current(skip=tuple(absent))
    for name in absent:  # not checked here: said below
        recorded["pipelines"].pop(name, None)
    moved = sorted(n for n in recorded["default"] if now["default"].get(n) != recorded["default"][n])
    assert not moved and now["default"].keys() == recorded["default"].keys(), (
        f"fingerprints of the default study moved: {moved[:8]}; if deliberate, run "
        f"`.venv/bin/python tests/unit/test_fingerprints.py --write` and say why in the commit")
    changed = sorted(p for p in set(recorded["pipelines"]) | set(now["pipelines"])
                     if recorded["pipelines"].get(p) != now["pipelines"].get(p))
    assert not changed, (f"the plans or fingerprints of these pipelines moved: {changed}; if deliberate, run "
                         f"`.venv/bin/python tests/unit/test_fingerprints.py --write` and say why in the commit")
    if absent:  # every other pipeline was checked above
        pytest.skip(f"fingerprints of {sorted(absent)} not checked: no data file at {sorted(set(absent.values()))}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {sys.argv[0]} --write   (records the current fingerprints in {RECORD.name})")
    import os

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    absent = absent_data()
    if absent:
        sys.exit(f"cannot record every pipeline: no data file for {absent}")
    RECORD.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}")
