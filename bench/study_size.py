"""What the default study's size buys, measured: the wall time of `roads run PIPELINE` from an empty state folder,
and the interval half-width of every task's primary contrast (report.contrast − report.baseline, the minimum
detectable effect) and positive controls, read from the report that run wrote. A size is worth its minutes when the
half-width is at most `report.validity.max_half_width` (0.02 gold reward for `default`).

Run on an idle machine (`ps` first): the wall time is wall clock. Each run starts from a fresh ROADS_HOME (nothing
cached), so `--set` overrides compare sizes fairly:

    python bench/study_size.py                                    # the default study as configured
    python bench/study_size.py --set evaluate.samples_per_prompt=8 --set pipeline.seeds=[0,1,2,3,4]
    python bench/study_size.py --home /tmp/x/.roads --reuse       # read an existing run's report (no timing)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROADS = str(Path(sys.executable).parent / "roads")


def report_of(home: Path, pipeline: str, overrides: list[str], env: dict) -> dict:
    """The report.json of the pipeline's last run in ``home`` (`roads report` is all cache hits after a run)."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([ROADS, "report", pipeline, "--out", out, *sum((["--set", o] for o in overrides), [])],
                       cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        return json.loads((Path(out) / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="default")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--home", type=Path, help="state folder (default: a fresh temporary one)")
    parser.add_argument("--reuse", action="store_true", help="do not run: read the report of the run in --home")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="roads-size-")) / ".roads"
    env = {**os.environ, "ROADS_HOME": str(home)}
    took = None
    if not args.reuse:
        start = time.perf_counter()
        subprocess.run([ROADS, "run", args.pipeline, *sum((["--set", o] for o in args.overrides), [])], cwd=ROOT,
                       env=env, check=True, stdout=subprocess.DEVNULL)
        took = time.perf_counter() - start
    report = report_of(home, args.pipeline, args.overrides, env)
    print(f"pipeline {args.pipeline} {' '.join(args.overrides)}")
    if took is not None:
        print(f"wall time from an empty state folder: {took:.0f} s ({took / 60:.1f} min)")
    print("| task | check | value | threshold | result |\n|---|---|---|---|---|")
    for c in report.get("validity", []):
        if c["name"] == "resolution" or c["name"].startswith("control:"):
            print(f"| {c['task']} | {c['name']} | {c['value']} | {c['threshold']} | "
                  f"{'pass' if c['passed'] else 'FAIL'} |")


if __name__ == "__main__":
    main()
