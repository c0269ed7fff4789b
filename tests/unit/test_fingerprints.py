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

ROOT = Path(__file__).resolve().parents[2]
RECORD = Path(__file__).with_name("fingerprints.json")


def current() -> dict:
    from roads.config import load_study, load_study_file
    from roads.plan import build_plan

    path = ROOT / "pipelines.yaml"
    out: dict = {"default": {}, "pipelines": {}}
    for name in sorted(load_study_file(path).pipelines):
        nodes = build_plan(load_study(path, name))
        lines = [json.dumps([n.id, n.inputs, n.spec.fingerprint()], sort_keys=True) for n in nodes]
        out["pipelines"][name] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        if name == "default":
            out["default"] = {n.id: n.spec.fingerprint() for n in nodes}
    return out


def test_fingerprints_are_those_recorded(monkeypatch):
    monkeypatch.chdir(ROOT)  # pipelines.yaml names data files relative to the project
    recorded, now = json.loads(RECORD.read_text()), current()
    moved = sorted(n for n in recorded["default"] if now["default"].get(n) != recorded["default"][n])
    assert not moved and now["default"].keys() == recorded["default"].keys(), (
        f"fingerprints of the default study moved: {moved[:8]}; if deliberate, run "
        f"`.venv/bin/python tests/unit/test_fingerprints.py --write` and say why in the commit")
    changed = sorted(p for p in set(recorded["pipelines"]) | set(now["pipelines"])
                     if recorded["pipelines"].get(p) != now["pipelines"].get(p))
    assert not changed, (f"the plans or fingerprints of these pipelines moved: {changed}; if deliberate, run "
                         f"`.venv/bin/python tests/unit/test_fingerprints.py --write` and say why in the commit")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {sys.argv[0]} --write   (records the current fingerprints in {RECORD.name})")
    import os

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    RECORD.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORD}")
