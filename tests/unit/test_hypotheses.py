"""The verdict rule on constructed intervals, and the hypotheses' definitions against pipelines.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from roads.config import load_study
from roads.hypotheses import HYPOTHESES, verdict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("lo, hi, expected", [
    (0.01, 0.2, "supported"),       # interval excludes zero on the predicted side
    (1e-9, 1e-6, "supported"),      # even a tiny effect counts when zero is excluded
    (-0.2, -0.01, "refuted"),       # the opposite direction
    (-0.01, 0.015, "refuted"),      # contains zero, and no effect as large as the margin is compatible
    (-0.05, 0.05, "inconclusive"),  # contains zero and effects above the margin
    (-0.01, 0.02, "inconclusive"),  # hi == margin is not below it
])
def test_predicted_positive(lo, hi, expected):
    assert verdict(lo, hi, "+", margin=0.02) == expected


@pytest.mark.parametrize("lo, hi, expected", [
    (-0.01, 0.015, "supported"),    # inside ±margin
    (-0.02, 0.02, "supported"),     # the bounds are inclusive
    (0.001, 0.01, "supported"),     # excludes zero but lies inside the margin: practically no difference
    (0.001, 0.05, "refuted"),       # excludes zero and reaches beyond the margin
    (-0.3, -0.1, "refuted"),
    (-0.05, 0.01, "inconclusive"),  # contains zero but reaches beyond the margin
])
def test_predicted_no_difference(lo, hi, expected):
    assert verdict(lo, hi, "0", margin=0.02) == expected


def test_zero_margin():
    assert verdict(-0.1, 0.1, "0", margin=0.0) == "inconclusive"
    assert verdict(0.0, 0.0, "0", margin=0.0) == "supported"
    assert verdict(-0.1, -0.01, "+", margin=0.0) == "refuted"


@pytest.mark.parametrize("args", [(0.2, 0.1, "+", 0.02), (0.0, 0.1, "?", 0.02), (0.0, 0.1, "+", -1.0)])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        verdict(*args)


def test_every_hypothesis_policy_exists_in_the_hypotheses_pipeline():
    study = load_study(ROOT / "pipelines.yaml", "hypotheses")
    ids = {h.id for h in HYPOTHESES}
    assert {"H1", "H2", "H3", "H4", "H5", "H6-short", "H6-hidden"} <= ids
    from roads.stages.report import HYPOTHESIS_CLASSES
    from roads.validity import GAP_CLASSES

    classes = {GAP_CLASSES[study.tasks[t].family] for t in study.spec.tasks}
    for h in HYPOTHESES:  # a hypothesis names a class of family (the report finds the task of that class)
        assert HYPOTHESIS_CLASSES[h.family] in classes, h.id
        if h.kind == "policies":
            assert h.a in study.spec.stages and h.b in study.spec.stages, h.id
        else:
            assert h.a in ("global", "local", "implicit") and h.b in ("global", "local", "implicit")
