"""The reward of own_family.family:Reverse (a module of the family's own package: an edit here reruns its stages)."""

from __future__ import annotations


def positional_match(target: list[str], ys: list[str]) -> float:
    """The fraction of the target's positions the response gets right, penalised by the length difference; in [0, 1]."""
    if not target:
        return 0.0
    hits = sum(a == b for a, b in zip(target, ys))
    return hits / max(len(target), len(ys))
